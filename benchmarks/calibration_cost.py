"""Calibration time, peak memory and simulated-quantization evaluation overhead.

PTQ4ViT W8A8, 32 calibration images, CPU threads as given (default 2). Each model runs in its own
process so that peak RSS (measured right after calibration, before evaluation data is loaded)
belongs to that model alone. DeiT-Tiny uses the shared weights, DeiT-Small random init (timing only).
Writes ``cost.json`` and ``cost.md`` into ``--out``.

    python benchmarks/calibration_cost.py      # ~8 min on 2 CPU cores
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from common import base_parser, load_data, log, peak_rss_gb, setup

MODELS = [("deit_tiny_patch16_224", True), ("deit_small_patch16_224", False)]


def child(args) -> dict:
    setup(args.threads)
    from vitquant import get_recipe, quantize
    from vitquant.data import load_images
    from vitquant.evaluate import compare
    from vitquant.models import data_config_for, load_model
    from vitquant.quantizers.kernels import fused_kernels_enabled
    from pathlib import Path

    model, info = load_model(args.model, args.checkpoint if args.shared_weights else None, pretrained=False)
    sample = Path(args.sample)
    calib = load_images(sample / "images", data_config_for(model), list_file=sample / "splits" / "calib.txt",
                        limit=args.num_calib, progress=False)
    rss_before = peak_rss_gb()
    cfg = get_recipe(args.method, args.bits, args.bits)
    t0 = time.perf_counter()
    model, report = quantize(model, calib, cfg, progress=False)
    calib_s = time.perf_counter() - t0
    rss_calib = peak_rss_gb()
    _, evalset = load_data(model, args.sample, 1, args.num_eval)
    c = compare(model, evalset, progress=False)
    return dict(model=args.model, weights=info["weights"], method=args.method, bits=args.bits,
                num_calib=len(calib), num_eval=len(evalset), threads=args.threads,
                calib_seconds=round(calib_s, 1), gradient_seconds=round(report.gradient_seconds, 1),
                peak_rss_gb_calibration=round(rss_calib, 3), rss_gb_before_calibration=round(rss_before, 3),
                fp32_eval_seconds=round(c.fp32_seconds, 2), quant_eval_seconds=round(c.quant_seconds, 2),
                eval_overhead=round(c.quant_seconds / c.fp32_seconds, 3),
                quant_eval_warmup_seconds=round(c.quant_warmup_seconds, 2), fused_kernels=fused_kernels_enabled(),
                fp32_top1=round(c.fp32_top1, 2), quant_top1=round(c.quant_top1, 2), config=cfg.to_dict())


def main():
    p = base_parser(__doc__)
    p.add_argument("--method", default="ptq4vit")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--model")
    p.add_argument("--shared-weights", action="store_true")
    p.add_argument("--child", action="store_true", help="internal: measure one model in this process")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from vitquant.io import atomic_write_json, atomic_write_text
    from vitquant.report import environment
    results = []
    for model, shared in MODELS:
        cmd = [sys.executable, __file__, "--child", "--model", model, "--method", args.method, "--bits",
               str(args.bits), "--threads", str(args.threads), "--num-calib", str(args.num_calib),
               "--sample", args.sample, "--checkpoint", args.checkpoint]
        if args.num_eval:
            cmd += ["--num-eval", str(args.num_eval)]
        if shared:
            cmd.append("--shared-weights")
        log(f"running {model} ...")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        log(json.dumps(results[-1]))
    atomic_write_json(f"{args.out}/cost.json", dict(environment=environment(), results=results))
    lines = ["| model | weights | calibration (s) | peak RSS (GB) | FP32 eval (s) | quant eval (s) | overhead "
             "| quant warm-up (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['weights']} | {r['calib_seconds']} | {r['peak_rss_gb_calibration']} | "
                     f"{r['fp32_eval_seconds']} | {r['quant_eval_seconds']} | {r['eval_overhead']}x | "
                     f"{r['quant_eval_warmup_seconds']} |")
    text = (f"{args.method} W{args.bits}A{args.bits}, {args.num_calib} calibration images, "
            f"{args.threads} CPU threads. Evaluation times exclude one untimed warm-up forward; the quant "
            f"warm-up column is that forward (it compiles the fused quantization kernels).\n\n" + "\n".join(lines) + "\n")
    atomic_write_text(f"{args.out}/cost.md", text)
    print(text)


if __name__ == "__main__":
    main()
