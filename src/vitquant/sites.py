"""Activation and weight *sites*, and the recipe table "site -> quantizer spec".

A site names what an operand of a quantized op is, independently of the model family:

| site | operand |
|---|---|
| ``patch_embed.weight`` / ``patch_embed.input`` | patch-embedding conv weight / the image |
| ``qkv.weight`` | the fused q/k/v projection weight |
| ``linear.weight`` | every other Linear weight (proj, fc1, fc2, head, Swin reduction) |
| ``post_layernorm`` | the input of qkv, fc1 and Swin's reduction: a LayerNorm's output |
| ``linear.input`` | the input of every other Linear that is not post-GELU (proj, head) |
| ``post_gelu`` | the input of fc2 (after GELU) |
| ``q`` / ``k`` | operands of ``q @ k^T`` |
| ``post_softmax`` / ``v`` | operands of ``attn @ v`` |
| ``layernorm.input`` | the input of a LayerNorm (the residual stream; fully quantized setting) |

A recipe's table maps each site to a :class:`QuantizerSpec` (or None: not quantized); adding a
quantizer means one quantizer file plus a ``kind`` entry in :data:`KINDS`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal, Optional, Union

from .nn.modules import QuantConv2d, QuantLayerNorm, QuantLinear, QuantMatMul, QuantOp
from .quantizers import (AdaLogQuantizer, LogQuantizer, OutlierTwoScaleQuantizer, Quantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer,
                         UniformQuantizer, ValueTwoScaleQuantizer)

SITES = ("patch_embed.weight", "patch_embed.input", "qkv.weight", "linear.weight", "post_layernorm", "linear.input",
         "post_gelu", "q", "k", "post_softmax", "v", "layernorm.input")
POST_LAYERNORM_ROLES = ("qkv", "fc1", "reduction")

# tensor: one scale; head: one per attention head; channel: one per output channel (weights);
# in_channel: one per input channel (last dim of an activation); qkv: one each for W^Q, W^K, W^V
Granularity = Literal["tensor", "head", "channel", "in_channel", "qkv"]


def site_of(op: QuantOp, operand: str) -> str:
    """The site of ``op``'s ``operand``."""
    if isinstance(op, QuantConv2d):
        return f"patch_embed.{operand}"
    if isinstance(op, QuantLinear):
        if operand == "weight":
            return "qkv.weight" if op.role == "qkv" else "linear.weight"
        if getattr(op, "input_kind", None) == "post_gelu":
            return "post_gelu"
        return "post_layernorm" if op.role in POST_LAYERNORM_ROLES else "linear.input"
    if isinstance(op, QuantMatMul):
        return {("matmul_qk", "a"): "q", ("matmul_qk", "b"): "k", ("matmul_av", "a"): "post_softmax",
                ("matmul_av", "b"): "v"}[(op.role, operand)]
    if isinstance(op, QuantLayerNorm):
        return "layernorm.input"
    raise TypeError(f"no site for {type(op).__name__}")


def _groups(op: QuantOp, granularity: Granularity) -> dict:
    if granularity == "tensor":
        return {}
    if granularity == "head":
        return {"groups": op.num_heads, "group_dim": 1} if op.num_heads > 1 else {}
    if granularity == "qkv":
        return {"groups": 3, "group_dim": 0}
    if granularity == "in_channel":
        return {"groups": op.in_features, "group_dim": -1}
    out = op.out_channels if isinstance(op, QuantConv2d) else op.out_features
    return {"groups": out, "group_dim": 0}


# kind -> (builder of the quantizer for an op, from bits, granularity groups and options)
KINDS: dict[str, Callable[..., Quantizer]] = {
    "uniform": lambda op, bits, groups, **o: UniformQuantizer(bits, **groups, **o),
    "twin_softmax": lambda op, bits, groups, **o: TwinSoftmaxQuantizer(bits, **groups, **o),
    "twin_gelu": lambda op, bits, groups, **o: TwinGeluQuantizer(bits, **groups, **o),
    "v2sf": lambda op, bits, groups, **o: ValueTwoScaleQuantizer(bits, **groups, **o),
    "o2sf": lambda op, bits, groups, **o: OutlierTwoScaleQuantizer(bits, op.channels, **o),
    "log": lambda op, bits, groups, **o: LogQuantizer(bits, **groups, **o),
    "adalog": lambda op, bits, groups, **o: AdaLogQuantizer(bits, **groups, **o),
}


@dataclass(frozen=True)
class QuantizerSpec:
    """Which quantizer a site gets: its ``kind`` (:data:`KINDS`), whether it takes the weight or
    activation bit-width (or a fixed one, e.g. 8 for the image), its granularity and constructor
    options (e.g. ``signed``)."""
    kind: str
    bits: Union[Literal["w", "a"], int] = "a"
    granularity: Granularity = "tensor"
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantizer kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.bits not in ("w", "a") and (isinstance(self.bits, bool) or not isinstance(self.bits, int)):
            raise ValueError(f"quantizer bits must be 'w', 'a' or an integer, got {self.bits!r}")

    def build(self, op: QuantOp, w_bits: int, a_bits: int) -> Quantizer:
        bits = {"w": w_bits, "a": a_bits}.get(self.bits, self.bits)
        return KINDS[self.kind](op, bits, _groups(op, self.granularity), **dict(self.options))

    def to_dict(self) -> dict:
        return asdict(self) | {"options": dict(self.options)}


def spec(kind: str, bits: Union[Literal["w", "a"], int] = "a", granularity: Granularity = "tensor", **options) -> QuantizerSpec:
    """Shorthand: ``spec("uniform", "a", "head", signed=False)``."""
    return QuantizerSpec(kind, bits, granularity, tuple(sorted(options.items())))


def build_from_table(op: QuantOp, table: dict[str, Optional[QuantizerSpec]], w_bits: int,
                     a_bits: int) -> dict[str, Optional[Quantizer]]:
    """The quantizers of every operand of ``op`` from a site table (a missing site: not quantized)."""
    out = {}
    for operand in op.operand_names:
        s = table.get(site_of(op, operand))
        out[operand] = None if s is None else s.build(op, w_bits, a_bits)
    return out
