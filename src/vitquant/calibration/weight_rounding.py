"""Weight rounding better than nearest, calibration only: ERQ's ridge step and GPTQ.

Per Linear / patch-embedding conv, on its *quantized* input ``X~`` (rows: tokens of the
calibration images, from the model with every earlier op quantized and rounded) and the FP
model's output ``Y`` of that op:

* ridge step (ERQ, Zhong et al. 2024, Aqer, Eq. (6) there): the weight that best maps the
  quantized input to the FP output, pulled towards the FP weight,
  ``W' = argmin ||Y - X~ W'^T - b'||^2 + lam ||W' - W||^2``, in closed form
  ``W'^T = (Hc + lam I)^-1 (Cxy + lam W^T)`` with the centred input Gram ``Hc`` and cross moment
  ``Cxy`` (the free intercept ``b'`` is refitted below); ``lam = ridge * mean(diag Hc)``;
* GPTQ (Frantar et al. 2022, Alg. 1): quantize ``W'`` one input column at a time, in order of
  decreasing ``diag(Hc)`` with ``act_order``, on the weight quantizer's own grid (its calibrated
  steps and zero points), spreading each column's rounding error over the columns not yet
  quantized through the upper Cholesky factor of ``(Hc + damp mean(diag Hc) I)^-1``, in blocks;
* bias refit: ``b' = mean(Y) - Q mean(X~)``, the least-squares bias for the chosen codes, stored as
  the op's bias correction (the FP bias is untouched).

With the bias refitted the output error is ``||Yc - X~c Q^T||^2`` (centred rows), which is why
both steps use the centred Gram ``Hc``. Input channels with no variance (e.g. a constant
post-LayerNorm channel) carry no error: their weights are rounded to nearest and the bias absorbs
them exactly. Everything is computed in float64 except the quantization itself, which is the
weight quantizer's float32 fake quantization, so the result lies exactly on its grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..nn.modules import QuantConv2d, QuantLinear, _WeightOp
from .search import OpData

ROUNDING_METHODS = ("gptq", "nearest")
WEIGHT_ROLES = ("patch_embed", "qkv", "proj", "fc1", "fc2", "head", "reduction", "linear")


@dataclass(frozen=True)
class RoundingConfig:
    """A weight-rounding pass: ``method`` "gptq" (column-wise with error feedback) or "nearest";
    ``ridge`` (None: off) the ERQ ridge step's relative strength; GPTQ's relative ``damp``,
    ``act_order`` and ``block_size``; ``refit_bias``; the op ``roles`` it applies to;
    ``min_rows_per_input``: an op with fewer calibration rows than this many per input feature
    (e.g. the head: one row per image) keeps nearest rounding and its bias."""
    method: Literal["gptq", "nearest"] = "gptq"
    ridge: Optional[float] = None
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    refit_bias: bool = True
    roles: tuple[str, ...] = ("patch_embed", "qkv", "proj", "fc1", "fc2", "reduction", "linear")
    min_rows_per_input: float = 1.0

    def __post_init__(self):
        if self.method not in ROUNDING_METHODS:
            raise ValueError(f"unknown weight rounding {self.method!r}; choose from {', '.join(ROUNDING_METHODS)}")
        if self.ridge is not None and not self.ridge > 0:
            raise ValueError(f"ridge strength must be > 0, got {self.ridge}")
        if not self.damp > 0:
            raise ValueError(f"GPTQ damping must be > 0, got {self.damp}")
        if self.block_size < 1:
            raise ValueError("GPTQ block size must be >= 1")
        if self.min_rows_per_input < 0:
            raise ValueError("min_rows_per_input must be >= 0")
        roles = tuple(self.roles)
        unknown = [r for r in roles if r not in WEIGHT_ROLES]
        if unknown or not roles:
            raise ValueError(f"unknown weight roles {unknown or roles!r}; choose from {', '.join(WEIGHT_ROLES)}")
        object.__setattr__(self, "roles", roles)


def _rows(op: _WeightOp, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op as a matrix product: input rows ``[N, in]`` and output rows ``[N, out]``."""
    if isinstance(op, QuantConv2d):
        a = op.conv_args
        if a["groups"] != 1:
            raise ValueError(f"{op.role}: weight rounding needs an ungrouped convolution")
        k = op.weight.shape[-2:]
        cols = F.unfold(x, k, dilation=a["dilation"], padding=a["padding"], stride=a["stride"])  # [B, I*kh*kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    if isinstance(op, QuantLinear):
        return x.reshape(-1, op.in_features), y.reshape(-1, op.out_features)
    raise TypeError(f"no weight rounding for {type(op).__name__}")


def _moments(x: torch.Tensor, y: torch.Tensor, chunk: int = 4096):
    """Float64 ``(n, sum x, sum y, X^T X, X^T Y)`` over the rows, in chunks."""
    d, o = x.shape[1], y.shape[1]
    h = torch.zeros(d, d, dtype=torch.float64)
    xy = torch.zeros(d, o, dtype=torch.float64)
    sx, sy = torch.zeros(d, dtype=torch.float64), torch.zeros(o, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        xc, yc = x[i:i + chunk].double(), y[i:i + chunk].double()
        h += xc.T @ xc
        xy += xc.T @ yc
        sx += xc.sum(0)
        sy += yc.sum(0)
    return x.shape[0], sx, sy, h, xy


def _column_quantizer(op: _WeightOp, w2d: torch.Tensor):
    """``f(columns [out, k]) -> on-grid columns`` through the op's weight quantizer, checked to act
    on each element given only its output row (so that a column at a time is exact)."""
    wq = op.weight_quantizer
    if wq.group_dim not in (None, 0):
        raise ValueError(f"{op.role}: weight rounding needs weight scales grouped along the output channels")
    shape = op.weight.shape

    def fq(cols: torch.Tensor) -> torch.Tensor:
        k = cols.shape[1]
        full = cols.float().reshape(shape[0], k, *([1] * (len(shape) - 2)))
        return wq.fake_quant(full).reshape(shape[0], k)

    whole = wq.fake_quant(w2d.float().reshape(shape)).reshape(shape[0], -1)
    step = max(1, w2d.shape[1] // 7)
    parts = torch.cat([fq(w2d[:, i:i + step]) for i in range(0, w2d.shape[1], step)], 1)
    if not torch.equal(whole, parts):
        raise ValueError(f"{op.role}: the weight quantizer {type(wq).__name__} does not quantize each weight "
                         "independently; GPTQ cannot round it column by column")
    return fq


def gptq(w: torch.Tensor, h: torch.Tensor, quantize, damp: float = 0.01, act_order: bool = True,
         block_size: int = 128) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022, Alg. 1, with the lazy block updates of Sec. 3): on-grid ``Q``
    ``[out, in]`` for weight ``w`` ``[out, in]`` and input Gram ``h`` ``[in, in]``, minimising
    ``tr((W - Q) H (W - Q)^T)`` column by column; ``quantize(columns [out, k])`` rounds columns."""
    w = w.double().clone()
    h = h.double().clone()
    n = h.shape[0]
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    live = torch.diagonal(h)[~dead[perm]]
    h += damp * (float(live.mean()) if live.numel() else 1.0) * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i:i + 1]
            qc = quantize(col).double()
            q[:, i1 + i] = qc[:, 0]
            e = (col - qc) / hb[i, i]
            w1[:, i:] -= e @ hb[i:i + 1, i:]
            err1[:, i:i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out


def _output_error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                  chunk: int = 4096) -> float:
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        r = y[i:i + chunk].double() - x[i:i + chunk].double() @ w.T
        if b is not None:
            r -= b
        total += float(r.square().sum())
    return total


@torch.no_grad()
def round_weight(op: _WeightOp, data: OpData, cfg: RoundingConfig) -> dict:
    """Choose ``op``'s quantized weight (and bias) on its calibration data (module docstring);
    installs them (``op.rounded_weight``, ``op.bias_correction``) and reports the output error
    relative to the output's variance, with nearest rounding and after."""
    wq = op.weight_quantizer
    x, y = _rows(op, op._q("input", data.inputs[0]), data.output)
    out_ch = op.weight.shape[0]
    w = op.weight.detach().reshape(out_ch, -1)
    bias = op.output_bias()
    nearest = wq.fake_quant(op.weight.detach()).reshape(out_ch, -1).double()
    n, sx, sy, h, xy = _moments(x, y)
    mx, my = sx / n, sy / n
    hc = h - n * torch.outer(mx, mx)
    variance = max(_output_error(x, y, torch.zeros_like(nearest), my), 1e-30)
    before = _output_error(x, y, nearest, None if bias is None else bias.double())
    info = {"rows": int(n), "error_nearest": before / variance}
    if n < cfg.min_rows_per_input * x.shape[1]:
        info["skipped"] = f"{n} rows for {x.shape[1]} inputs"
        return info
    target = w.double()
    if cfg.ridge is not None:
        lam = cfg.ridge * float(torch.diagonal(hc).mean())
        cxy = xy - n * torch.outer(mx, my)
        a = hc + lam * torch.eye(hc.shape[0], dtype=hc.dtype)
        target = torch.linalg.solve(a, cxy + lam * target.T).T
    fq = _column_quantizer(op, target)
    if cfg.method == "gptq":
        q = gptq(target, hc, fq, cfg.damp, cfg.act_order, cfg.block_size)
    else:
        q = fq(target).double()
    op.set_rounded_weight(q.float().reshape(op.weight.shape))
    if cfg.refit_bias:  # the least-squares bias for the chosen codes, as a correction of the FP bias
        fp_bias = torch.zeros(out_ch, dtype=torch.float64) if op.bias is None else op.bias.detach().double()
        op.bias_correction = (fp_bias - (my - q @ mx)).to(op.weight.dtype)
    op.refresh()
    chosen = op.quantized_weight().reshape(out_ch, -1).double()
    after = _output_error(x, y, chosen, None if op.output_bias() is None else op.output_bias().double())
    info["error_after"] = after / variance
    info["changed"] = float((chosen != nearest).double().mean())
    return info


def round_op(cfg: RoundingConfig):
    """The engine's per-op step of the rounding pass."""
    def step(name: str, op, data: OpData) -> dict:
        return round_weight(op, data, cfg)
    return step
