"""AdaLog's adaptive-base log quantizer: the elementwise form equals AdaLog's table form, codes
round-trip, the base search adapts, and checkpoints rebuild it."""
import math

import pytest
import torch

from conftest import fused_and_eager, quantized_tiny_vit, save_load_export
from vitquant.quantizers import QUANTIZER_TYPES, AdaLogQuantizer
from vitquant.quantizers.adalog import GELU_SHIFT


def _table_form(x, bits, s, q, shift, r=37):
    """AdaLog's published dequantization: integer shift table1[c] and mantissa table2[c]."""
    n = 2 ** bits
    t1 = torch.tensor([math.floor(i * q / r) for i in range(n)], dtype=torch.float64)
    t2 = torch.tensor([round(2 ** (-((q * i) % r) / r) * (2 * n - 2)) / (2 * n - 2) for i in range(n)],
                      dtype=torch.float64)
    y = ((x.double() + shift) / s).clamp(1e-15, 1.0)
    c = torch.round(-torch.log2(y) * r / q)
    flush = c >= n
    c = c.clamp(0, n - 1).long()
    return torch.where(flush, torch.zeros_like(y), 2.0 ** -t1[c] * t2[c] * s) - shift


@pytest.mark.parametrize("bits,q,shift,s", [(3, 37, 0.0, 1.0), (4, 23, 0.0, 1.0), (4, 61, GELU_SHIFT, 3.5),
                                            (6, 45, GELU_SHIFT, 2.0)])
def test_elementwise_form_equals_the_table_form(bits, q, shift, s):
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.rand(4000, generator=g) ** 6 * s, torch.rand(100, generator=g) * 5 - shift, torch.zeros(3)])
    quant = AdaLogQuantizer(bits, shift=shift)
    quant.set_scale(torch.tensor([[s, float(q)]]))
    got = quant.fake_quant(x).double()
    want = _table_form(x, bits, s, q, shift)
    assert torch.allclose(got, want, atol=1e-6 * max(s, 1.0))
    codes = quant.quantize(x)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits  # 2^bits: flushed to the bottom
    assert torch.allclose(quant.dequantize(codes), quant.fake_quant(x))
    assert bool((quant.fake_quant(x)[codes == 2 ** bits] == -shift).all())


def test_base_search_adapts_to_the_distribution():
    """On attention-like values the best base (by quantization error) is not plain log2."""
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, 3, 64, 64, generator=g) * 2.5, -1)
    quant = AdaLogQuantizer(4, fixed_range=True)
    cands = quant.candidates(attn, 0.5, 1.2, 10)
    assert cands.shape == (129, 1, 2) and bool((cands[:, 0, 0] == 1).all())  # softmax: range fixed at 1
    assert sorted(set(cands[:, 0, 1].tolist())) == [float(v) for v in range(10, 139)]
    err = ((quant.fake_quant(attn, cands) - attn) ** 2).flatten(1).mean(1)
    best = cands[int(err.argmin()), 0]
    log2 = err[int((cands[:, 0, 1] == 37).nonzero()[0])]
    assert float(best[1]) != 37.0 and float(err.min()) < 0.9 * float(log2)
    gelu = AdaLogQuantizer(4, shift=GELU_SHIFT)
    x = torch.nn.functional.gelu(torch.randn(1000, generator=g) * 2)
    grid = gelu.candidates(x, 0.5, 1.2, 5)
    assert grid.shape == (129 * 5, 1, 2) and float(grid[:, 0, 0].max()) < 1.2 * float((x + GELU_SHIFT).max())


def test_integer_base_and_rebuild_from_spec():
    quant = AdaLogQuantizer(4, shift=GELU_SHIFT, groups=2, group_dim=0)
    quant.set_scale(torch.tensor([[2.0, 40.4], [1.5, 20.6]]))
    assert quant.scale[:, 1].tolist() == [40.0, 21.0]
    again = QUANTIZER_TYPES["AdaLogQuantizer"](**quant.spec())
    again.load_state_dict(quant.state_dict())
    again.calibrated = True
    x = torch.randn(2, 50)
    assert torch.equal(again.fake_quant(x), quant.fake_quant(x))
    with pytest.raises(ValueError, match="AdaLog"):
        AdaLogQuantizer(4, q_range=(0, 5))


def test_fused_adalog_kernel_equals_eager(monkeypatch):
    from vitquant.quantizers import kernels
    x = torch.nn.functional.gelu(torch.randn(2, 17, 40, generator=torch.Generator().manual_seed(1)) * 2)
    q = AdaLogQuantizer(4, shift=GELU_SHIFT)
    q.set_scale(torch.tensor([[2.5, 45.0]]))
    eager, fused = fused_and_eager(monkeypatch, q, x)
    assert torch.equal(eager, fused) and kernels.kernel_status()["fallback"] is None


def test_adalog_quantized_model_saves_loads_and_exports(tmp_path):
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = quantized_tiny_vit(x)
    with torch.no_grad():
        for blk in model.blocks:  # AdaLog on post-softmax (range 1) and post-GELU (shifted)
            soft = AdaLogQuantizer(4, fixed_range=True)
            soft.set_scale(torch.tensor([[1.0, 29.0]]))
            blk.attn.matmul_av.set_quantizer("a", soft)
            gelu = AdaLogQuantizer(4, shift=GELU_SHIFT)
            gelu.set_scale(torch.tensor([[3.0, 50.0]]))
            blk.mlp.fc2.set_quantizer("input", gelu)
        expect = model(x)
    # fc2's input stays float, so ONNX Runtime fuses its dequantized 4-bit weight into MatMulNBits,
    # which by default quantizes that input to int8 on the fly; vitquant's session turns this off
    # (export.onnx.session), and the checked export then computes the simulation
    loaded, out, ort_out, ops = save_load_export(model, tmp_path, x)
    assert isinstance(loaded.blocks[1].mlp.fc2.input_quantizer, AdaLogQuantizer)
    assert loaded.blocks[1].mlp.fc2.input_quantizer.shift == GELU_SHIFT
    assert torch.equal(out, expect)
    torch.testing.assert_close(ort_out, expect, rtol=1e-3, atol=1e-4)
    assert ops["blocks.0.attn.matmul_av"] == "float" and ops["blocks.0.mlp.fc2"] == "float"
