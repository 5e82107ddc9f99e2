"""Real-weight accuracy (slow: minutes). Run with ``python -m pytest -m slow``.

DeiT-Tiny with the shared ImageNet-1k weights, 32 calibration images of ``splits/calib.txt``,
evaluation on ``splits/eval.txt`` (FP32 80.05 %).
"""
import json
import os
from pathlib import Path

import pytest

from vitquant.cli import main

SHARED = Path(os.environ.get("VITQUANT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CKPT = SHARED / "models" / "deit_tiny_patch16_224.safetensors"
SAMPLE = SHARED / "data" / "imagenet-sample"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CKPT.is_file(), reason="shared DeiT-Tiny weights not available")]


def quantize(method, bits, tmp_path):
    out = tmp_path / f"{method}{bits}.json"
    code = main(["quantize", "deit_tiny_patch16_224", "--method", method, "--w-bits", str(bits), "--a-bits",
                 str(bits), "--checkpoint", str(CKPT), "--calib-data", str(SAMPLE / "images"),
                 "--calib-list", str(SAMPLE / "splits" / "calib.txt"), "--eval-data", str(SAMPLE / "images"),
                 "--eval-list", str(SAMPLE / "splits" / "eval.txt"), "--quiet", "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_fp32_reference_and_ptq4vit_w8a8_drop(tmp_path):
    r = quantize("ptq4vit", 8, tmp_path)
    assert r["fp32_top1"] == pytest.approx(80.05, abs=0.01)  # 698 / 872, the shared README's figure
    assert r["top1_drop"] <= 0.5


def test_ptq4vit_w6a6_beats_baseptq_w6a6(tmp_path):
    ptq4vit = quantize("ptq4vit", 6, tmp_path)
    base = quantize("base", 6, tmp_path)
    assert ptq4vit["top1_drop"] <= 2.5
    assert base["quant_top1"] < ptq4vit["quant_top1"]


def test_two_scaled_quantizers_beat_uniform_on_real_activations():
    """V-2SF (post-softmax) and O-2SF (LayerNorm input) reach a lower best error than plain uniform
    at the same bit-width on DeiT-Tiny's own activations."""
    import sys

    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tsptq import _best_error

    from vitquant.data import load_images
    from vitquant.models import data_config_for, load_model
    from vitquant.nn import wrap_model
    from vitquant.quantizers import OutlierTwoScaleQuantizer, UniformQuantizer, ValueTwoScaleQuantizer
    model, _ = load_model("deit_tiny_patch16_224", CKPT)
    images = load_images(SAMPLE / "images", data_config_for(model), list_file=SAMPLE / "splits" / "calib.txt",
                         limit=2).tensors()
    wrap_model(model)
    acts = {}
    blk = model.blocks[6]
    blk.attn.matmul_av.register_forward_hook(lambda m, a, o: acts.__setitem__("softmax", a[0]))
    blk.norm1.register_forward_hook(lambda m, a, o: acts.__setitem__("ln", a[0]))
    with torch.no_grad():
        model(images)
    for bits in (6, 8):
        v2 = _best_error(ValueTwoScaleQuantizer(bits, groups=3, group_dim=1), acts["softmax"])[0]
        uni = _best_error(UniformQuantizer(bits, signed=False, groups=3, group_dim=1), acts["softmax"])[0]
        assert v2 < uni / 2, (bits, v2, uni)
        o2 = _best_error(OutlierTwoScaleQuantizer(bits, 192), acts["ln"])[0]
        uln = _best_error(UniformQuantizer(bits), acts["ln"])[0]
        assert o2 < uln / 2, (bits, o2, uln)


def test_tsptq_fully_quantized_w8a8_drop(tmp_path):
    r = quantize("tsptq", 8, tmp_path)
    assert r["setting"] == "full" and len(r["layernorm_outliers"]) == 25
    assert r["top1_drop"] <= 0.5  # TSPTQ-ViT's claim for 8-bit fully quantized ViTs
