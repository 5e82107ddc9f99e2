"""Liu et al. 2021 ablation (Table 3 of the paper) and the Hessian-trace comparison (Table 4) on
DeiT-Tiny with the shared weights.

Rows: similarity (Pearson) only, + ranking loss, + bias correction, all three, all three with
nuclear-norm mixed precision at the model size of the target bit-width, the same with
Hessian-trace mixed precision, and similarity-only with mixed precision. Columns: the target bit-widths (W6A6, W8A8). Calibrations at each
bit-width are computed once per (configuration, calibration set) and shared by the single- and
mixed-precision rows. Writes ``liu2021_ablation.json`` / ``.md`` into ``--out`` after every row.

    python benchmarks/liu2021_ablation.py --calib-sizes 32 128 --bits 6 8
"""
from __future__ import annotations

import time

from common import base_parser, load_data, log, peak_rss_gb, setup

PARTS = {  # configuration key -> overrides of the liu2021 recipe
    "similarity": dict(ranking=None, bias_correction=False),
    "similarity + ranking": dict(bias_correction=False),
    "similarity + bias correction": dict(ranking=None),
    "similarity + ranking + bias correction": dict(),
}
ROWS = [  # (label, configuration key, MixedPrecisionConfig arguments or None); most important first
    ("similarity + ranking + bias correction", "similarity + ranking + bias correction", None),
    ("all (+ mixed precision)", "similarity + ranking + bias correction", dict()),
    ("similarity", "similarity", None),
    ("similarity + ranking", "similarity + ranking", None),
    ("similarity + bias correction", "similarity + bias correction", None),
    ("all, Hessian-trace mixed precision", "similarity + ranking + bias correction", dict(sensitivity="hessian")),
    # mixed precision on the partial configurations needs 5 more calibrations each; run with --only
    ("similarity + mixed precision", "similarity", dict()),
    ("all (+ mixed precision, module-output Omega)", "similarity + ranking + bias correction",
     dict(omega="module_output")),
    ("all (+ mixed precision, output-KL Omega)", "similarity + ranking + bias correction", dict(omega="output_kl")),
    # the same without measuring the bias correction again in the mixed model
    ("all (+ mixed precision), bias not re-measured", "similarity + ranking + bias correction",
     dict(remeasure_bias=False)),
    ("all (+ mixed precision, output-KL Omega), bias not re-measured", "similarity + ranking + bias correction",
     dict(omega="output_kl", remeasure_bias=False)),
]


def main():
    p = base_parser(__doc__)
    p.add_argument("--bits", type=int, nargs="+", default=[6, 8], help="target bit-widths")
    p.add_argument("--calib-sizes", type=int, nargs="+", default=[32])
    p.add_argument("--only", nargs="*", help="run only rows whose label is one of these (exact)")
    p.add_argument("--skip", nargs="*", default=[], help="skip rows whose label is one of these (exact)")
    p.add_argument("--name", default="liu2021_ablation", help="output file stem in --out")
    p.add_argument("--calib-seed", type=int, help="draw the calibration images at random with this seed "
                                                   "(default: the first N of splits/calib.txt)")
    p.add_argument("--work-dir", help="keep each (configuration, calibration size, bit-width) calibration here; "
                                      "a rerun with the same directory reuses them")
    args = p.parse_args()
    setup(args.threads)
    from vitquant import get_recipe, quantization_disabled
    from vitquant.api import apply_mixed_precision, calibrate_bit_widths
    from vitquant.evaluate import compare, model_size_mb, predict_top5, topk_accuracy
    from vitquant.io import atomic_write_json, atomic_write_text
    from vitquant.api import run_fingerprint
    from vitquant.calibration.checkpoint import CalibrationCheckpoint, restore
    from vitquant.models import load_model
    from vitquant.nn import quant_ops, wrap_model
    from vitquant.recipes import MixedPrecisionConfig
    from vitquant.report import environment

    out = f"{args.out}/{args.name}"
    results = []
    for n_calib in args.calib_sizes:
        model, info = load_model("deit_tiny_patch16_224", args.checkpoint)
        calib, evalset = load_data(model, args.sample, n_calib, args.num_eval, progress=True, calib_seed=args.calib_seed)
        wrap_model(model)
        with quantization_disabled(model):
            fp32 = predict_top5(model, evalset, progress=False)
        fp_top1 = topk_accuracy(fp32.top5, evalset.labels)[0]
        images = calib.tensors()
        states: dict = {}  # (configuration key) -> {bits: (state, report)}
        fingerprint = run_fingerprint(model, images, get_recipe("liu2021", 8, 8))  # before any calibration
        for label, key, mixed in ROWS:
            if args.only and label not in args.only or label in args.skip:
                continue
            for bits in args.bits:
                cfg = get_recipe("liu2021", bits, bits).replace(**PARTS[key])
                need = [bits] if mixed is None else MixedPrecisionConfig(**mixed).calibration_bits(bits)
                have = states.setdefault(key, {})
                todo = [b for b in need if b not in have]
                t0 = time.perf_counter()
                if todo:
                    ckpt = None
                    if args.work_dir:
                        fixed = get_recipe("liu2021", 8, 8).replace(**PARTS[key])  # the runs differ only in bits
                        seed = "" if args.calib_seed is None else f"_seed{args.calib_seed}"
                        ckpt = CalibrationCheckpoint(f"{args.work_dir}/n{n_calib}{seed}/{key.replace(' ', '')}",
                                                     fingerprint | {"config": fixed.to_dict()})
                    s, r = calibrate_bit_widths(model, images, cfg, todo, checkpoint=ckpt)
                    have.update({b: (s[b], r[b]) for b in todo})
                calib_new_s = time.perf_counter() - t0
                ops = quant_ops(model)
                mp = None
                if mixed is None:
                    restore(ops, have[bits][0])
                    calib_s = have[bits][1].seconds
                else:
                    mcfg = cfg.replace(mixed_precision=MixedPrecisionConfig(**mixed))
                    t1 = time.perf_counter()
                    rep = apply_mixed_precision(model, images, mcfg, {b: have[b][0] for b in need},
                                                {b: have[b][1] for b in need})
                    mp = rep.mixed_precision
                    mp["allocation_seconds"] = round(time.perf_counter() - t1, 2)
                    calib_s = sum(have[b][1].seconds for b in need) + mp["allocation_seconds"]
                c = compare(model, evalset, fp32=fp32, progress=False)
                r = dict(row=label, num_calib=n_calib, calib_seed=args.calib_seed, calib_names=calib.names,
                         w_bits=bits, a_bits=bits, fp32_top1=c.fp32_top1,
                         quant_top1=c.quant_top1, top1_drop=c.top1_drop, top1_agreement=c.top1_agreement,
                         quant_top5=c.quant_top5, model_size_mb=model_size_mb(model), calib_seconds=calib_s,
                         new_calibration_seconds=calib_new_s, config=cfg.to_dict(), mixed_precision=mp)
                results.append(r)
                log(f"{n_calib} images | {label:48s} W{bits}A{bits}: top-1 {c.quant_top1:.2f} "
                    f"(drop {c.top1_drop:+.2f}), {r['model_size_mb']:.3f} MB")
                meta = dict(model="deit_tiny_patch16_224", weights=info, num_eval=len(evalset),
                            eval_list=str(args.sample) + "/splits/eval.txt",
                            eval_names_sha256=evalset.describe()["names_sha256"], environment=environment(),
                            peak_rss_gb=peak_rss_gb(), fp32_top1=fp_top1)
                atomic_write_json(out + ".json", dict(meta=meta, results=results))
                atomic_write_text(out + ".md", markdown(results, fp_top1, len(evalset)))
    print(markdown(results, fp_top1, len(evalset)))


def markdown(results, fp_top1, n_eval) -> str:
    bits = sorted({r["w_bits"] for r in results})
    lines = [f"DeiT-Tiny (shared weights), {n_eval} evaluation images, FP32 top-1 {fp_top1:.2f} %. "
             "Cells: top-1 % (drop), model size MB.", ""]
    for n_calib in sorted({r["num_calib"] for r in results}):
        lines += [f"**{n_calib} calibration images**", "",
                  "| configuration | " + " | ".join(f"W{b}A{b} (target size)" for b in bits) + " |",
                  "|---|" + "---|" * len(bits)]
        rows = [r for r in results if r["num_calib"] == n_calib]
        for label in dict.fromkeys(r["row"] for r in rows):
            cells = []
            for b in bits:
                r = next((r for r in rows if r["row"] == label and r["w_bits"] == b), None)
                cells.append("" if r is None else
                             f"{r['quant_top1']:.2f} ({r['top1_drop']:+.2f}), {r['model_size_mb']:.2f} MB")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        for r in rows:
            mp = r["mixed_precision"]
            if mp:
                times = ", ".join(f"{k} {v:.1f} s" for k, v in mp["sensitivity_seconds"].items())
                lines.append(f"- {r['row']}, W{r['w_bits']}A{r['a_bits']}: sensitivity time {times}; "
                             f"perturbations {mp['perturbation_seconds']:.1f} s; bits per module (MSA, MLP per block) "
                             + " ".join(str(m["bits"]) for m in mp["modules"]))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
