import numpy as np
import pytest
import torch
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # timm classes 0..3


def tiny_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).eval()


def tiny_swin():
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2),
                           num_heads=(2, 4), num_classes=10).eval()


TINY_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)


def fused_and_eager(monkeypatch, quantizer, x):
    """``(eager, fused)`` outputs of ``quantizer`` on ``x``, with a fresh kernel-verification state."""
    from vitquant.quantizers import kernels
    monkeypatch.setattr(kernels, "_verified", {})
    monkeypatch.setitem(kernels._state, "failed", None)
    return eager_and_fused(quantizer, x)


def eager_and_fused(quantizer, x):
    """``(eager, fused)`` outputs of ``quantizer`` on ``x`` (inference: no autograd)."""
    from vitquant.quantizers import kernels
    with torch.no_grad():
        with kernels.fused_kernels(False):
            eager = quantizer(x)
        with kernels.fused_kernels(True):
            fused = quantizer(x)
    return eager, fused


def quantized_tiny_vit(x, bits=4):
    """A tiny ViT quantized with the base recipe (fast search), on images ``x``."""
    from vitquant import get_recipe, quantize
    return quantize(tiny_vit(), x, get_recipe("base", bits, bits, rounds=1, num_candidates=8), progress=False)[0]


def save_load_export(model, folder, x):
    """Save ``model`` (a tiny ViT), load it, export the loaded one (checked) and run it in ONNX
    Runtime: ``(loaded, loaded(x), ORT output, per-op kernel kinds)``."""
    import vitquant
    from vitquant.export.onnx import OrtModel, export_onnx, integer_kernels
    vitquant.save(model, folder / "q", model_name="vit_tiny_patch16_224", model_args=TINY_VIT_ARGS)
    loaded = vitquant.load(folder / "q")
    with torch.no_grad():
        out = loaded(x)
    info = export_onnx(loaded, folder / "q.onnx")
    assert info["check"]["ok"]
    return loaded, out, OrtModel(folder / "q.onnx")(x), integer_kernels(folder / "q.onnx", loaded)["ops"]


def write_images(folder, names, size=(40, 36), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in names:
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / n, quality=90)
    return folder


@pytest.fixture
def sample_dir(tmp_path):
    """A flat <wnid>_*.JPEG folder with splits, like the public ImageNet sample."""
    d = tmp_path / "sample"
    names = [f"{w}_{i}.JPEG" for w in WNIDS for i in range(3)]
    write_images(d / "images", names)
    (d / "splits").mkdir()
    (d / "splits" / "calib.txt").write_text("\n".join(names[:4]) + "\n")
    (d / "splits" / "eval.txt").write_text("\n".join(names[4:]) + "\n")
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VITQUANT_SAMPLE_DIR", raising=False)
    torch.set_num_threads(2)


def tiny_deit_checkpoint(folder):
    """A seeded random-init DeiT-Tiny at 32x32 as a local safetensors checkpoint; returns its path."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ckpt = folder / "ck.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224", img_size=32).state_dict(), str(ckpt))
    return ckpt
