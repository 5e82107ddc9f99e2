"""Scale reparameterisation (RepQ-ViT): the fold leaves the float model unchanged, and per-tensor
codes of the folded activation equal per-channel codes of the original."""
import pytest
import torch

from conftest import tiny_swin, tiny_vit
from vitquant.nn import wrap_model
from vitquant.passes import channel_factors, minmax_grid, post_layernorm_pairs, reparameterize


def _norm_outputs(model, x):
    """Per-channel (min, max) and the full output of every post-LayerNorm activation."""
    seen, hooks = {}, []
    for name, norm, _ in post_layernorm_pairs(model):
        hooks.append(norm.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o.detach().clone())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("make,wrapped", [(tiny_vit, False), (tiny_vit, True), (tiny_swin, False)],
                         ids=["vit", "vit-wrapped", "swin"])
def test_fold_keeps_the_float_model_and_makes_per_tensor_codes_per_channel(make, wrapped):
    model = make()
    with torch.no_grad():  # channels of very different ranges, and constant ones (LayerNorm weight 0)
        for _, norm, _ in post_layernorm_pairs(model):
            c = norm.weight.numel()
            norm.weight.mul_(torch.logspace(-2, 1, c)[torch.randperm(c, generator=torch.Generator().manual_seed(c))])
            norm.weight[3] = norm.weight[5] = 0.0
            norm.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            norm.bias[3] = 0.0  # channel 3 is constant 0 (no range at all), channel 5 constant non-zero
    if wrapped:
        wrap_model(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    outs = _norm_outputs(model, x)
    names = sorted(outs)
    assert any("reduction" in lin for _, _, lins in post_layernorm_pairs(model) for lin, _ in lins) == (make is tiny_swin)
    ranges = {n: (o.flatten(0, -2).amin(0), o.flatten(0, -2).amax(0)) for n, o in outs.items()}
    info = reparameterize(model, ranges, bits=4)
    assert sorted(info) == names and all(i["constant_channels"] >= 2 for i in info.values())
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    folded = _norm_outputs(model, x)
    for n in names:
        lo, hi = ranges[n]
        step_c, zero_c, constant = minmax_grid(lo, hi, 4)
        r, t, step, zero = channel_factors(step_c, zero_c, constant, lo)
        assert torch.isfinite(folded[n]).all() and bool((r > 0).all()) and float(r[3]) == float(r[5]) == 1.0
        assert constant[3] and constant[5] and int(constant.sum()) == 2
        assert bool((folded[n][..., constant] == 0).all())  # constant channels move to exactly 0
        live = ~constant
        z = (folded[n][..., live] / step).round() + zero
        zc = (outs[n][..., live] / step_c[live].float()).round() + zero_c[live].float()
        # same codes up to values within float rounding of a rounding boundary
        assert (z != zc).float().mean() < 1e-3, n
        assert int(z.min()) >= 0 and int(z.max()) <= 15  # the per-tensor 4-bit grid holds every value


def test_channel_factors_reject_an_all_constant_activation():
    with pytest.raises(ValueError, match="every channel is constant"):
        channel_factors(torch.zeros(8), torch.zeros(8), torch.ones(8, dtype=torch.bool), torch.zeros(8))
