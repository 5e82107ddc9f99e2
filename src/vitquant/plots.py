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


def _block_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in ("Block", "SwinTransformerBlock")]


def plot_two_scale_histograms(model, images, stem: str, title: str = "", block: str | None = None) -> list[Path]:
    """Activation histograms of one transformer block with the ranges of its two-scaled quantizers
    (TSPTQ-ViT): post-softmax (and post-GELU) values against the V-2SF fine and coarse ranges, and
    the LayerNorm input against the O-2SF normal / outlier ranges, with each channel's range.
    FP activations of ``images``. Returns the written paths (none if the block has no two-scaled
    quantizer)."""
    import torch

    from .calibration.engine import collect_unit_data
    from .nn.modules import QuantLayerNorm
    from .quantizers import OutlierTwoScaleQuantizer, ValueTwoScaleQuantizer

    blocks = _block_names(model)
    if not blocks:
        return []
    block = block or blocks[len(blocks) // 2]
    if block not in blocks:
        raise ValueError(f"unknown block {block!r} for --plot-block; choose one of {blocks[0]} .. {blocks[-1]}")
    ops = []
    for name, op in model.named_modules():
        if not name.startswith(block + "."):
            continue
        q = op.quantizer("a") if getattr(op, "role", None) == "matmul_av" else getattr(op, "input_quantizer", None)
        if isinstance(q, ValueTwoScaleQuantizer) or (isinstance(op, QuantLayerNorm) and isinstance(q, OutlierTwoScaleQuantizer)):
            ops.append((name, op, q))
    if not ops:
        return []
    data = collect_unit_data(model, images, [(n, op) for n, op, _ in ops], 4, quantized_inputs=False)
    plt = _figure()
    paths = []
    v2sf = [(n, q, data[n].inputs[0]) for n, _, q in ops if isinstance(q, ValueTwoScaleQuantizer)]
    if v2sf:
        fig, axes = plt.subplots(1, len(v2sf), figsize=(6.5 * len(v2sf), 3.8), squeeze=False)
        for ax, (name, q, x) in zip(axes[0], v2sf):
            head = 0
            if q.groups > 1:  # one head's values with that head's scales
                x = x.select(q.group_dim, head)
            fine, m = (float(v) for v in q.scale[head if q.groups > 1 else 0])
            coarse = fine * 2 ** m
            vals = x.flatten().float()
            lo_fine, hi_fine = (q.qmin - 0.5) * fine, (q.qmax + 0.5) * fine
            in_fine = float(((vals >= lo_fine) & (vals < hi_fine)).float().mean() * 100)
            if not q.signed:
                pos = vals[vals > 0]
                bins = torch.logspace(float(pos.min().clamp(min=1e-8).log10()), float(pos.max().log10()) + 0.01, 80)
                ax.hist(pos.numpy(), bins=bins.numpy(), color="0.35")
                ax.set_xscale("log")
            else:
                ax.hist(vals.numpy(), bins=120, color="0.35")
            ax.set_yscale("log")
            ax.axvspan(max(lo_fine, 1e-8) if not q.signed else lo_fine, hi_fine, color="tab:blue", alpha=0.2,
                       label=f"fine range, step {fine:.2e} ({in_fine:.1f}% of values)")
            ax.axvline(q.qmax * coarse, color="tab:red", ls="--", label=f"coarse range end, step {coarse:.2e} (x2^{m:.0f})")
            kind = "post-softmax" if not q.signed else "post-GELU"
            ax.set_title(f"{name}: {kind}" + (f", head {head}" if q.groups > 1 else ""), fontsize=9)
            ax.set_xlabel("activation value")
            ax.set_ylabel("count")
            ax.legend(fontsize=7, loc="upper right")
        fig.suptitle(f"{title}: V-2SF ({block})", fontsize=10)
        paths.append(_save(fig, f"{stem}_v2sf_hist.png"))
    for name, _, q in ops:
        if not isinstance(q, OutlierTwoScaleQuantizer):
            continue
        x = data[name].inputs[0].reshape(-1, q.channel_max.numel()).float()
        flags = q.outlier_flags()
        step, m = (float(v) for v in q.scale[0])
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 3.8))
        normal, outlier = x[:, ~flags].flatten(), x[:, flags].flatten()
        bins = torch.linspace(float(x.min()), float(x.max()), 150).numpy()
        ax.hist(normal.numpy(), bins=bins, color="0.35", label=f"normal channels ({int((~flags).sum())})")
        if outlier.numel():
            ax.hist(outlier.numpy(), bins=bins, color="tab:orange", alpha=0.8, label=f"outlier channels ({int(flags.sum())})")
        r = (q.qmax + 0.5) * step
        ax.axvspan(-r, r, color="tab:blue", alpha=0.2, label=f"normal range, step s = {step:.2e}")
        if flags.any():
            ax.axvline(-r * 2 ** m, color="tab:red", ls="--")
            ax.axvline(r * 2 ** m, color="tab:red", ls="--", label=f"outlier range, step s x 2^{m:.0f}")
        ax.set_yscale("log")
        ax.set_xlabel("LayerNorm input value")
        ax.set_ylabel("count")
        ax.set_title(f"{name}: LayerNorm input", fontsize=9)
        ax.legend(fontsize=7)
        cmax = q.channel_max.numpy()
        colors = ["tab:orange" if f else "0.45" for f in flags.tolist()]
        ax2.bar(range(len(cmax)), cmax, width=1.0, color=colors)
        ax2.axhline(r, color="tab:blue", ls="--", label="largest value of the normal step")
        ax2.set_yscale("log")
        ax2.set_xlabel("channel")
        ax2.set_ylabel("calibrated max |x|")
        ax2.set_title(f"channel ranges: {int(flags.sum())} outlier channels (orange)", fontsize=9)
        ax2.legend(fontsize=7)
        fig.suptitle(f"{title}: O-2SF ({block})", fontsize=10)
        paths.append(_save(fig, f"{stem}_o2sf_{name.rsplit('.', 1)[-1]}_hist.png"))
    return paths
