"""Peak memory of calibration on a large model (issue 7): ViT-B/16 (random init), 32 calibration images.

Gradients for the Hessian objective are collected for the whole model first; then the engine
calibrates unit by unit, and every transformer block of ViT-B holds tensors of the same shapes. So
the peak resident memory is reached in the gradient pass or the first block, and ``--units K``
calibrates only the first K units (patch embedding + K-1 blocks) to measure it in minutes rather
than the hours the full run takes on 2 cores; the report says how many units ran. With
``--max-memory GB`` the collected activations that would not fit go to disk-backed memory maps.

    python benchmarks/memory.py --units 3
    python benchmarks/memory.py --units 3 --max-memory 2
"""
from __future__ import annotations

import time

from common import base_parser, load_data, log, peak_rss_gb, setup


def main():
    p = base_parser(__doc__)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--method", default="ptq4vit")
    p.add_argument("--units", type=int, default=3, help="calibrate only the first K units (0: all)")
    p.add_argument("--max-memory", type=float, help="GB")
    p.add_argument("--name", default=None)
    args = p.parse_args()
    setup(args.threads)
    from vitquant import get_recipe, quantize
    from vitquant.calibration import engine
    from vitquant.io import atomic_write_json
    from vitquant.models import load_model
    from vitquant.nn.wrap import calibration_units
    from vitquant.report import environment

    model, info = load_model(args.model, pretrained=False)
    calib, _ = load_data(model, args.sample, args.num_calib, 1)
    from vitquant.recipes import attach_quantizers
    wrapped = __import__("vitquant").wrap_model(model)
    attach_quantizers(wrapped, get_recipe(args.method, 8, 8))
    all_units = len(calibration_units(wrapped))  # units with quantizers attached
    if args.units:  # the engine calibrates only the first K units (see the docstring)
        engine.calibration_units = lambda m: calibration_units(m)[:args.units]
    cfg = get_recipe(args.method, 8, 8)
    if args.max_memory:
        cfg = cfg.replace(memory_budget_mb=engine.MemoryBudget.search_chunk_mb(args.max_memory))
    rss_before = peak_rss_gb()
    t = time.perf_counter()
    _, report = quantize(model, calib, cfg, progress=True, max_memory_gb=args.max_memory)
    seconds = time.perf_counter() - t
    unit_seconds = sum(v["seconds"] for v in report.ops.values())
    result = dict(model=args.model, weights=info, method=args.method, num_calib=len(calib), units_run=args.units or all_units,
                  units_total=all_units, max_memory_gb=args.max_memory, peak_rss_gb=round(peak_rss_gb(), 3),
                  peak_rss_before_calibration_gb=round(rss_before, 3), offloaded_gb=round(report.offloaded_bytes / 1e9, 3),
                  gradient_seconds=round(report.gradient_seconds, 1), seconds=round(seconds, 1),
                  op_seconds=round(unit_seconds, 1), environment=environment(), config=cfg.to_dict())
    name = args.name or f"memory_{args.model}" + (f"_max{args.max_memory:g}gb" if args.max_memory else "")
    atomic_write_json(f"{args.out}/{name}.json", result)
    log(f"{args.model}, {len(calib)} images, {result['units_run']}/{all_units} units: peak RSS "
        f"{result['peak_rss_gb']:.2f} GB (before calibration {rss_before:.2f} GB), offloaded "
        f"{result['offloaded_gb']:.2f} GB, gradients {report.gradient_seconds:.0f} s, total {seconds:.0f} s")


if __name__ == "__main__":
    main()
