"""The wrapped model reproduces timm exactly with quantization off and exposes every op."""
import copy

import pytest
import timm
import torch

from conftest import tiny_swin, tiny_vit
from vitquant.nn import QuantMatMul, calibration_units, quant_ops, quantization_disabled, wrap_model
from vitquant.recipes import attach_quantizers, get_recipe


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch16_224",
                                  "deit_base_distilled_patch16_224", "swin_tiny_patch4_window7_224"])
def test_wrapped_model_reproduces_timm_logits(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        model = wrap_model(copy.deepcopy(ref))
        attach_quantizers(model, get_recipe("ptq4vit"))  # attached but uncalibrated: identity
        got = model(x)
        with quantization_disabled(model):
            got_off = model(x)
    assert (expected - got).abs().max().item() < 1e-4
    assert (expected - got_off).abs().max().item() < 1e-4


def test_every_op_of_the_ptq4vit_setting_is_an_explicit_module():
    model = wrap_model(tiny_vit())
    roles = [op.role for _, op in quant_ops(model)]
    assert roles == (["patch_embed"] + ["layernorm", "qkv", "matmul_qk", "matmul_av", "proj", "layernorm", "fc1", "fc2"] * 2
                     + ["layernorm", "head"])
    attach_quantizers(model, get_recipe("ptq4vit"))  # the partial setting: LayerNorm inputs stay FP32
    roles = [op.role for _, op in quant_ops(model, active=True)]
    assert roles == ["patch_embed"] + ["qkv", "matmul_qk", "matmul_av", "proj", "fc1", "fc2"] * 2 + ["head"]
    assert [u for u, _ in calibration_units(model)] == ["patch_embed.proj", "blocks.0", "blocks.1", "head"]
    assert model.blocks[0].mlp.fc2.input_kind == "post_gelu"


def test_matmul_hooks_see_attention_operands():
    model = wrap_model(tiny_vit())
    seen = {}
    for name, op in quant_ops(model):
        if isinstance(op, QuantMatMul):
            op.register_forward_hook(lambda m, a, o, name=name: seen.update({name: (a[0].shape, a[1].shape, o)}))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    a_shape, b_shape, out = seen["blocks.0.attn.matmul_av"]
    assert a_shape == (2, 3, 17, 17) and b_shape == (2, 3, 17, 16)  # attn [B, H, T, T], v [B, H, T, d]
    assert out.shape == (2, 3, 17, 16)
    qk_a, qk_b, qk_out = seen["blocks.0.attn.matmul_qk"]
    assert qk_a == (2, 3, 17, 16) and qk_b == (2, 3, 16, 17) and qk_out.shape == (2, 3, 17, 17)


def test_swin_window_attention_and_patch_merging_are_wrapped():
    model = wrap_model(tiny_swin())
    roles = [op.role for _, op in quant_ops(model)]
    assert roles.count("matmul_qk") == 4 and "reduction" in roles
    ref = tiny_swin()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ref(x) - model(x)).abs().max() < 1e-5


def test_wrapping_keeps_eval_mode_and_rejects_unknown_families():
    model = wrap_model(tiny_vit().eval())
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="unsupported model family"):
        wrap_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_module_weight_count_ignores_layernorms_inside_attention():
    """q/k norms are wrapped LayerNorms (quantizable inputs) but their affine weights are not
    quantized weights: mixed precision must not budget them."""
    from vitquant.nn.wrap import quant_modules
    model = wrap_model(timm.create_model("vit_tiny_patch16_224", qk_norm=True, img_size=32, depth=1))
    attn, mlp = quant_modules(model)
    assert any("q_norm" in n for n, _ in attn.ops)
    assert attn.num_weights == 4 * 192 * 192 and mlp.num_weights == 2 * 192 * 768
