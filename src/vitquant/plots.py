"""Plots (matplotlib, PNG, written atomically)."""
from __future__ import annotations

from pathlib import Path

from .io import _atomic


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    out = _atomic(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    fig.clf()
    return out


def plot_nuclear_norms(modules: list[dict], path: str | Path, title: str = "") -> Path:
    """Nuclear norm of the attention map (MSA) and the output feature (MLP) per transformer
    block, like Fig. 1 of Liu et al. 2021. ``modules``: rows with ``name, kind, nuclear_norm``."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for kind, label, marker in (("msa", "MSA: attention map q@k^T", "o"), ("mlp", "MLP: output feature", "s")):
        rows = [m for m in modules if m["kind"] == kind]
        ax.plot(range(1, len(rows) + 1), [m["nuclear_norm"] for m in rows], marker=marker, label=label)
    ax.set_xlabel("transformer block")
    ax.set_ylabel("nuclear norm (mean per image)")
    ax.set_title(title or "Module sensitivity (nuclear norm)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_bit_allocation(modules: list[dict], path: str | Path, title: str = "", budget_note: str = "") -> Path:
    """Chosen bit-width per module (MSA and MLP side by side per block)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    msa = [m for m in modules if m["kind"] == "msa"]
    mlp = [m for m in modules if m["kind"] == "mlp"]
    width = 0.4
    ax.bar([i + 1 - width / 2 for i in range(len(msa))], [m["bits"] for m in msa], width, label="MSA")
    ax.bar([i + 1 + width / 2 for i in range(len(mlp))], [m["bits"] for m in mlp], width, label="MLP")
    bits = [m["bits"] for m in modules]
    ax.set_ylim(0, max(bits) + 1)
    ax.set_yticks(range(0, max(bits) + 2))
    ax.set_xlabel("transformer block")
    ax.set_ylabel("bits (weights and inputs)")
    ax.set_title(title or "Mixed-precision bit allocation")
    if budget_note:
        ax.text(0.99, 0.97, budget_note, transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)
