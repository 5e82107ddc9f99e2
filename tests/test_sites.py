"""The recipe table "site -> quantizer spec": every operand of every supported model has a site,
and the table alone decides which quantizer it gets."""
import pytest

from conftest import tiny_swin, tiny_vit
from vitquant import get_recipe
from vitquant.nn import wrap_model
from vitquant.nn.wrap import quant_ops
from vitquant.quantizers import LogQuantizer, TwinSoftmaxQuantizer, UniformQuantizer
from vitquant.recipes import RECIPES, build_quantizers, quantizer_table
from vitquant.sites import SITES, build_from_table, site_of, spec


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_every_operand_has_a_site_and_every_recipe_a_full_table(make):
    model = wrap_model(make())
    seen = {site_of(op, operand) for _, op in quant_ops(model) for operand in op.operand_names}
    assert seen <= set(SITES) and {"q", "k", "post_softmax", "v", "post_gelu", "qkv.weight"} <= seen
    for method in RECIPES:
        assert set(quantizer_table(get_recipe(method))) == set(SITES), method


def test_the_table_decides_the_quantizer():
    model = wrap_model(tiny_vit())
    av = model.blocks[0].attn.matmul_av
    cfg = get_recipe("ptq4vit", 4, 4)
    assert isinstance(build_quantizers(av, cfg)["a"], TwinSoftmaxQuantizer)
    table = quantizer_table(cfg) | {"post_softmax": spec("log", "a", "head", per_octave=2)}
    q = build_from_table(av, table, 4, 4)
    assert isinstance(q["a"], LogQuantizer) and q["a"].groups == 3 and q["a"].bits == 4
    assert isinstance(q["b"], UniformQuantizer) and q["b"].groups == 3  # v: per head, from the same table
    fc2 = model.blocks[0].mlp.fc2
    no_gelu = build_from_table(fc2, quantizer_table(cfg) | {"post_gelu": None}, 4, 4)
    assert no_gelu["input"] is None and no_gelu["weight"].bits == 4
    with pytest.raises(ValueError, match="unknown quantizer kind"):
        spec("magic")
    assert spec("uniform", "a", "head", signed=False).to_dict() == {
        "kind": "uniform", "bits": "a", "granularity": "head", "options": {"signed": False}}
