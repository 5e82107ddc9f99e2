"""Attention modules owned by vitquant, so that q@k^T and attn@v are explicit quantized ops.

They are built from timm's modules (sharing their parameters) and reproduce timm's
non-fused attention math; ``tests/test_wrap.py`` checks them against timm's forward.
In ``attn = (q @ k^T) * scale`` the operands q and k are quantized before scaling (PTQ4ViT).
ONNX export of per-head quantizers runs one head at a time (:func:`_per_head_export`), the same
arithmetic with every step and zero point per tensor, inside ONNX Runtime's integer kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .modules import QuantLinear, QuantMatMul


def _per_head_export(attn: nn.Module) -> bool:
    """ONNX export one head at a time: when a matmul operand has per-head steps or zero points, each
    head's ``q_h @ k_h^T`` and ``attn_h @ v_h`` is an integer matmul with per-tensor parameters, which
    ONNX Runtime applies inside the kernel; the batched form needs a division (and zero-point add)
    before every QDQ and corrections plus a multiplication over the scores after each matmul."""
    ops = (attn.matmul_qk, attn.matmul_av)
    return (all(op.exporting for op in ops) and any(op.has_group_operands() for op in ops)
            and all(q.groups in (1, attn.num_heads) for op in ops for q in op.quantizers().values()))


def _heads(attn: nn.Module, qkv: torch.Tensor, scores) -> torch.Tensor:
    """Attention from the ``[B, N, 3 * heads * d]`` qkv output, one head at a time (ONNX export,
    :func:`_per_head_export`): ``scores(h, s)`` adds head ``h``'s biases and masks to its scores.
    Returns ``[B, N, heads * d]``, the heads' outputs side by side as the batched form's reshape."""
    H = attn.num_heads
    cols = qkv.split(qkv.shape[-1] // (3 * H), dim=-1)  # q_0 .. q_{H-1}, k_0 .., v_0 .. (timm's layout)
    q_norm, k_norm = getattr(attn, "q_norm", nn.Identity()), getattr(attn, "k_norm", nn.Identity())
    out = []
    for h in range(H):
        q, k = q_norm(cols[h]), k_norm(cols[H + h])
        s = scores(h, attn.matmul_qk.scaled(q, k.transpose(-2, -1), attn.scale, head=h))
        out.append(attn.matmul_av(attn.attn_drop(s.softmax(dim=-1)), cols[2 * H + h], head=h))
    return torch.cat(out, dim=-1)


def _check_supported(module: nn.Module, name: str) -> None:
    if getattr(module, "attn_drop", None) is not None and module.attn_drop.p and module.training:
        raise ValueError(f"{name}: attention dropout in training mode is not supported")


class QuantAttention(nn.Module):
    """Multi-head self-attention of timm ViT / DeiT (``timm.layers.Attention``)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        _check_supported(attn, "Attention")
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv = QuantLinear(attn.qkv, "qkv")
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        gate = getattr(attn, "gate", None)
        self.gate = QuantLinear(gate, "gate") if gate is not None else None
        self.matmul_qk = QuantMatMul("matmul_qk", attn.num_heads)
        self.matmul_av = QuantMatMul("matmul_av", attn.num_heads)
        self.proj = QuantLinear(attn.proj, "proj")
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)
        if _per_head_export(self) and attn_mask is None and not is_causal:
            x = _heads(self, qkv, lambda h, s: s)
        else:
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            attn = self.matmul_qk.scaled(q, k.transpose(-2, -1), self.scale)
            if is_causal:
                causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
                attn = attn.masked_fill(~causal, float("-inf"))
            if attn_mask is not None:
                attn = attn + attn_mask if attn_mask.dtype != torch.bool else attn.masked_fill(~attn_mask, float("-inf"))
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = self.matmul_av(attn, v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(nn.Module):
    """Swin window attention (``timm.models.swin_transformer.WindowAttention``): relative
    position bias and the shifted-window mask are added in floating point before softmax."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        _check_supported(attn, "WindowAttention")
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = QuantLinear(attn.qkv, "qkv")
        self.attn_drop = attn.attn_drop
        self.matmul_qk = QuantMatMul("matmul_qk", attn.num_heads)
        self.matmul_av = QuantMatMul("matmul_av", attn.num_heads)
        self.proj = QuantLinear(attn.proj, "proj")
        self.proj_drop = attn.proj_drop

    def _rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1)
        return bias.unsqueeze(0)

    @staticmethod
    def _biased(attn: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Scores plus the relative position bias and the shifted-window mask ``[windows, N, N]``
        (the same for every head); ``attn`` is ``[B_, heads, N, N]``, or ``[B_, N, N]`` for one head
        with that head's ``bias``."""
        attn = attn + bias
        if mask is None:
            return attn
        n = attn.shape[-1]
        per_window = mask.reshape(mask.shape[0], *[1] * (attn.dim() - 3), n, n)
        return (attn.view(-1, mask.shape[0], *attn.shape[1:]) + per_window).view(-1, *attn.shape[1:])

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x)
        if _per_head_export(self):
            bias = self._rel_pos_bias()
            x = _heads(self, qkv, lambda h, s: self._biased(s, bias[:, h], mask))
            return self.proj_drop(self.proj(x))
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.matmul_qk.scaled(q, k.transpose(-2, -1), self.scale)
        attn = self.attn_drop(self._biased(attn, self._rel_pos_bias(), mask).softmax(dim=-1))
        x = self.matmul_av(attn, v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))
