"""Ablation of block reconstruction (issue 19) on the flagship at W4A4: QDrop on / off, MSE vs Fisher
loss, the iteration budget, each on the same calibrated model.

DeiT-Tiny (shared weights), ``vitq`` W4A4 calibrated once on 32 images drawn from splits/calib.txt
with ``--seed`` (as the sweep's cell ``deit_tiny__vitq_recon__w4a4__n32__s<seed>``), then every
variant reconstructs a copy of that calibrated model on the same images and is evaluated on the 872
images of splits/eval.txt. The ``default`` variant is the sweep cell's configuration (the pipeline
runs the same ``reconstruct`` on the same calibrated model: ``tests/test_reconstruction.py``), so it
reproduces that cell up to the keep-better guard (newer than the seed-0 cell) and the CPU's float
rounding. Steps, each resumable (a finished step's JSON is kept and skipped):

    python benchmarks/recon_ablation.py --step calibrate            # ~20-30 min at 2 threads
    python benchmarks/recon_ablation.py --step default --threads 1  # ~25 min each at 1 thread;
    python benchmarks/recon_ablation.py --step no_qdrop --threads 1 #   two side by side on 2 cores
    python benchmarks/recon_ablation.py --report                    # table -> recon_ablation.md
    python benchmarks/recon_ablation.py                              # everything, in order

The calibrated model is kept as a pickled module in ``--work`` (a cache of this benchmark, not a
deployment format: ``vitquant.save`` is); its JSON records the weights hash, config, image names,
package versions and CPU. Results go to ``--out``/recon_ablation/.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from common import ROOT, base_parser, load_data, log, setup

# name -> ReconstructionConfig fields that differ from the default (200 iterations x 16 on CPU,
# QDrop 0.5, MSE loss, seed 0)
VARIANTS = {
    "default": {},
    "no_qdrop": {"drop_prob": 0.0},
    "fisher": {"loss": "fisher"},
    "iters100": {"iters": 100},
    "iters400": {"iters": 400},
    "iters800": {"iters": 800},
    "images128": {"images": 128},  # reconstruct on all 128 images of splits/calib.txt (--recon-images 128)
    "no_guard": {"keep_better": False},  # commit what was learned even where a unit got worse (BRECQ)
    "recon_seed1": {"seed": 1},  # the default with another reconstruction seed (batches, QDrop masks): its noise
}


def _paths(args):
    work = Path(args.work)
    out = Path(args.out) / "recon_ablation"
    tag = f"vitq_w{args.bits}a{args.bits}_s{args.seed}"
    return work / f"{tag}_calibrated.pt", out / f"{tag}_calibrated.json", out, tag


def _data(args, recon_images: int = 0):
    """The model, its weights info, the calibration draw, the evaluation images, and the reconstruction
    images: the first ``recon_images`` of the same seeded draw (as the CLI's ``--recon-images``; a
    superset of the calibration images), else the calibration images."""
    from vitquant.models import load_model
    model, info = load_model("deit_tiny_patch16_224", args.checkpoint, pretrained=False)
    draw, evalset = load_data(model, args.sample, max(args.num_calib, recon_images), args.num_eval,
                              calib_seed=args.seed)
    return model, info, draw.subset(args.num_calib), evalset, draw if recon_images else draw.subset(args.num_calib)


def _result_common(args, info, calib, evalset) -> dict:
    from vitquant import __version__
    from vitquant.report import environment
    return {"model": "deit_tiny_patch16_224", "weights": info, "w_bits": args.bits, "a_bits": args.bits,
            "seed": args.seed, "threads": args.threads,
            "calib_data": {"list": "splits/calib.txt", "names": calib.names},
            "eval_data": {"list": "splits/eval.txt", "num": len(evalset)},
            "vitquant_version": __version__, "environment": environment()}


def calibrate_step(args) -> dict:
    from vitquant import get_recipe, quantize
    from vitquant.evaluate import compare
    from vitquant.io import atomic_write_json
    pt, meta, out, tag = _paths(args)
    if meta.exists() and pt.exists():
        log(f"{meta} exists; calibration skipped")
        return json.loads(meta.read_text())
    model, info, calib, evalset, _ = _data(args)
    cfg = get_recipe("vitq", args.bits, args.bits)
    t0 = time.perf_counter()
    model, report = quantize(model, calib, cfg, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    c = compare(model, evalset, progress=not args.quiet)
    pt.parent.mkdir(parents=True, exist_ok=True)
    tmp = pt.with_suffix(".tmp")
    torch.save(model, tmp)
    tmp.replace(pt)
    result = _result_common(args, info, calib, evalset) | {
        "step": "calibrate", "config": cfg.to_dict(), "calib_seconds": round(seconds, 1),
        "fp32_top1": round(c.fp32_top1, 2), "quant_top1": round(c.quant_top1, 2),
        "pickle_sha256": hashlib.sha256(pt.read_bytes()).hexdigest()}
    atomic_write_json(meta, result)
    log(json.dumps({k: result[k] for k in ("calib_seconds", "fp32_top1", "quant_top1")}))
    return result


def variant_step(args, name: str) -> dict:
    from vitquant.calibration.reconstruction import ReconstructionConfig, reconstruct
    from vitquant.evaluate import compare
    from vitquant.io import atomic_write_json
    pt, meta, out, tag = _paths(args)
    dest = out / f"{tag}_{name}.json"
    if dest.exists():
        log(f"{dest} exists; skipped")
        return json.loads(dest.read_text())
    if not meta.exists():
        raise SystemExit(f"run --step calibrate first ({meta} missing)")
    calibrated = json.loads(meta.read_text())
    if hashlib.sha256(pt.read_bytes()).hexdigest() != calibrated["pickle_sha256"]:
        raise SystemExit(f"{pt} does not match {meta}")
    model = torch.load(pt, weights_only=False)
    knobs = dict(VARIANTS[name])
    _, info, calib, evalset, images = _data(args, knobs.pop("images", 0))
    rc = ReconstructionConfig(**({"seed": args.seed} | knobs))
    t0 = time.perf_counter()
    rep = reconstruct(model, images.tensors(), rc, batch_size=32, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    c = compare(model, evalset, progress=not args.quiet)
    result = _result_common(args, info, calib, evalset) | {
        "step": name, "reconstruction": {k: (list(v) if isinstance(v, tuple) else v)
                                         for k, v in rc.__dict__.items()},
        "iters": rep["iters"], "recon_batch": rep["batch_size"],
        "recon_data": {"list": "splits/calib.txt", "names": images.names},
        "recon_seconds": round(seconds, 1), "calib_seconds": calibrated["calib_seconds"],
        "calibrated_top1": calibrated["quant_top1"], "fp32_top1": round(c.fp32_top1, 2),
        "quant_top1": round(c.quant_top1, 2), "top1_drop": round(c.fp32_top1 - c.quant_top1, 2),
        "mean_error_before": rep["mean_error_before"], "mean_error_after": rep["mean_error_after"],
        "units_kept_calibration": sorted(u for u, i in rep["units"].items() if i.get("kept_calibration")),
        "units": rep["units"]}
    atomic_write_json(dest, result)
    log(json.dumps({k: result[k] for k in ("step", "recon_seconds", "quant_top1", "mean_error_after")}))
    return result


def report_step(args) -> None:
    from vitquant.io import atomic_write_text
    pt, meta, out, tag = _paths(args)
    rows = ["| variant | iterations x batch | images | QDrop p | loss | guard | seed | recon (s) | mean unit error after "
            "| top-1 | drop |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cal = json.loads(meta.read_text()) if meta.exists() else None
    if cal:
        rows.append(f"| calibration only | - | - | - | - | - | - | - | - | {cal['quant_top1']:.2f} | "
                    f"{cal['fp32_top1'] - cal['quant_top1']:.2f} |")
    cpu = None
    for name in VARIANTS:
        f = out / f"{tag}_{name}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        cpu = r["environment"].get("processor")
        rc = r["reconstruction"]
        rows.append(f"| {name} | {r['iters']} x {r['recon_batch']} | {len(r['recon_data']['names'])} | "
                    f"{rc['drop_prob']} | {rc['loss']} | {'on' if rc['keep_better'] else 'off'} | {rc['seed']} | "
                    f"{r['recon_seconds']:.0f} | {r['mean_error_after']:.4f} | {r['quant_top1']:.2f} | "
                    f"{r['top1_drop']:.2f} |")
    where = "?" if cpu is None else (f"{cpu['model']} (family/model/stepping {cpu['family_model_stepping']}, "
                                     f"AVX-512 VNNI: {cpu['isa']['avx512_vnni']})")
    n_cal = len(cal["calib_data"]["names"]) if cal else "?"
    text = (f"DeiT-Tiny vitq W{args.bits}A{args.bits}, calibration seed {args.seed}, {n_cal} calibration images, "
            f"FP32 {cal['fp32_top1'] if cal else '?'} on splits/eval.txt; CPU: {where}\n\n" + "\n".join(rows) + "\n")
    atomic_write_text(out / f"{tag}.md", text)
    print(text)


def main():
    p = base_parser(__doc__)
    p.set_defaults(out=str(ROOT / "results"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="calibration draw and reconstruction seed")
    p.add_argument("--work", default=str(ROOT / ".cache" / "recon_ablation"))
    p.add_argument("--step", choices=["calibrate", *VARIANTS], help="one step (default: all)")
    p.add_argument("--report", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    setup(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the CLI
    if args.report:
        report_step(args)
        return
    if args.step == "calibrate":
        calibrate_step(args)
    elif args.step:
        variant_step(args, args.step)
    else:
        calibrate_step(args)
        for name in VARIANTS:
            variant_step(args, name)
        report_step(args)


if __name__ == "__main__":
    main()
