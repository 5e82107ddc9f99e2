"""``vitquant report OUT``: the tables and plots of a sweep, in the papers' layouts.

- one table per method (PTQ4ViT README layout): rows models, columns FP32 and each bit setting;
- one combined table: rows models, columns method x bits;
- an ablation layout per model: rows methods, columns bit settings, cells top-1 (drop);
- mean +- std over seeds where several seeds ran; a CSV with one row per (model, method, bits, calib size);
- plots: top-1 vs model size per method, and the top-1 drop per model and method.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .errors import VitquantError
from .io import atomic_write_text


@dataclass
class Group:
    """The results of one (model, method, bits, calibration size) over its seeds."""
    model: str
    method: str
    w_bits: int
    a_bits: int
    num_calib: int
    top1: list[float] = field(default_factory=list)
    fp32_top1: list[float] = field(default_factory=list)
    size_mb: list[float] = field(default_factory=list)
    calib_seconds: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    @property
    def bits(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @staticmethod
    def _mean_std(v):
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    @property
    def mean_std(self):
        return self._mean_std(self.top1)

    @property
    def drop(self):
        return self._mean_std([f - q for f, q in zip(self.fp32_top1, self.top1)])

    def cell(self, with_drop: bool = False) -> str:
        m, s = self.mean_std
        text = f"{m:.2f}" + (f" ± {s:.2f}" if len(self.top1) > 1 else "")
        if with_drop:
            text += f" ({self.drop[0]:+.2f})"
        return text


def collect(out: Path) -> tuple[list[Group], list[dict], dict]:
    """Groups of finished cells, the failed cells, and the FP32 top-1 per model."""
    meta_file = out / "sweep.json"
    if not meta_file.is_file():
        raise VitquantError(f"{out} is not a sweep output directory (no sweep.json); run vitquant sweep first")
    meta = json.loads(meta_file.read_text())
    groups: dict[tuple, Group] = {}
    failed = []
    fp32: dict[str, list[float]] = {}
    for c in meta["cells"]:
        f = out / "cells" / f"{c['id']}.json"
        if not f.is_file():
            err = out / "cells" / f"{c['id']}.failed.json"
            if err.is_file():
                failed.append(json.loads(err.read_text()))
            continue
        r = json.loads(f.read_text())
        key = (c["model_label"], c["method_label"], c["w_bits"], c["a_bits"], c["num_calib"])
        g = groups.setdefault(key, Group(*key))
        g.top1.append(r["quant_top1"])
        g.fp32_top1.append(r["fp32_top1"])
        g.size_mb.append(r["model_size_mb"])
        g.calib_seconds.append(r["calib_seconds"])
        g.seeds.append(c["seed"])
        fp32.setdefault(c["model_label"], []).append(r["fp32_top1"])
    return list(groups.values()), failed, {m: statistics.fmean(v) for m, v in fp32.items()}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(groups: list[Group], failed: list[dict], fp32: dict, name: str) -> str:
    models = list(dict.fromkeys(g.model for g in groups))
    methods = list(dict.fromkeys(g.method for g in groups))
    bits = sorted({(g.w_bits, g.a_bits) for g in groups}, reverse=True)
    sizes = sorted({g.num_calib for g in groups})
    seeds = sorted({s for g in groups for s in g.seeds})
    lines = [f"# {name}", "",
             f"Top-1 % on the evaluation images; mean ± std over seeds {seeds} where several ran. "
             f"Calibration sizes: {sizes}.", ""]
    find = {(g.model, g.method, g.w_bits, g.a_bits, g.num_calib): g for g in groups}
    for n in sizes:
        suffix = f" ({n} calibration images)" if len(sizes) > 1 else f" ({n} calibration images)"
        for method in methods:
            lines += [f"## {method}{suffix}", ""]
            rows = []
            for model in models:
                row = [model, f"{fp32[model]:.2f}"]
                for w, a in bits:
                    g = find.get((model, method, w, a, n))
                    row.append(g.cell() if g else "")
                rows.append(row)
            lines += _table(["model", "FP32"] + [f"W{w}A{a}" for w, a in bits], rows) + [""]
        lines += [f"## All methods{suffix}", ""]
        rows = []
        for model in models:
            row = [model, f"{fp32[model]:.2f}"]
            for method in methods:
                for w, a in bits:
                    g = find.get((model, method, w, a, n))
                    row.append(g.cell() if g else "")
            rows.append(row)
        lines += _table(["model", "FP32"] + [f"{m} W{w}A{a}" for m in methods for w, a in bits], rows) + [""]
        for model in models:
            lines += [f"## Ablation layout: {model}{suffix}", "", f"FP32 {fp32[model]:.2f}; cells top-1 (drop).", ""]
            rows = []
            for method in methods:
                gs = [find.get((model, method, w, a, n)) for w, a in bits]
                if any(gs):
                    rows.append([method] + [g.cell(with_drop=True) if g else "" for g in gs])
            lines += _table(["method"] + [f"W{w}A{a}" for w, a in bits], rows) + [""]
    if failed:
        lines += [f"## Failed cells ({len(failed)})", ""] + [f"- {f['cell']}: {f['error']}" for f in failed] + [""]
    return "\n".join(lines)


def to_csv(groups: list[Group]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "method", "bits", "num_calib", "seeds", "top1_mean", "top1_std", "drop_mean", "drop_std",
                "fp32_top1", "model_size_mb", "calib_seconds_mean"])
    for g in groups:
        m, s = g.mean_std
        d, ds = g.drop
        w.writerow([g.model, g.method, g.bits, g.num_calib, " ".join(map(str, g.seeds)), f"{m:.4f}", f"{s:.4f}",
                    f"{d:.4f}", f"{ds:.4f}", f"{statistics.fmean(g.fp32_top1):.4f}",
                    f"{statistics.fmean(g.size_mb):.4f}", f"{statistics.fmean(g.calib_seconds):.1f}"])
    return buf.getvalue()


def plot(groups: list[Group], out: Path) -> list[str]:
    """Top-1 vs model size per method; drop per model and method (bars, std as error bars)."""
    from .plots import _figure, _save
    plt = _figure()
    written = []
    methods = list(dict.fromkeys(g.method for g in groups))
    models = list(dict.fromkeys(g.model for g in groups))
    markers = "osD^v<>pX*"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [statistics.fmean(g.size_mb) for g in groups]
    spread = (max(sizes) - min(sizes)) or max(sizes)
    step = 0.012 * spread  # methods side by side at each size, so that equal points stay apart
    labels: dict[tuple, tuple] = {}  # one label per (model, bits): above its highest point
    for i, method in enumerate(methods):
        gs = sorted((g for g in groups if g.method == method), key=lambda g: statistics.fmean(g.size_mb))
        xs = [statistics.fmean(g.size_mb) + (i - (len(methods) - 1) / 2) * step for g in gs]
        ys = [g.mean_std[0] for g in gs]
        es = [g.mean_std[1] for g in gs]
        ax.errorbar(xs, ys, yerr=es, marker=markers[i % len(markers)], capsize=3, label=method, linestyle="none")
        for g, y, e in zip(gs, ys, es):
            key = (g.model, g.bits)
            top = labels.get(key, (0.0, -1e9))[1]
            labels[key] = (statistics.fmean(g.size_mb), max(top, y + e))
    for (model, bits), (x, y) in labels.items():
        ax.annotate(bits if len(models) == 1 else f"{model} {bits}", (x, y), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("model size (MB; quantized weights at their bit-width, the rest FP32)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Top-1 vs model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(str(_save(fig, out / "accuracy_vs_size.png")))

    # one colour per method (as in the plot above), one hatch per bit setting
    all_bits = sorted({g.bits for g in groups}, reverse=True)
    hatches = ["", "///", "...", "xxx", "\\\\\\", "ooo"]
    series = [(m, b) for m in methods for b in all_bits if any(g.method == m and g.bits == b for g in groups)]
    find = {(g.model, g.method, g.bits): g for g in groups}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 + 0.5 * len(series) * len(models)), 4.5))
    width = 0.8 / max(1, len(series))
    annotate = len(series) * len(models) <= 32
    for j, (m, b) in enumerate(series):
        xs, ds, es = [], [], []
        for i, model in enumerate(models):
            g = find.get((model, m, b))
            if g:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ds.append(g.drop[0])
                es.append(g.drop[1])
        k = all_bits.index(b)
        bars = ax.bar(xs, ds, width, yerr=es, capsize=2, label=f"{m} {b}", color=f"C{methods.index(m) % 10}",
                      hatch=hatches[k % len(hatches)], edgecolor="white" if k else None, linewidth=0)
        if annotate:
            ax.bar_label(bars, labels=[f"{d:.1f}" for d in ds], fontsize=6, padding=2)
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("top-1 drop vs FP32 (points)")
    ax.set_title("Top-1 drop per model and method")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    written.append(str(_save(fig, out / "drop_per_model.png")))
    return written


def render_report(out: str | Path) -> dict:
    """Write ``report.md``, ``report.csv`` and the PNG plots into ``out``; returns what was written."""
    out = Path(out)
    groups, failed, fp32 = collect(out)
    if not groups:
        raise VitquantError(f"no finished cells in {out}/cells; nothing to report")
    name = json.loads((out / "sweep.json").read_text()).get("name", out.name)
    md = markdown(groups, failed, fp32, name)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.csv", to_csv(groups))
    pngs = plot(groups, out)
    return {"markdown": str(out / "report.md"), "csv": str(out / "report.csv"), "plots": pngs,
            "groups": len(groups), "failed": len(failed), "text": md}
