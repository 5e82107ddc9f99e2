"""PTQ4ViT ablation on DeiT-Tiny with the shared weights (the reference README's ablation table).

Rows: every combination of Hessian guidance (off = cosine distance), softmax twin and GELU twin,
plus BasePTQ, the Hessian-vs-MSE objective, and the exhaustive search (no two-stage screening).
Columns: W8A8 and W6A6. Writes ``ablation.json`` and ``ablation.md`` into ``--out``.

    python benchmarks/ptq4vit_ablation.py            # ~45 min on 2 CPU cores
"""
from __future__ import annotations

import itertools
import json
import time

import torch

from common import base_parser, load_data, log, peak_rss_gb, setup


def rows():
    for h, s, g in itertools.product([False, True], repeat=3):
        yield (f"H={'on' if h else 'off'} S={'on' if s else 'off'} G={'on' if g else 'off'}", "ptq4vit",
               dict(objective="hessian" if h else "cosine", softmax_twin=s, gelu_twin=g))
    yield "BasePTQ", "base", {}
    yield "PTQ4ViT, MSE objective", "ptq4vit", dict(objective="mse")
    yield "PTQ4ViT, exhaustive search", "ptq4vit", dict(screen_images=0)


def main():
    p = base_parser(__doc__)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6])
    p.add_argument("--only", nargs="*", help="run only rows whose label contains one of these strings")
    args = p.parse_args()
    setup(args.threads)
    from vitquant import get_recipe, quantize, quantization_disabled
    from vitquant.evaluate import compare, model_size_mb, predict_top5, topk_accuracy
    from vitquant.io import atomic_write_json, atomic_write_text
    from vitquant.models import load_model
    from vitquant.nn import wrap_model
    from vitquant.report import environment

    model, info = load_model("deit_tiny_patch16_224", args.checkpoint)
    calib, evalset = load_data(model, args.sample, args.num_calib, args.num_eval, progress=True)
    wrap_model(model)
    with quantization_disabled(model):
        fp32 = predict_top5(model, evalset, progress=False)
    fp_top1 = topk_accuracy(fp32.top5, evalset.labels)[0]
    log(f"FP32 top-1 {fp_top1:.2f} on {len(evalset)} images")
    results = []
    out = f"{args.out}/ablation"
    for label, method, over in rows():
        if args.only and not any(o in label for o in args.only):
            continue
        for bits in args.bits:
            model, _ = load_model("deit_tiny_patch16_224", args.checkpoint)
            cfg = get_recipe(method, bits, bits, **over)
            t0 = time.perf_counter()
            model, report = quantize(model, calib, cfg, progress=False)
            calib_s = time.perf_counter() - t0
            c = compare(model, evalset, fp32=fp32, progress=False)
            r = dict(row=label, method=method, w_bits=bits, a_bits=bits, fp32_top1=c.fp32_top1,
                     quant_top1=c.quant_top1, top1_drop=c.top1_drop, top1_agreement=c.top1_agreement,
                     quant_top5=c.quant_top5, model_size_mb=model_size_mb(model), calib_seconds=calib_s,
                     eval_seconds=c.quant_seconds, fp32_eval_seconds=c.fp32_seconds, config=cfg.to_dict(),
                     scales={n: [q.scale.tolist() for q in op.quantizers().values()]
                             for n, op in model.named_modules() if hasattr(op, "quantizers")})
            results.append(r)
            log(f"{label:32s} W{bits}A{bits}: top-1 {c.quant_top1:.2f} (drop {c.top1_drop:+.2f}) "
                f"calib {calib_s:.0f}s")
            meta = dict(model="deit_tiny_patch16_224", weights=info, num_calib=len(calib), num_eval=len(evalset),
                        calib_names=calib.names, eval_list=str(args.sample) + "/splits/eval.txt",
                        eval_names_sha256=evalset.describe()["names_sha256"], environment=environment(),
                        peak_rss_gb=peak_rss_gb())
            atomic_write_json(out + ".json", dict(meta=meta, results=results))
    atomic_write_text(out + ".md", markdown(results, fp_top1, len(calib), len(evalset)))
    print(markdown(results, fp_top1, len(calib), len(evalset)))


def markdown(results, fp_top1, n_calib, n_eval) -> str:
    bits = sorted({r["w_bits"] for r in results}, reverse=True)
    lines = [f"DeiT-Tiny (shared weights), {n_calib} calibration images, {n_eval} evaluation images, "
             f"FP32 top-1 {fp_top1:.2f} %. Cells: top-1 % (drop).", "",
             "| configuration | " + " | ".join(f"W{b}A{b}" for b in bits) + " |",
             "|---|" + "---|" * len(bits)]
    for label in dict.fromkeys(r["row"] for r in results):
        cells = []
        for b in bits:
            r = next((r for r in results if r["row"] == label and r["w_bits"] == b), None)
            cells.append("" if r is None else f"{r['quant_top1']:.2f} ({r['top1_drop']:+.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
