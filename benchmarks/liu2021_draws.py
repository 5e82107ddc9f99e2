"""Liu et al. 2021, mixed vs single precision over several calibration draws.

Reads result files of ``liu2021_ablation.py`` (one per calibration draw: the first N images of
splits/calib.txt, or ``--calib-seed S``), and writes per row the top-1 and top-1 agreement with
FP32 of every draw, their mean and standard deviation, and the paired difference to the
single-precision row of the same draw. No model is run.

    python benchmarks/liu2021_draws.py results/liu2021_table3_n32.json results/liu2021_mp_seed*.json \\
        --bits 6 --name liu2021_mp_draws
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import ROOT

SINGLE = "similarity + ranking + bias correction"


def draw_label(row: dict) -> str:
    seed = row.get("calib_seed")
    return f"first {row['num_calib']}" if seed is None else f"seed {seed}"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(files: list[str], bits: int) -> dict:
    """{row label: {draw: (top-1, agreement)}} for the rows present in every draw, plus statistics."""
    per_row: dict[str, dict[str, tuple[float, float]]] = {}
    draws: list[str] = []
    fp32 = None
    for f in files:
        for r in json.loads(Path(f).read_text())["results"]:
            if r["w_bits"] != bits:
                continue
            d = draw_label(r)
            if d not in draws:
                draws.append(d)
            fp32 = r["fp32_top1"]
            per_row.setdefault(r["row"], {})[d] = (r["quant_top1"], r["top1_agreement"])
    if SINGLE not in per_row:
        raise SystemExit(f"no single-precision row ({SINGLE!r}) at W{bits}A{bits} in the given files")
    rows = {k: v for k, v in per_row.items() if set(v) == set(draws)}
    left_out = sorted(set(per_row) - set(rows))
    table = []
    for label, by_draw in rows.items():
        top1 = [by_draw[d][0] for d in draws]
        agree = [by_draw[d][1] for d in draws]
        gain = [by_draw[d][0] - rows[SINGLE][d][0] for d in draws]
        table.append(dict(row=label, top1=top1, agreement=agree, top1_mean_std=mean_std(top1),
                          agreement_mean_std=mean_std(agree), gain_over_single=gain,
                          gain_mean_std=mean_std(gain), draws_better=sum(g > 0 for g in gain),
                          draws_worse=sum(g < 0 for g in gain)))
    return dict(bits=bits, fp32_top1=fp32, draws=draws, files=files, rows=table, rows_left_out=left_out)


def markdown(s: dict) -> str:
    b = s["bits"]
    lines = [f"DeiT-Tiny (shared weights), W{b}A{b}, FP32 top-1 {s['fp32_top1']:.2f} %, calibration draws: "
             + ", ".join(s["draws"]) + ". Cells: top-1 % [top-1 agreement with FP32 %].", "",
             "| configuration | " + " | ".join(s["draws"]) + " | mean ± std | vs single precision (mean, better/worse draws) |",
             "|---|" + "---|" * (len(s["draws"]) + 2)]
    for r in s["rows"]:
        cells = [f"{t:.2f} [{a:.2f}]" for t, a in zip(r["top1"], r["agreement"])]
        (m, sd), (am, asd), (g, _) = r["top1_mean_std"], r["agreement_mean_std"], r["gain_mean_std"]
        vs = "-" if r["row"] == SINGLE else f"{g:+.2f} ({r['draws_better']}/{r['draws_worse']})"
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {m:.2f} ± {sd:.2f} [{am:.2f} ± {asd:.2f}] | {vs} |")
    if s["rows_left_out"]:
        lines += ["", "Rows not run on every draw, left out: " + "; ".join(s["rows_left_out"])]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="liu2021_ablation.py result JSON files, one per calibration draw")
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--name", default="liu2021_mp_draws")
    args = p.parse_args()
    from vitquant.io import atomic_write_json, atomic_write_text
    s = summarise(args.files, args.bits)
    text = markdown(s)
    atomic_write_json(f"{args.out}/{args.name}.json", s)
    atomic_write_text(f"{args.out}/{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
