"""The torch.compile-fused fake-quantization kernels agree bit for bit with the eager ones."""
import warnings

import pytest
import torch

from conftest import eager_and_fused, tiny_swin, tiny_vit
from vitquant.quantizers import (OutlierTwoScaleQuantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer,
                                 ValueTwoScaleQuantizer, kernels)


def _with_ties(x: torch.Tensor, step: float) -> torch.Tensor:
    """``x`` with a quarter of its entries replaced by exact rounding ties ``(k + 0.5) * step``."""
    x = x.clone()
    flat = x.view(-1)
    k = torch.arange(-300, 300, dtype=torch.float32)
    ties = ((k + 0.5) * step)[torch.randint(0, 600, (flat.numel() // 4,), generator=torch.Generator().manual_seed(1))]
    flat[: ties.numel()] = ties
    return x


def _cases():
    g = torch.Generator().manual_seed(0)
    scale = 0.0371  # not a power of two: a reciprocal multiply would move some ties
    x3 = torch.randn(4, 33, 48, generator=g) * 3
    u = UniformQuantizer(8)
    u.set_scale(torch.tensor([scale]))
    yield "uniform per-tensor", u, _with_ties(x3, scale)
    uu = UniformQuantizer(6, signed=False)
    uu.set_scale(torch.tensor([scale]))
    yield "uniform unsigned", uu, _with_ties(x3.abs(), scale)
    ua = UniformQuantizer(4, symmetric=False)
    ua.set_scale(ua.initial_scale(x3))
    yield "uniform asymmetric", ua, _with_ties(x3, float(ua.scale))
    # per-head scales on a non-contiguous operand (k^T of an attention)
    k = torch.randn(2, 3, 17, 16, generator=g)
    up = UniformQuantizer(8, groups=3, group_dim=1)
    up.set_scale(torch.tensor([0.011, 0.023, 0.0371]))
    yield "uniform per-head, transposed", up, _with_ties(k, 0.0371).transpose(-2, -1)
    attn = (torch.randn(2, 3, 17, 17, generator=g) * 4).softmax(-1)
    ts = TwinSoftmaxQuantizer(6)
    ts.set_scale(torch.tensor([2.0 ** -9]))
    yield "twin softmax", ts, attn
    act = torch.nn.functional.gelu(x3)
    tg = TwinGeluQuantizer(6)
    tg.set_scale(torch.tensor([scale]))
    yield "twin gelu", tg, _with_ties(act, scale)
    vs = ValueTwoScaleQuantizer(6, groups=3, group_dim=1)
    vs.set_scale(torch.tensor([[scale / 8, 3.0], [scale / 4, 2.0], [scale / 16, 4.0]]))
    yield "V-2SF softmax per head", vs, attn
    vg = ValueTwoScaleQuantizer(6, signed=True)
    vg.set_scale(torch.tensor([[scale, 2.0]]))
    yield "V-2SF gelu", vg, _with_ties(act, scale)
    o2 = OutlierTwoScaleQuantizer(8, 48)
    o2.set_scale(o2.initial_scale(x3 * torch.linspace(0.2, 30, 48)))
    yield "O-2SF", o2, _with_ties(x3 * torch.linspace(0.2, 30, 48), float(o2.scale[0, 0]))


@pytest.mark.parametrize("name,quantizer,x", list(_cases()), ids=[c[0] for c in _cases()])
def test_fused_kernel_equals_eager_bitwise(name, quantizer, x):
    eager, fused = eager_and_fused(quantizer, x)
    assert kernels._state["failed"] is None, kernels._state["failed"]
    assert kernels._compiled  # the fused path really ran
    assert torch.equal(eager, fused), f"{name}: {(eager != fused).sum()} of {eager.numel()} values differ"
    assert not torch.equal(eager, x)  # the case really quantizes


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_quantized_model_logits_identical_with_and_without_fusion(make):
    from vitquant import quantize
    model = make()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    quantize(model, images[:2], "ptq4vit", progress=False)
    eager, fused = eager_and_fused(model, images)
    assert torch.equal(eager, fused)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler found\nlong trace")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setitem(kernels._state, "failed", None)
    q = UniformQuantizer(8)
    q.set_scale(torch.tensor([0.05]))
    x = torch.randn(100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), kernels.fused_kernels(True):
            y1, y2 = q(x), q(x)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no C++ compiler found" in msgs[0] and "long trace" not in msgs[0]
    assert not kernels.fused_kernels_enabled()
    assert torch.equal(y1, q.fake_quant(x)) and torch.equal(y2, y1)


def test_training_and_autograd_stay_eager(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_compiled", {})
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or real(fn, **kw))
    q = UniformQuantizer(8)
    q.set_scale(torch.tensor([0.05]))
    x = torch.randn(10, requires_grad=True)
    with kernels.fused_kernels(True):
        q(x).sum().backward()
    assert calls == []


@pytest.fixture
def fresh_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_verified", {})
    monkeypatch.setitem(kernels._state, "failed", None)


def test_one_kernel_at_several_bit_widths_stays_exact(fresh_kernels):
    """torch 2.14.1 regression: a kernel compiled first for 6-bit codes was reused (FX graph cache)
    for 8-bit ones, clamping their codes at 31. Bit-widths reach the kernels as tensors now."""
    attn = (torch.randn(2, 3, 17, 17, generator=torch.Generator().manual_seed(3)) * 4).softmax(-1)
    for bits in (6, 8, 4, 8):
        q = TwinSoftmaxQuantizer(bits)
        q.set_scale(torch.tensor([2.0 ** -11]))
        eager, fused = eager_and_fused(q, attn)
        assert torch.equal(eager, fused), f"{bits} bits: {(eager != fused).sum()} values differ"
    status = kernels.kernel_status()
    assert status["fallback"] is None and status["enabled"] and status["verified_variants"] >= 1


def test_fused_kernel_that_differs_from_eager_falls_back_with_one_warning(fresh_kernels, monkeypatch):
    # A "compiled" kernel that moves every input one ulp up: on ordinary inputs it agrees with the
    # eager kernel, on exact rounding ties it does not. The probe must find that.
    real = torch.compile

    def sloppy_compile(fn, **kw):
        inner = real(fn, **kw)
        return lambda x, *rest: inner(torch.nextafter(x, torch.full_like(x, float("inf"))), *rest)
    monkeypatch.setattr(torch, "compile", sloppy_compile)
    q = UniformQuantizer(8)
    q.set_scale(torch.tensor([0.0371]))
    x = torch.randn(4, 33, 48, generator=torch.Generator().manual_seed(0))
    sloppy = sloppy_compile(kernels.uniform_symmetric)(x, torch.tensor([0.0371]), torch.tensor(-128.), torch.tensor(127.))
    assert torch.equal(sloppy, q.fake_quant(x))  # the real input alone would not show the bug
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), kernels.fused_kernels(True):
            y1, y2 = q(x), q(x * 2)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "uniform_symmetric" in msgs[0] and torch.__version__ in msgs[0] and "probe" in msgs[0]
    assert torch.equal(y1, q.fake_quant(x)) and torch.equal(y2, q.fake_quant(x * 2))
    assert not kernels.fused_kernels_enabled()
    assert "differs from the eager one" in kernels.kernel_status()["fallback"]
