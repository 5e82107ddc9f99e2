"""Exact codes and values of every quantizer against hand-computed cases."""
import pytest
import torch

from vitquant.quantizers import (LogQuantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer,
                                 ValueTwoScaleQuantizer)


def calibrated(q, scale):
    q.set_scale(torch.as_tensor(scale, dtype=torch.float32))
    return q


def test_uniform_signed_codes_clamp_zero_negative_and_half_even():
    q = calibrated(UniformQuantizer(4), [0.5])
    x = torch.tensor([-5.0, -4.1, -0.26, -0.24, 0.0, 0.25, 0.75, 3.4, 10.0])
    # x / 0.5 = [-10, -8.2, -0.52, -0.48, 0, 0.5, 1.5, 6.8, 20] -> round half even, clamp [-8, 7]
    assert q.quantize(x).tolist() == [-8, -8, -1, 0, 0, 0, 2, 7, 7]
    assert q.fake_quant(x).tolist() == [-4.0, -4.0, -0.5, 0.0, 0.0, 0.0, 1.0, 3.5, 3.5]
    assert torch.equal(q.dequantize(q.quantize(x)), q.fake_quant(x))


def test_uniform_unsigned_range():
    q = calibrated(UniformQuantizer(3, signed=False), [0.25])
    x = torch.tensor([-1.0, 0.1, 0.13, 1.0, 5.0])
    assert q.quantize(x).tolist() == [0, 0, 1, 4, 7]
    assert q.fake_quant(x).tolist() == [0.0, 0.0, 0.25, 1.0, 1.75]


def test_uniform_asymmetric_zero_point():
    q = UniformQuantizer(4, symmetric=False)
    x = torch.tensor([-1.0, 0.0, 2.9, 5.0])
    q.initial_scale(torch.tensor([-1.0, 2.75]))  # sets the group minimum -1
    calibrated(q, [0.25])  # zero point = round(1 / 0.25) = 4
    assert q.quantize(x).tolist() == [0, 4, 15, 15]
    assert q.fake_quant(x).tolist() == [-1.0, 0.0, 2.75, 2.75]


def test_grouped_scales_per_block_and_per_head():
    w = torch.tensor([[1.0, -1.3], [1.0, -1.3], [0.3, 0.74], [0.3, 0.74], [0.1, 9.0], [0.1, 9.0]])
    q = calibrated(UniformQuantizer(4, groups=3, group_dim=0), [1.0, 0.5, 0.25])
    assert q.quantize(w).tolist() == [[1, -1], [1, -1], [1, 1], [1, 1], [0, 7], [0, 7]]
    assert q.fake_quant(w)[4].tolist() == [0.0, 1.75]
    a = torch.ones(2, 3, 4, 5)  # [B, heads, T, d], per head along dim 1
    qh = calibrated(UniformQuantizer(8, groups=3, group_dim=1), [1.0, 0.5, 0.3])
    codes = qh.quantize(a)
    assert codes[:, 0].unique().tolist() == [1] and codes[:, 1].unique().tolist() == [2]
    assert codes[:, 2].unique().tolist() == [3]


def test_candidate_axis_matches_one_candidate_at_a_time():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    q = UniformQuantizer(5, groups=3, group_dim=0)
    cands = torch.rand(7, 3) * 0.2 + 0.01
    batched = q.fake_quant(x, cands)
    assert batched.shape == (7, 6, 8)
    for c in range(7):
        assert torch.equal(batched[c], calibrated(q, cands[c]).fake_quant(x))


def test_initial_interval_and_candidate_grid():
    x = torch.tensor([0.5, -3.0, 2.0])
    q = UniformQuantizer(8)
    d0 = 3.0 / (128 - 0.5)
    assert q.initial_scale(x).item() == pytest.approx(d0)
    grid = q.candidates(x, alpha=0.01, beta=1.2, n=100)
    assert grid.shape == (100, 1)
    assert grid[0].item() == pytest.approx(0.01 * d0) and grid[-1].item() == pytest.approx((0.01 + 99 * 1.19 / 100) * d0)


def test_percentile_interval_ignores_outliers():
    x = torch.cat([torch.linspace(-1, 1, 9999), torch.tensor([100.0])])
    q = UniformQuantizer(8, percentile=99.9)
    assert q.initial_scale(x).item() == pytest.approx(1.0 / 127.5, rel=0.01)


def test_twin_softmax_range_selection_and_codes():
    q = calibrated(TwinSoftmaxQuantizer(4), [2.0 ** -5])  # levels 8, D2 = 1/8, R1 = [0, 0.25)
    x = torch.tensor([0.0, 0.01, 0.24, 0.25, 0.3, 0.99, 1.0])
    # R1: 0.24 / (1/32) = 7.68 -> 8 -> clamp 7; 0.25 is not in R1 -> R2: 0.25 * 8 = 2
    assert q.quantize(x).tolist() == [0, 0, 7, 8 + 2, 8 + 2, 8 + 7, 8 + 7]
    assert q.fake_quant(x).tolist() == [0.0, 0.0, 7 / 32, 0.25, 0.25, 0.875, 0.875]
    assert torch.equal(q.dequantize(q.quantize(x)), q.fake_quant(x))


def test_twin_softmax_search_grid_is_powers_of_two():
    g = TwinSoftmaxQuantizer(8).candidates(torch.rand(10), 0.01, 1.2, 100)
    assert g.shape == (20, 1) and g[:, 0].tolist() == [2.0 ** -i for i in range(20)]


def test_twin_gelu_negative_range_fixed_positive_range_scaled():
    q = calibrated(TwinGeluQuantizer(4), [0.5])
    dn = 0.16997124254703522 / 8
    x = torch.tensor([-0.17, -0.05, -0.001, 0.0, 0.2, 0.3, 3.6, 10.0])
    assert q.quantize(x).tolist() == [-8, -2, 0, 0, 0, 1, 7, 7]
    expect = torch.tensor([-8 * dn, -2 * dn, 0.0, 0.0, 0.0, 0.5, 3.5, 3.5])
    assert torch.allclose(q.fake_quant(x), expect)
    assert torch.equal(q.dequantize(q.quantize(x)), q.fake_quant(x))


@pytest.mark.parametrize("make", [
    lambda: UniformQuantizer(6), lambda: UniformQuantizer(8, groups=4, group_dim=1),
    lambda: UniformQuantizer(6, symmetric=False), lambda: TwinSoftmaxQuantizer(6), lambda: TwinGeluQuantizer(6)])
def test_codes_decode_to_the_fake_quantized_values_and_stay_in_b_bits(make):
    torch.manual_seed(1)
    q = make()
    x = torch.rand(3, 4, 5, 16) if isinstance(q, TwinSoftmaxQuantizer) else torch.randn(3, 4, 5, 16)
    q.set_scale(q.initial_scale(x) * 0.7)
    if isinstance(q, TwinSoftmaxQuantizer):
        q.set_scale(torch.tensor([2.0 ** -8]))
    codes = q.quantize(x)
    assert torch.equal(q.dequantize(codes), q(x))
    assert codes.unique().numel() <= 2 ** q.bits
    assert int(codes.max()) - int(codes.min()) < 2 ** q.bits


@pytest.mark.parametrize("bits", [0, 1, 17, 4.5])
def test_impossible_bit_widths_rejected(bits):
    with pytest.raises(ValueError, match="bit-width"):
        UniformQuantizer(bits)


def test_uncalibrated_quantizer_is_identity():
    x = torch.randn(10)
    assert torch.equal(UniformQuantizer(4)(x), x)


def test_twin_fake_quant_is_bitwise_the_two_range_definition():
    """The fast formulations equal 'quantize with both intervals, select by range' exactly."""
    torch.manual_seed(2)
    a = torch.rand(4, 3, 50, 50) ** 4  # many tiny post-softmax-like values
    sm = calibrated(TwinSoftmaxQuantizer(6), [2.0 ** -9])
    s, L, d2 = sm.scale, sm.levels, sm.d2
    ref = torch.where(a < L * s, torch.clamp(torch.round(a / s), 0, L - 1) * s,
                      torch.clamp(torch.round(a / d2), 0, L - 1) * d2)
    assert torch.equal(sm(a), ref)
    cands = torch.tensor([[2.0 ** -7], [2.0 ** -12]])
    assert torch.equal(sm.fake_quant(a, cands)[1], calibrated(sm, cands[1]).fake_quant(a))
    g = torch.nn.functional.gelu(torch.randn(4, 50, 64) * 3)
    gq = calibrated(TwinGeluQuantizer(6), [0.037])
    s, L, dn = gq.scale, gq.levels, gq.d_neg
    ref = torch.where(g >= 0, torch.clamp(torch.round(g / s), 0, L - 1) * s,
                      torch.clamp(torch.round(g / dn), -L, 0) * dn)
    assert torch.equal(gq(g), ref)


@pytest.mark.parametrize("make", [
    lambda: UniformQuantizer(8, groups=3, group_dim=1),
    lambda: UniformQuantizer(6, symmetric=False, groups=3, group_dim=1),
    lambda: TwinSoftmaxQuantizer(8, groups=3, group_dim=1),
    lambda: LogQuantizer(4, groups=3, group_dim=1),
    lambda: ValueTwoScaleQuantizer(8, groups=3, group_dim=1)])
def test_group_is_what_the_quantizer_does_to_that_group(make):
    """``Quantizer.group(g)`` (ONNX export one head at a time) quantizes head ``g``'s slice exactly as
    the grouped quantizer does, with its own parameters, and is per tensor."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g) * torch.tensor([0.5, 2.0, 8.0]).view(1, 3, 1, 1)
    q = make()
    if isinstance(q, (TwinSoftmaxQuantizer, LogQuantizer)):  # post-softmax quantizers
        x = x.abs().softmax(-1)
    init = q.initial_scale(x)
    q.set_scale(init * torch.tensor([1.0, 1.5, 2.0]).reshape(3, *[1] * (init.dim() - 1)))  # distinct per group
    if hasattr(q, "lower"):
        q.lower.copy_(x.transpose(0, 1).reshape(3, -1).amin(1))
    full = q.fake_quant(x)
    for h in range(3):
        sub = q.group(h)
        assert sub.groups == 1 and sub.calibrated and type(sub) is type(q)
        torch.testing.assert_close(sub.fake_quant(x[:, h]), full[:, h], rtol=0, atol=0)
    assert not torch.equal(q.group(0).scale, q.group(2).scale)
    with pytest.raises(IndexError):
        q.group(3)
