"""Evaluation: FP32 and quantized top-1/top-5 on the same images, drop, agreement, model size."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from .data import ImageSet
from .errors import VitquantError
from .nn.modules import _WeightOp
from .nn.wrap import quantization_disabled


class Prediction(NamedTuple):
    top5: torch.Tensor  # [N, 5] class indices
    seconds: float  # wall time of the timed pass over all images
    warmup_seconds: float  # the untimed first forward (one-off costs: kernel compilation, allocator)
    images_per_rank: tuple = ()  # under torchrun: how many images each rank evaluated
    num_classes: int = 0  # width of the logits


def check_labels(labels: Optional[torch.Tensor], num_classes: Optional[int], what: str = "evaluation labels") -> None:
    """A label outside ``[0, num_classes)`` can never be predicted: top-1 would be silently wrong."""
    if labels is None or not num_classes or not len(labels):
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise VitquantError(f"{int(bad.sum())} {what} lie outside the model's {num_classes} classes "
                            f"(e.g. class {int(labels[bad][0])}): labels and model do not fit")


@torch.no_grad()
def predict_top5(model: nn.Module, images: ImageSet, batch_size: int = 64, device: str = "cpu",
                 progress: bool = True, desc: str = "evaluating", warmup: bool = True) -> Prediction:
    """Top-5 class indices of every image, timed after one untimed warm-up forward on two images
    (which compiles the fused quantization kernels, see ``quantizers.kernels``)."""
    from tqdm.auto import tqdm

    from .runtime import distributed
    rank, world = distributed()
    model.eval()
    out = []
    num_classes = 0
    t0 = time.perf_counter()
    if warmup and len(images):
        model(images.tensors(0, 2).to(device))
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # under torchrun each rank takes every world-th batch: the same batches as one process, so the
    # same arithmetic and the same predictions
    starts = list(range(0, len(images), batch_size))[rank::world]
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress or rank != 0):
        logits = model(images.tensors(i, i + batch_size).to(device))
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"non-finite logits while {desc}")
        num_classes = logits.shape[-1]
        out.append(logits.topk(5, dim=-1).indices.cpu())
    top5 = torch.cat(out) if out else torch.empty(0, 5, dtype=torch.long)
    seconds = time.perf_counter() - t0
    per_rank: tuple = (top5.shape[0],)
    if world > 1:
        top5, seconds, per_rank = _gather_batches(top5, starts, len(images), batch_size, seconds)
    return Prediction(top5, seconds, warmup_s, per_rank, num_classes)


def _gather_batches(top5: torch.Tensor, starts: list[int], n: int, batch_size: int, seconds: float):
    """All ranks' predictions back in image order (all_gather); the slowest rank's time; the
    number of images each rank evaluated."""
    import torch.distributed as dist
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (starts, top5, seconds))
    full = torch.empty(n, 5, dtype=torch.long)
    for rank_starts, rank_top5, _ in parts:
        offset = 0
        for i in rank_starts:
            rows = min(batch_size, n - i)
            full[i:i + rows] = rank_top5[offset:offset + rows]
            offset += rows
    return full, max(p[2] for p in parts), tuple(p[1].shape[0] for p in parts)


def topk_accuracy(top5: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None) -> tuple[float, float]:
    """(top-1 %, top-5 %); with ``num_classes`` (the logits' width) labels outside the classes are an error."""
    check_labels(labels, num_classes)
    hit = top5 == labels[:, None]
    return 100.0 * hit[:, 0].float().mean().item(), 100.0 * hit.any(1).float().mean().item()


@dataclass
class Comparison:
    fp32_top1: float
    fp32_top5: float
    quant_top1: float
    quant_top5: float
    top1_drop: float
    top1_agreement: float
    fp32_seconds: float
    quant_seconds: float
    quant_warmup_seconds: float  # one-off, not in quant_seconds: mostly fused-kernel compilation
    images_per_rank: tuple = ()  # under torchrun: the evaluation shard of each rank


def compare(model: nn.Module, images: ImageSet, batch_size: int = 64, device: str = "cpu",
            progress: bool = True, fp32: Prediction | None = None) -> Comparison:
    """Evaluate a wrapped model with quantization off (FP32) and on, on the same images.
    ``fp32``: the FP32 :class:`Prediction` of an earlier call, to evaluate FP32 once for many runs."""
    if images.labels is None:
        raise ValueError("evaluation images need labels")
    check_labels(images.labels, getattr(model, "num_classes", None))
    if fp32 is None:
        with quantization_disabled(model):
            fp32 = predict_top5(model, images, batch_size, device, progress, "evaluating FP32")
    fp, fp_s = fp32.top5, fp32.seconds
    q, q_s, q_warm, per_rank, _ = predict_top5(model, images, batch_size, device, progress, "evaluating quantized")
    labels = images.labels
    f1, f5 = topk_accuracy(fp, labels, fp32.num_classes)
    q1, q5 = topk_accuracy(q, labels)
    agree = 100.0 * (fp[:, 0] == q[:, 0]).float().mean().item()
    return Comparison(f1, f5, q1, q5, f1 - q1, agree, fp_s, q_s, q_warm, per_rank)


def model_size_mb(model: nn.Module) -> float:
    """Model size in MB (1e6 bytes): weights of quantized ops at their bit-width, every other
    parameter (biases, embeddings, LayerNorm, unquantized weights) in FP32 (Liu et al. 2021)."""
    bits = 0
    quantized = set()
    for m in model.modules():
        if isinstance(m, _WeightOp) and m.weight_quantizer is not None:
            bits += m.weight.numel() * m.weight_quantizer.bits
            quantized.add(id(m.weight))
    for p in model.parameters():
        if id(p) not in quantized:
            bits += p.numel() * 32
    return bits / 8 / 1e6
