"""Evaluation data path: vitquant's loader vs timm's ``create_loader`` on the same images and machine.

For the evaluation split (``--num-eval`` images) and DeiT-Tiny FP32 (shared weights), side by side:

- ``timm``: ``timm.data.create_dataset`` + ``create_loader`` (eval transforms of the model's data
  config, ``--workers`` worker processes), the loader alone and loader + model forward;
- ``vitquant, cold``: ``load_images`` decoding every JPEG (``--workers`` worker processes) into the
  cropped uint8 tensor, then evaluation (normalisation per batch);
- ``vitquant, cached``: the same with the preprocessed tensors from the on-disk cache.

Images/s, median of ``--repeats`` runs; writes ``loader.json`` / ``.md`` into ``--out``.

    python benchmarks/loader.py
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import base_parser, log, setup


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = base_parser(__doc__)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    setup(args.threads)
    import timm
    from timm.data import create_dataset, create_loader, resolve_data_config

    from vitquant.data import load_images, read_list
    from vitquant.evaluate import predict_top5
    from vitquant.io import atomic_write_json, atomic_write_text
    from vitquant.models import data_config_for, load_model
    from vitquant.report import environment

    sample = Path(args.sample)
    names = read_list(sample / "splits" / "eval.txt")[:args.num_eval]
    model, info = load_model("deit_tiny_patch16_224", args.checkpoint)
    dc = data_config_for(model)
    n = len(names)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the same files for timm: a folder of links to exactly these images
        folder = Path(tmp) / "images" / "all"
        folder.mkdir(parents=True)
        for name in names:
            os.symlink((sample / "images" / name).resolve(), folder / name)
        cfg = resolve_data_config({}, model=model)
        dataset = create_dataset("", root=str(Path(tmp) / "images"), split="validation")
        loader = create_loader(dataset, input_size=cfg["input_size"], batch_size=args.batch_size, is_training=False,
                               interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                               crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center"),
                               num_workers=args.workers, use_prefetcher=False, device=torch.device("cpu"))

        def timm_loader_only():
            for x, _ in loader:
                pass

        @torch.no_grad()
        def timm_eval():
            for x, _ in loader:
                model(x)

        rows["timm create_loader, loader only"] = timed(timm_loader_only, args.repeats)
        rows["timm create_loader + FP32 model"] = timed(timm_eval, args.repeats)

        cache = Path(tmp) / "cache"
        os.environ["VITQUANT_CACHE_DIR"] = str(cache)

        def vq_decode(use_cache):
            return load_images(sample / "images", dc, names=names, use_cache=use_cache, workers=args.workers,
                               progress=False, require_labels=True)

        rows["vitquant load_images (decode), loader only"] = timed(lambda: vq_decode(False), args.repeats)

        def vq_cold_eval():
            images = vq_decode(False)
            predict_top5(model, images, args.batch_size, progress=False, warmup=False)

        rows["vitquant decode + FP32 model"] = timed(vq_cold_eval, args.repeats)
        vq_decode(True)  # fill the preprocessed-tensor cache

        def vq_cached_eval():
            images = vq_decode(True)
            predict_top5(model, images, args.batch_size, progress=False, warmup=False)

        rows["vitquant cached tensors, loader only"] = timed(lambda: vq_decode(True), args.repeats)
        rows["vitquant cached tensors + FP32 model"] = timed(vq_cached_eval, args.repeats)
    result = {"images": n, "workers": args.workers, "threads": args.threads, "batch_size": args.batch_size,
              "repeats": args.repeats, "model": "deit_tiny_patch16_224", "weights": info,
              "timm_version": timm.__version__, "environment": environment(),
              "rows": [{"pipeline": k, "seconds": round(v, 3), "images_per_s": round(n / v, 1)} for k, v in rows.items()]}
    md = [f"FP32 evaluation data path, {n} images of the evaluation split, DeiT-Tiny, {args.workers} loader workers, "
          f"{args.threads} threads, median of {args.repeats} runs.", "",
          "| pipeline | seconds | images/s |", "|---|---|---|"]
    md += [f"| {r['pipeline']} | {r['seconds']:.2f} | {r['images_per_s']:.1f} |" for r in result["rows"]]
    atomic_write_json(f"{args.out}/loader.json", result)
    atomic_write_text(f"{args.out}/loader.md", "\n".join(md) + "\n")
    log("\n".join(md))


if __name__ == "__main__":
    main()
