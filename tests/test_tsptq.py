"""TSPTQ-ViT: V-2SF and O-2SF quantizers, the fully quantized setting and the tsptq recipe."""
import pytest
import torch

from conftest import tiny_swin, tiny_vit
from vitquant import get_recipe, quantize
from vitquant.nn import QuantLayerNorm, quant_ops
from vitquant.quantizers import OutlierTwoScaleQuantizer, UniformQuantizer, ValueTwoScaleQuantizer


def test_v2sf_unsigned_codes_by_hand():
    q = ValueTwoScaleQuantizer(4)  # 1 range bit + 3 value bits: values 0..7 per range
    q.set_scale(torch.tensor([[0.1, 2.0]]))  # fine step 0.1, coarse 0.1 * 2^2 = 0.4
    x = torch.tensor([0.0, 0.04, 0.06, 0.7, 0.74, 0.76, 1.0, 2.9, 5.0])
    # 0.76 / 0.1 = 7.6 -> 8 does not fit: coarse, 0.76 / 0.4 = 1.9 -> 2, code 8 + 2
    assert q.quantize(x).tolist() == [0, 0, 1, 7, 7, 10, 10, 15, 15]
    expect = torch.tensor([0.0, 0.0, 0.1, 0.7, 0.7, 0.8, 0.8, 2.8, 2.8])
    torch.testing.assert_close(q.fake_quant(x), expect)
    torch.testing.assert_close(q.dequantize(q.quantize(x)), q.fake_quant(x))


def test_v2sf_signed_codes_by_hand():
    q = ValueTwoScaleQuantizer(4, signed=True)  # fine values -4..3 (two's complement in 3 bits), coarse 0..7
    q.set_scale(torch.tensor([[0.05, 2.0]]))  # fine 0.05, coarse 0.2
    x = torch.tensor([-0.17, -0.1, 0.0, 0.16, 0.19, 0.5, 1.0, 2.0, -0.3])
    # -0.17 / 0.05 = -3.4 -> -3 -> 5 (mod 8); 0.19 -> 3.8 -> 4 > 3: coarse 0.95 -> 1 -> 8 + 1;
    # 2.0 -> coarse 10, clamped to 7; -0.3 -> fine -6 does not fit, coarse -1.5 -> -2 clamped to 0
    assert q.quantize(x).tolist() == [5, 6, 0, 3, 9, 10, 13, 15, 8]
    torch.testing.assert_close(q.fake_quant(x), torch.tensor([-0.15, -0.1, 0.0, 0.15, 0.2, 0.4, 1.0, 1.4, 0.0]))
    torch.testing.assert_close(q.dequantize(q.quantize(x)), q.fake_quant(x))


def test_o2sf_codes_and_flags_by_hand():
    q = OutlierTwoScaleQuantizer(4, channels=3)  # codes -8..7
    x = torch.tensor([[0.1, -0.5, 6.0], [0.2, 0.3, -4.0]])
    q.initial_scale(x)  # calibrated channel ranges 0.2, 0.5, 6.0
    q.set_scale(torch.tensor([[0.1, 3.0]]))  # s = 0.1 represents |x| <= 0.75: channel 2 is an outlier
    assert q.outlier_flags().tolist() == [False, False, True]
    assert q.quantize(x).tolist() == [[1, -5, 7], [2, 3, -5]]  # channel 2 on 0.8: 6 / 0.8 = 7.5 -> 8 -> 7
    torch.testing.assert_close(q.fake_quant(x), torch.tensor([[0.1, -0.5, 5.6], [0.2, 0.3, -4.0]]))
    q.set_scale(torch.tensor([[0.1, 0.0]]))  # m = 0: plain per-tensor uniform, nothing flagged
    u = UniformQuantizer(4)
    u.set_scale(torch.tensor([0.1]))
    assert not q.outlier_flags().any()
    torch.testing.assert_close(q.fake_quant(x), u.fake_quant(x))


def _best_mse(q, x, alpha=0.01, beta=1.2, n=100):
    grid = q.candidates(x, alpha, beta, n)
    err = ((q.fake_quant(x, grid) - x) ** 2).flatten(1).mean(1)
    return float(err.min()), grid[err.argmin()]


def test_v2sf_beats_uniform_on_softmax_like_data():
    g = torch.Generator().manual_seed(0)
    attn = (torch.randn(4, 3, 50, 50, generator=g) * 3).softmax(-1)
    for bits in (4, 6, 8):
        v2, _ = _best_mse(ValueTwoScaleQuantizer(bits), attn)
        uni, _ = _best_mse(UniformQuantizer(bits, signed=False), attn)
        assert v2 < uni, (bits, v2, uni)


def test_o2sf_flags_outlier_channels_and_beats_uniform():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 20, 48, generator=g)
    x[..., [5, 17, 40]] *= 40  # three outlier channels, as in a ViT residual stream
    o = OutlierTwoScaleQuantizer(8, 48)
    err, best = _best_mse(o, x, alpha=0.5)
    o.set_scale(best)
    assert o.outlier_flags().nonzero().flatten().tolist() == [5, 17, 40]
    uni, _ = _best_mse(UniformQuantizer(8), x, alpha=0.5)
    assert err < uni / 10


def test_v2sf_and_twin_are_exclusive():
    with pytest.raises(ValueError, match="twin uniform or V-2SF"):
        get_recipe("ptq4vit").replace(softmax_v2sf=True)
    with pytest.raises(ValueError, match="LayerNorm quantizer"):
        get_recipe("tsptq").replace(layernorm_quantizer="log2")


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_full_setting_quantizes_every_layernorm_input(make):
    n_ln = sum(isinstance(m, torch.nn.LayerNorm) for m in make().modules())
    x = torch.randn(4, 3, 32, 32)
    full, _ = quantize(make(), x, get_recipe("tsptq", 6, 6), progress=False)
    lns = [op for _, op in quant_ops(full) if isinstance(op, QuantLayerNorm)]
    assert len(lns) == n_ln > 0
    assert all(isinstance(op.input_quantizer, OutlierTwoScaleQuantizer) and op.input_quantizer.calibrated for op in lns)
    av = [op.a_quantizer for _, op in quant_ops(full) if op.role == "matmul_av"]
    fc2 = [op.input_quantizer for _, op in quant_ops(full) if op.role == "fc2"]
    assert all(isinstance(q, ValueTwoScaleQuantizer) and not q.signed and q.calibrated for q in av)
    assert all(isinstance(q, ValueTwoScaleQuantizer) and q.signed and q.calibrated for q in fc2)
    for q in av + fc2:  # searched exponent is one of the grid's integers
        m = q.scale[..., 1]
        assert torch.equal(m, m.round()) and bool((m >= 1).all())

    partial, _ = quantize(make(), x, get_recipe("tsptq", 6, 6).replace(quantize_layernorm=False), progress=False)
    assert all(op.input_quantizer is None for _, op in quant_ops(partial) if isinstance(op, QuantLayerNorm))
    # quantizing the residual stream changes the output; the LayerNorm ops are a no-op without quantizers
    with torch.no_grad():
        ref = make()(x)
        assert torch.equal(partial(x), partial(x))
        assert not torch.allclose(full(x), partial(x))
        from vitquant import quantization_disabled
        with quantization_disabled(full):
            torch.testing.assert_close(full(x), ref, rtol=1e-4, atol=1e-5)


def test_uniform_layernorm_option():
    m, _ = quantize(tiny_vit(), torch.randn(4, 3, 32, 32), get_recipe("tsptq", 8, 8).replace(layernorm_quantizer="uniform"),
                    progress=False)
    lns = [op.input_quantizer for _, op in quant_ops(m) if isinstance(op, QuantLayerNorm)]
    assert lns and all(type(q) is UniformQuantizer and q.calibrated for q in lns)


def test_o2sf_never_flags_every_channel():
    """A step that would flag all channels is the same as plain uniform; the grid writes it so."""
    q = OutlierTwoScaleQuantizer(8, 16)
    x = torch.randn(4, 10, 16) + 5.0  # every channel far from zero: small steps flag them all
    grid = q.candidates(x, 0.01, 1.2, 100)
    flags_all = q.channel_max.min() > (q.qmax + 0.5) * grid[:, 0, 0]
    assert not bool((flags_all & (grid[:, 0, 1] > 0)).any())
    assert bool((grid[:, 0, 1] == 0).any())
