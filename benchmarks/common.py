"""Shared set-up of the benchmarks: the shared DeiT-Tiny weights and the ImageNet sample."""
from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITQUANT_SHARED", ROOT.parent / "shared"))
SAMPLE = SHARED / "data" / "imagenet-sample"
DEIT_TINY = SHARED / "models" / "deit_tiny_patch16_224.safetensors"


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--checkpoint", default=str(DEIT_TINY))
    p.add_argument("--sample", default=str(SAMPLE), help="ImageNet sample dir with images/ and splits/")
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument("--num-eval", type=int, default=None, help="first N images of splits/eval.txt (default all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results"))
    return p


def setup(threads: int) -> None:
    from vitquant.runtime import tune_runtime
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tune_runtime()


def load_data(model, sample: str, num_calib: int, num_eval: int | None, progress: bool = False,
              calib_seed: int | None = None):
    """Calibration images (the first ``num_calib`` of splits/calib.txt, or with ``calib_seed`` a
    seeded random draw of them) and evaluation images (the first ``num_eval`` of splits/eval.txt)."""
    from vitquant.data import load_images
    from vitquant.models import data_config_for
    sample = Path(sample)
    dc = data_config_for(model)
    calib = load_images(sample / "images", dc, list_file=sample / "splits" / "calib.txt",
                        limit=num_calib if calib_seed is None else None, progress=progress)
    if calib_seed is not None:
        calib = calib.subset(num_calib, calib_seed)
    evalset = load_images(sample / "images", dc, list_file=sample / "splits" / "eval.txt", limit=num_eval,
                          require_labels=True, progress=progress)
    return calib, evalset


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
