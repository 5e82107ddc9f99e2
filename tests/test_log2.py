"""RepQ-ViT log2 / log-sqrt2 quantizers: the grid, codes, search, fused kernel, ONNX and checkpoints."""
import math

import pytest
import torch

from conftest import fused_and_eager, quantized_tiny_vit, save_load_export
from vitquant.quantizers import LogQuantizer, kernels


@pytest.mark.parametrize("per_octave", [1, 2])
def test_values_are_the_log_grid(per_octave):
    q = LogQuantizer(4, per_octave=per_octave)
    q.set_scale(torch.tensor([0.5]))
    grid = [0.5 * 2 ** (-i / per_octave) for i in range(15)]  # 2^4 - 1 levels, the 16th code is zero
    x = torch.tensor(grid + [0.0, 1.0, 1e-9])
    y = q.fake_quant(x)
    torch.testing.assert_close(y[:15], torch.tensor(grid), rtol=1e-6, atol=0)
    assert y[15] == 0 and y[16] == 0.5 and y[17] == 0  # zero, saturation at s, flush below the grid
    codes = q.quantize(x)
    assert codes[:15].tolist() == list(range(15)) and codes[15] == 15 and codes.max() == 15
    assert torch.equal(q.dequantize(codes), y)
    # nearest level in the log domain: a value a quarter octave above a level rounds to it
    between = torch.tensor([0.5 * 2 ** (-3 / per_octave) * 2 ** (0.24 / per_octave)])
    assert q.fake_quant(between) == pytest.approx(0.5 * 2 ** (-3 / per_octave))


def test_reference_zero_convention_has_one_more_level():
    a, b = LogQuantizer(3, per_octave=2), LogQuantizer(3, per_octave=2, zero="extra")
    for q in (a, b):
        q.set_scale(torch.tensor([1.0]))
    x = torch.tensor([2 ** -3.5])  # code 7: the eighth level
    assert a.fake_quant(x) == 0 and b.fake_quant(x) == pytest.approx(2 ** -3.5)
    assert a.levels == 7 and b.levels == 8


@pytest.mark.parametrize("per_octave", [1, 2])
def test_relative_error_is_bounded_by_half_a_grid_step_over_the_whole_range(per_octave):
    """Unlike a uniform grid, a log grid's relative error does not grow for small values: within
    [smallest level, s] it is at most 2^(1 / 2k) - 1 (nearest level in the log domain)."""
    from vitquant.quantizers import UniformQuantizer
    q = LogQuantizer(4, per_octave=per_octave)
    q.set_scale(torch.tensor([1.0]))
    smallest = 2 ** (-(q.levels - 1) / per_octave)
    x = torch.logspace(math.log10(smallest), 0, 2000)
    rel = ((q.fake_quant(x) - x).abs() / x).max()
    assert rel <= 2 ** (1 / (2 * per_octave)) - 1 + 1e-6
    u = UniformQuantizer(4, signed=False)
    u.set_scale(torch.tensor([1 / 15]))
    assert ((u.fake_quant(x) - x).abs() / x).max() >= 0.99  # small values flush to 0 on the uniform grid


def test_fused_log_kernel_equals_eager(monkeypatch):
    attn = (torch.randn(2, 3, 17, 17, generator=torch.Generator().manual_seed(1)) * 4).softmax(-1)
    q = LogQuantizer(4, groups=3, group_dim=1)
    q.set_scale(torch.tensor([0.9, 0.5, 0.25]))
    eager, fused = fused_and_eager(monkeypatch, q, attn)
    assert torch.equal(eager, fused) and kernels.kernel_status()["fallback"] is None


def test_log_quantized_model_saves_loads_and_exports(tmp_path):
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = quantized_tiny_vit(x)
    with torch.no_grad():
        for blk in model.blocks:  # a log-sqrt2 post-softmax operand in place of the uniform one
            q = LogQuantizer(4)
            q.set_scale(torch.tensor([0.8]))
            blk.attn.matmul_av.set_quantizer("a", q)
        expect = model(x)
    loaded, out, ort_out, ops = save_load_export(model, tmp_path, x)
    assert isinstance(loaded.blocks[0].attn.matmul_av.a_quantizer, LogQuantizer)
    assert torch.equal(out, expect)
    torch.testing.assert_close(ort_out, expect, rtol=1e-3, atol=1e-4)
    assert ops["blocks.0.attn.matmul_av"] == "float" and ops["blocks.0.attn.qkv"] == "integer"
    assert not math.isnan(float(expect.sum()))