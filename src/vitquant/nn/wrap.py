"""timm model -> quantizable model: every op of the PTQ4ViT setting becomes a :class:`QuantOp`.

Supported families: ``VisionTransformer`` (ViT, DeiT), ``VisionTransformerDistilled`` (DeiT
distilled; timm averages its two heads at inference) and ``SwinTransformer``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

from torch import nn

from .attention import QuantAttention, QuantWindowAttention
from .modules import QuantConv2d, QuantLayerNorm, QuantLinear, QuantMatMul, QuantOp, _WeightOp

SUPPORTED_FAMILIES = ("VisionTransformer", "VisionTransformerDistilled", "SwinTransformer")
_BLOCK_TYPES = ("Block", "SwinTransformerBlock", "PatchMerging")
_LINEAR_ROLES = {"fc1": "fc1", "fc2": "fc2", "head": "head", "head_dist": "head", "reduction": "reduction"}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(m, QuantOp) for m in model.modules())


def wrap_model(model: nn.Module) -> nn.Module:
    """Replace attention, Linear and the patch-embedding conv of a timm model by quantized ops
    (in place; parameters are shared). Quantizers are attached later by a recipe."""
    family = type(model).__name__
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unsupported model family {family}; vitquant supports {', '.join(SUPPORTED_FAMILIES)}")
    if is_wrapped(model):
        return model
    for name, module in list(model.named_modules()):
        cls = type(module).__name__
        if cls == "Attention":
            _replace(model, name, QuantAttention(module))
        elif cls == "WindowAttention":
            _replace(model, name, QuantWindowAttention(module))
        elif "Attention" in cls and not isinstance(module, (QuantAttention, QuantWindowAttention)):
            raise ValueError(f"unsupported attention module {cls} at {name}")
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantOp):
            continue
        if isinstance(module, nn.Linear):
            role = _LINEAR_ROLES.get(name.rpartition(".")[2], "linear")
            _replace(model, name, QuantLinear(module, role))
        elif isinstance(module, nn.Conv2d) and name.endswith("patch_embed.proj"):
            _replace(model, name, QuantConv2d(module, "patch_embed"))
        elif isinstance(module, nn.LayerNorm):  # input quantized only in the fully quantized setting
            _replace(model, name, QuantLayerNorm(module))
    # Mark the inputs with special distributions: fc2 after GELU, attn@v after softmax.
    for module in model.modules():
        if all(hasattr(module, a) for a in ("fc1", "act", "fc2")) and isinstance(module.fc2, QuantLinear):
            module.fc2.input_kind = "post_gelu" if isinstance(module.act, nn.GELU) else None
    return model.train(model.training)  # new modules take the model's train/eval mode


def quant_ops(model: nn.Module, active: bool = False) -> list[tuple[str, QuantOp]]:
    """All quantized ops in execution order (modules are registered in that order); with
    ``active`` only those that have a quantizer (e.g. LayerNorms only in the full setting)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantOp) and (not active or m.quantizers())]


def calibration_units(model: nn.Module, per_op: bool = False) -> list[tuple[str, list[tuple[str, QuantOp]]]]:
    """Quantized ops that have quantizers, grouped by transformer block (or patch merging);
    other ops alone (``per_op``: every op alone)."""
    if per_op:
        return [(name, [(name, op)]) for name, op in quant_ops(model, active=True)]
    block_names = [n for n, m in model.named_modules() if type(m).__name__ in _BLOCK_TYPES]
    units: list[tuple[str, list]] = []
    for name, op in quant_ops(model, active=True):
        owner = next((b for b in block_names if name.startswith(b + ".")), name)
        if units and units[-1][0] == owner:
            units[-1][1].append((name, op))
        else:
            units.append((owner, [(name, op)]))
    return units


@dataclass
class QuantModule:
    """An MSA or MLP module: the unit that gets one bit-width in mixed precision (Liu et al. 2021,
    Sec. 3.3). ``output`` names the op whose output is the module's "attention map" (q @ k^T,
    MSA) or "output feature" (fc2, MLP)."""
    name: str
    kind: str  # "msa" or "mlp"
    ops: list[tuple[str, QuantOp]]
    output: str

    @property
    def last(self) -> str:
        """The op whose output leaves the module into the residual stream (proj / fc2)."""
        return self.ops[-1][0]

    @property
    def num_weights(self) -> int:
        return sum(op.weight.numel() for _, op in self.ops if isinstance(op, _WeightOp))


def quant_modules(model: nn.Module) -> list[QuantModule]:
    """Every attention (MSA) and MLP module of a wrapped model, in execution order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (QuantAttention, QuantWindowAttention)):
            kind, output = "msa", "matmul_qk"
        elif isinstance(getattr(m, "fc1", None), QuantLinear) and isinstance(getattr(m, "fc2", None), QuantLinear):
            kind, output = "mlp", "fc2"
        else:
            continue
        ops = [(f"{name}.{n}", op) for n, op in m.named_modules() if isinstance(op, QuantOp)]
        out.append(QuantModule(name, kind, ops, f"{name}.{output}"))
    return out


@contextlib.contextmanager
def quantization_only(model: nn.Module, enabled: Iterable[QuantOp]) -> Iterator[nn.Module]:
    """Inside the block only the ``enabled`` ops are quantized; every other op runs in FP."""
    keep = {id(op) for op in enabled}
    ops = [m for m in model.modules() if isinstance(m, QuantOp)]
    saved = [op.quant_enabled for op in ops]
    for op in ops:
        op.quant_enabled = op.quant_enabled and id(op) in keep
    try:
        yield model
    finally:
        for op, s in zip(ops, saved):
            op.quant_enabled = s


def quantization_disabled(model: nn.Module):
    """Run the wrapped model in floating point inside the block."""
    return quantization_only(model, ())


__all__ = ["wrap_model", "quant_ops", "calibration_units", "quantization_disabled", "quantization_only",
           "quant_modules", "QuantModule", "is_wrapped",
           "QuantLinear", "QuantConv2d", "QuantMatMul", "QuantLayerNorm", "QuantOp"]
