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
