"""Fake-quantization kernels: one pure function per quantizer type, run eagerly or fused.

Eagerly, a fake quantizer is a chain of elementwise passes (divide, round, clamp, multiply, and
for twin quantizers two of each plus a select); on CPU these passes, not the matmuls, were the
cost of simulated-quantized inference (DeiT-Tiny: 1.34x the FP32 time). ``torch.compile`` fuses
each function into one loop over the tensor. The fused and the eager function compute the same
IEEE operations in the same order (every divisor is a tensor, so no division becomes a
multiplication by a reciprocal), and ``tests/test_kernels.py`` checks that they agree bit for
bit, rounding ties included.

Fusion is used for inference only (:meth:`Quantizer.forward` without autograd); the calibration
search keeps the eager path. It is on by default; ``VITQUANT_COMPILE=0`` or
:func:`set_fused_kernels(False) <set_fused_kernels>` turns it off. Where ``torch.compile`` cannot
build a kernel (no C++ compiler, unsupported platform) vitquant warns once and stays eager.

The compiler is not trusted blindly. Python floats (code bounds, level counts) are passed to the
compiled kernels as 0-d tensors, never as Python numbers: with ``dynamic=True`` torch 2.14 traces a
float argument as a symbol, yet bakes values derived from it (``levels - 1`` of a clamp) into the
generated code, and its FX graph cache then hands that kernel to calls with other bit-widths (a
6-bit kernel clamping 8-bit codes at 31). And the first time a kernel variant (function, dtype,
device, ranks, broadcast and stride pattern) is compiled, it is checked bit for bit against the
eager function on its real input and on a probe tensor of exact rounding ties and range
boundaries of its own steps; on any difference vitquant warns once, naming the torch version, and
uses the eager kernels from then on (:func:`kernel_status` says which and why).
"""
from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Callable, Optional

import torch

# -- the kernels (pure functions of tensors and floats) -------------------------------------------


def uniform_symmetric(x: torch.Tensor, s: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """``clamp(round(x / s), qmin, qmax) * s`` (Eq. 8, Liu et al. 2021)."""
    return (x / s).round_().clamp_(qmin, qmax).mul_(s)


def uniform_channels(x: torch.Tensor, s: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """:func:`uniform_symmetric` with one step per channel (O-2SF); a separate function so that
    its compiled kernels (another broadcast pattern) have their own cache."""
    return uniform_symmetric(x, s, qmin, qmax)


def uniform_affine(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``, zero point ``z``."""
    return (x / s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def twin_softmax_split(x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, levels: float):
    """Post-softmax twin uniform codes: (``x`` in R1, R1 value code, R2 value code)."""
    return (x < levels * s1, (x / s1).round_().clamp_min_(0).clamp_max_(levels - 1),
            (x / s2).round_().clamp_min_(0).clamp_max_(levels - 1))


def twin_softmax(x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, levels: float) -> torch.Tensor:
    """PTQ4ViT post-softmax twin uniform: R1 (interval ``s1``) for ``x < levels * s1``, else R2."""
    in_r1, v1, v2 = twin_softmax_split(x, s1, s2, levels)
    return torch.where(in_r1, v1.mul_(s1), v2.mul_(s2))


def twin_gelu_split(x: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor, levels: float):
    """Post-GELU twin uniform codes in R2 (non-negative) and R1 (negative); each is 0 outside its
    range, so their sum selects by sign."""
    return ((x / s_pos).round_().clamp_min_(0).clamp_max_(levels - 1),
            (x / s_neg).round_().clamp_min_(-levels).clamp_max_(0))


def twin_gelu(x: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor, levels: float) -> torch.Tensor:
    """PTQ4ViT post-GELU twin uniform: non-negative values on ``s_pos``, negative on ``s_neg``."""
    pos, neg = twin_gelu_split(x, s_pos, s_neg, levels)
    return pos.mul_(s_pos).add_(neg.mul_(s_neg))


def two_scale_split(x: torch.Tensor, s_fine: torch.Tensor, s_coarse: torch.Tensor, qmin: float, qmax: float,
                    cmax: float):
    """V-2SF codes: (``x`` fits the fine range, fine value code, coarse value code)."""
    fine = (x / s_fine).round_()
    return (fine >= qmin) & (fine <= qmax), fine, (x / s_coarse).round_().clamp_min_(0.0).clamp_max_(cmax)


def two_scale(x: torch.Tensor, s_fine: torch.Tensor, s_coarse: torch.Tensor, qmin: float, qmax: float,
              cmax: float) -> torch.Tensor:
    """TSPTQ-ViT V-2SF: the fine step ``s_fine`` where ``round(x / s_fine)`` fits ``[qmin, qmax]``,
    else the coarse step ``s_coarse = s_fine * 2^m`` (unsigned codes, clamped to ``[0, cmax]``)."""
    in_fine, fine, coarse = two_scale_split(x, s_fine, s_coarse, qmin, qmax, cmax)
    return torch.where(in_fine, fine.mul_(s_fine), coarse.mul_(s_coarse))


def _log_exponent(x: torch.Tensor, s: torch.Tensor, per_octave: float) -> torch.Tensor:
    """``round(-k log2(x / s))``, unclamped: the one chain :func:`log_codes` and :func:`log_state` share."""
    return (x / s).log2().mul_(-per_octave).round_()


def log_codes(x: torch.Tensor, s: torch.Tensor, per_octave: float, levels: float):
    """Log-domain codes ``clamp(round(-k log2(x / s)), 0, levels - 1)`` and the values that flush to
    0 (below the smallest level, or ``x <= 0``); RepQ-ViT Sec. 4.2."""
    q = _log_exponent(x, s, per_octave)
    flush = ~(q < levels)  # also NaN / inf from x <= 0
    return q.nan_to_num_(0.0).clamp_min_(0).clamp_max_(levels - 1), flush


def log_state(x: torch.Tensor, s: torch.Tensor, per_octave: float, levels: float) -> torch.Tensor:
    """:func:`log_codes` as one state per element, the flushed ones ``levels`` (ONNX export, which
    reads each state's value from a table): the same ops, one clamp. ``x >= 0`` (post-softmax)."""
    return _log_exponent(x, s, per_octave).clamp_(0.0, levels)


SQRT2_M1 = 0.41421356237309515  # sqrt(2) - 1


def log_value(q: torch.Tensor, s: torch.Tensor, per_octave: float) -> torch.Tensor:
    """``s 2^(-q / k)`` as RepQ-ViT's integer-friendly form ``s 2^(-ceil(q/k)) (1 + (q mod 2)(sqrt2 - 1))``
    for ``k = 2`` (the same expression gives ``s 2^(-q)`` for ``k = 1``)."""
    e = q / per_octave
    up = torch.ceil(e)
    return torch.pow(2.0, -up).mul_((up - e).mul_(2 * SQRT2_M1).add_(1)).mul_(s)


def log_quant(x: torch.Tensor, s: torch.Tensor, per_octave: float, levels: float) -> torch.Tensor:
    """Log2 / log-sqrt2 quantize-dequantize (``vitquant.quantizers.log2``)."""
    q, flush = log_codes(x, s, per_octave, levels)
    v = log_value(q, s, per_octave)
    return torch.where(flush, torch.zeros_like(v), v)


def _adalog_exponent(x: torch.Tensor, s: torch.Tensor, q: torch.Tensor, shift: float, r: float) -> torch.Tensor:
    """``round(-log2((x + shift) / s) r / q)`` of the range-clamped input, unclamped: the one chain
    :func:`adalog_codes` and :func:`adalog_state` share."""
    return ((x + shift) / s).clamp_(1e-15, 1.0).log2_().mul_(-r).div_(q).round_()


def adalog_codes(x: torch.Tensor, s: torch.Tensor, q: torch.Tensor, shift: float, r: float, levels: float):
    """AdaLog codes ``clamp(round(-log2((x + shift) / s) r / q), 0, levels - 1)`` (base ``2^(q/r)``)
    of the shifted, range-clamped input, and the values that flush to the bottom (AdaLog, Eq. 4)."""
    c = _adalog_exponent(x, s, q, shift, r)
    flush = ~(c < levels)
    return c.clamp_(0.0, levels - 1), flush


def adalog_state(x: torch.Tensor, s: torch.Tensor, q: torch.Tensor, shift: float, r: float,
                 levels: float) -> torch.Tensor:
    """:func:`adalog_codes` as one state per element, the flushed ones ``levels`` (ONNX export, which
    reads each state's value from a table): the same ops, one clamp."""
    return _adalog_exponent(x, s, q, shift, r).clamp_(0.0, levels)


def adalog_value(c: torch.Tensor, s: torch.Tensor, q: torch.Tensor, shift: float, r: float, k: float) -> torch.Tensor:
    """``s 2^(-floor(c q / r)) T[(c q) mod r] - shift``: an integer shift times a mantissa from a
    table of ``r`` entries ``T[j] = round(2^(-j / r) k) / k`` (AdaLog's hardware-friendly form; the
    table is computed elementwise, ``k = 2^(b+1) - 2``)."""
    e = c * q
    octave = torch.floor(e / r)
    j = e - octave * r
    mantissa = torch.pow(2.0, j / -r).mul_(k).round_().div_(k)
    return torch.pow(2.0, -octave).mul_(mantissa).mul_(s).sub_(shift)


def adalog_quant(x: torch.Tensor, s: torch.Tensor, q: torch.Tensor, shift: float, r: float, levels: float,
                 k: float) -> torch.Tensor:
    """AdaLog quantize-dequantize (``vitquant.quantizers.adalog``); flushed values become ``-shift``."""
    c, flush = adalog_codes(x, s, q, shift, r, levels)
    v = adalog_value(c, s, q, shift, r, k)
    return torch.where(flush, torch.full_like(v, -shift), v)


def adalog_quant_candidates(x: torch.Tensor, s: torch.Tensor, q: torch.Tensor, shift: float, r: float,
                            levels: float, k: float) -> torch.Tensor:
    """:func:`adalog_quant` (bit-identical) for a batch of candidates ``(s, q)`` of shape
    ``[C, 1, ...]`` (one group each), as the search evaluates them: the codes as
    :func:`adalog_codes`, with the flushed ones as code ``levels``, their values gathered from a table
    of each candidate's ``levels + 1`` values; the log of ``x`` is taken once when every candidate
    shares one range (a base search)."""
    n, lv = s.numel(), int(levels)
    codes = torch.arange(lv, dtype=s.dtype, device=s.device).reshape(-1, *([1] * s.dim()))
    table = adalog_value(codes, s, q, shift, r, k).reshape(lv, n)
    table = torch.cat([table, torch.full((1, n), -shift, dtype=table.dtype, device=table.device)]).T.contiguous()
    s0 = s.reshape(-1)[0]
    if bool((s == s0).all()):
        c = ((x + shift) / s0).clamp_(1e-15, 1.0).log2_().mul_(-r) / q
    else:
        c = ((x + shift) / s).clamp_(1e-15, 1.0).log2_().mul_(-r).div_(q)
    # codes are >= 0 (the clamped ratio is <= 1); those >= levels flush (table entry ``levels``)
    idx = c.round_().clamp_(max=levels).reshape(n, -1).long()
    return table.gather(1, idx).reshape(c.shape)


# -- dispatch ---------------------------------------------------------------------------------------

_compiled: dict[Callable, Callable] = {}   # kernel function -> its torch.compile wrapper
_verified: dict[tuple, bool] = {}          # kernel variant -> checked against eager (True = equal)
_state = {"enabled": os.environ.get("VITQUANT_COMPILE", "1").strip().lower() not in ("0", "false", "off", "no"),
          "failed": None}


def fused_kernels_enabled() -> bool:
    """Whether inference uses the fused (compiled) kernels."""
    return _state["enabled"] and _state["failed"] is None


def kernel_status() -> dict:
    """What the result files record: fusion on or off, how many kernel variants were compiled
    and verified against the eager kernels, and why fusion fell back to eager (None if it did not)."""
    return {"enabled": fused_kernels_enabled(), "requested": _state["enabled"],
            "verified_variants": sum(_verified.values()), "fallback": _state["failed"],
            "torch": torch.__version__}


def set_fused_kernels(enabled: bool) -> None:
    """Turn the fused kernels on or off for this process."""
    _state["enabled"] = bool(enabled)


@contextmanager
def fused_kernels(enabled: bool):
    """Temporarily turn the fused kernels on or off."""
    before = _state["enabled"]
    _state["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _state["enabled"] = before


def _fall_back(reason: str) -> None:
    """Use the eager kernels from now on; warn once."""
    if _state["failed"] is None:
        _state["failed"] = reason
        warnings.warn(f"vitquant: {reason}; using the eager kernels (identical results, slower simulated-quantized "
                      "inference)", RuntimeWarning, stacklevel=4)


def _variant(fn: Callable, args: tuple) -> tuple:
    """What a compiled kernel may specialise on: dtype, device, rank, size-1 dims and stride order."""
    def sig(a):
        if not isinstance(a, torch.Tensor):
            return type(a).__name__
        order = tuple(sorted(range(a.dim()), key=lambda d: -a.stride(d))) if a.dim() else ()
        return (a.dtype, a.device.type, a.dim(), tuple(n == 1 for n in a.shape), order, a.is_contiguous())
    return (fn, tuple(sig(a) for a in args))


def _probe(x: torch.Tensor, steps: list[torch.Tensor], span: float) -> torch.Tensor:
    """A tensor shaped and strided like ``x`` whose values are exact multiples and half-multiples
    (rounding ties) of the steps, ``k`` in ``[-span-2, span+2]`` (code bounds and range boundaries
    such as ``levels * s``), a third of them moved one ulp up or down, plus zeros."""
    g = torch.Generator().manual_seed(0)
    n = x.numel()
    k = torch.randint(-int(span) - 2, int(span) + 3, (n,), generator=g).to(torch.float64)
    half = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 0.5
    out = torch.empty_like(x)
    vals = torch.zeros(x.shape, dtype=x.dtype)
    which = torch.randint(0, max(len(steps), 1), (n,), generator=g).reshape(x.shape)
    for i, s in enumerate(steps):
        sv = s.detach().to("cpu", x.dtype).expand(x.shape)
        v = ((k + half).reshape(x.shape).to(x.dtype) * sv)
        vals = torch.where(which == i, v, vals)
    nudge = torch.randint(0, 3, x.shape, generator=g)
    up, down = torch.nextafter(vals, torch.full_like(vals, float("inf"))), torch.nextafter(vals, torch.full_like(vals, -float("inf")))
    vals = torch.where(nudge == 1, up, torch.where(nudge == 2, down, vals))
    vals.view(-1)[:: 17] = 0.0
    out.copy_(vals.to(x.device))
    return out


def _verify(fn: Callable, compiled: Callable, args: tuple, targs: tuple) -> Optional[str]:
    """None when the compiled kernel equals ``fn`` bit for bit on the real input and on the probe;
    else what differs."""
    x, rest = args[0], args[1:]
    steps = [a for a in rest if isinstance(a, torch.Tensor) and a.is_floating_point()]
    span = max([abs(float(a)) for a in rest if isinstance(a, (int, float))] + [1.0])
    if span > 2 ** 16:
        span = 2 ** 16
    for name, xi in (("input", x), ("probe", _probe(x, steps, span))):
        want = fn(xi.clone(), *rest)
        got = compiled(xi.clone(), *targs[1:])
        if want.shape != got.shape or want.dtype != got.dtype:
            return f"{fn.__name__}: fused kernel gives {tuple(got.shape)} {got.dtype}, eager {tuple(want.shape)} {want.dtype}"
        same = (want == got) | (torch.isnan(want) & torch.isnan(got))
        if not bool(same.all()):
            return (f"fused kernel {fn.__name__} differs from the eager one on torch {torch.__version__} "
                    f"({int((~same).sum())} of {same.numel()} {name} values)")
    return None


def _as_tensor(a, like: torch.Tensor):
    """Python numbers as 0-d tensors of ``like``'s dtype (see the module docstring)."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return torch.tensor(float(a), dtype=like.dtype, device=like.device)
    return a


def run_kernel(fn: Callable, *args, fused: bool = False) -> torch.Tensor:
    """``fn(*args)``, through its compiled version when ``fused`` and fusion is available (a
    new kernel variant is verified against ``fn`` before its first use)."""
    if not (fused and fused_kernels_enabled() and not torch.compiler.is_compiling()):
        return fn(*args)
    compiled = _compiled.get(fn)
    if compiled is None:
        # Inductor imports cpp_extension, which logs a CUDA_HOME notice on CPU-only machines.
        log = logging.getLogger("torch.utils.cpp_extension")
        if log.level == logging.NOTSET:
            log.setLevel(logging.ERROR)
        # One kernel per broadcast pattern / rank / view-ness; several models or settings in
        # one process exceed dynamo's default of 8 variants, after which it runs eagerly.
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < 64:
            torch._dynamo.config.recompile_limit = 64
        compiled = _compiled[fn] = torch.compile(fn, dynamic=True)
    targs = tuple(_as_tensor(a, args[0]) for a in args)
    key = _variant(fn, targs)
    try:
        if key not in _verified:
            problem = _verify(fn, compiled, args, targs)
            _verified[key] = problem is None
            if problem is not None:
                _fall_back(problem)
                return fn(*args)
        return compiled(*targs)
    except Exception as e:  # no compiler / unsupported backend: stay eager, say so once
        _verified.pop(key, None)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fall_back(f"fused quantization kernels unavailable ({type(e).__name__}: {msg})")
    return fn(*args)
