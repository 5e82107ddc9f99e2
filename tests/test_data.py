"""Folder layouts, list and labels files, bad images, the tensor cache and the default sample."""
import os

import pytest
import torch
from PIL import Image

from conftest import WNIDS, write_images
from vitquant.data import default_sample, discover, load_images
from vitquant.errors import VitquantError

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
               "std": (0.25, 0.25, 0.25), "crop_pct": 0.875, "crop_mode": "center"}


def test_imagenet_style_folders(tmp_path):
    for w in WNIDS[:2]:
        write_images(tmp_path / w, ["a.JPEG", "b.JPEG"])
    names, labels = discover(tmp_path)
    assert names == [f"{WNIDS[0]}/a.JPEG", f"{WNIDS[0]}/b.JPEG", f"{WNIDS[1]}/a.JPEG", f"{WNIDS[1]}/b.JPEG"]
    assert labels == [0, 0, 1, 1]


def test_flat_with_labels_file_and_wnid_named_files(tmp_path):
    write_images(tmp_path / "val", ["ILSVRC_1.JPEG", "ILSVRC_2.JPEG"])
    (tmp_path / "labels.txt").write_text(f"ILSVRC_1.JPEG 7\nILSVRC_2.JPEG {WNIDS[2]}\n")
    assert discover(tmp_path / "val", labels_file=tmp_path / "labels.txt")[1] == [7, 2]
    assert discover(tmp_path / "val")[1] is None  # no labels: fine for calibration
    write_images(tmp_path / "flat", [f"{WNIDS[3]}_x.JPEG", f"{WNIDS[1]}_y.JPEG"])
    assert discover(tmp_path / "flat") == ([f"{WNIDS[1]}_y.JPEG", f"{WNIDS[3]}_x.JPEG"], [1, 3])


def test_list_file_selects_and_orders(sample_dir):
    names, labels = discover(sample_dir / "images", sample_dir / "splits" / "calib.txt")
    assert names == (sample_dir / "splits" / "calib.txt").read_text().split()
    (sample_dir / "bad.txt").write_text("nope.JPEG\n")
    with pytest.raises(VitquantError, match="1 of 1 files in .*bad.txt are not in"):
        discover(sample_dir / "images", sample_dir / "bad.txt")


def test_preprocessing_equals_timm_transform(sample_dir):
    from timm.data import create_transform
    s = load_images(sample_dir / "images", DATA_CONFIG, progress=False)
    tf = create_transform(**DATA_CONFIG)
    with Image.open(sample_dir / "images" / s.names[0]) as im:
        ref = tf(im.convert("RGB"))
    assert torch.allclose(s.tensors(0, 1)[0], ref, atol=1e-6)


def test_unreadable_grayscale_and_cmyk_images_are_counted_not_fatal(tmp_path):
    d = write_images(tmp_path / "d", [f"{WNIDS[0]}_ok.JPEG"])
    (d / f"{WNIDS[0]}_zero.JPEG").write_bytes(b"")
    (d / f"{WNIDS[1]}_corrupt.JPEG").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("L", (40, 40), 128).save(d / f"{WNIDS[2]}_gray.JPEG")
    Image.new("CMYK", (40, 40), (0, 50, 100, 0)).save(d / f"{WNIDS[3]}_cmyk.JPEG")
    s = load_images(d, DATA_CONFIG, progress=False, workers=0)
    assert len(s) == 3 and len(s.skipped) == 2
    assert {n for n, _ in s.skipped} == {f"{WNIDS[0]}_zero.JPEG", f"{WNIDS[1]}_corrupt.JPEG"}
    assert s.describe()["num_skipped"] == 2


def test_all_images_unreadable_or_missing_dirs_are_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.JPEG").write_bytes(b"")
    with pytest.raises(VitquantError, match="none of the 1 images could be read"):
        load_images(tmp_path / "bad", DATA_CONFIG, progress=False, workers=0)
    with pytest.raises(VitquantError, match="data directory not found"):
        load_images(tmp_path / "missing", DATA_CONFIG, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitquantError, match="no images found"):
        load_images(tmp_path / "empty", DATA_CONFIG, progress=False)


def test_limit_larger_than_available_is_an_error(sample_dir):
    with pytest.raises(VitquantError, match="requested 50 images"):
        load_images(sample_dir / "images", DATA_CONFIG, limit=50, progress=False)


def test_cache_returns_identical_tensors_and_is_used(sample_dir, tmp_path):
    first = load_images(sample_dir / "images", DATA_CONFIG, progress=False)
    cached = list((tmp_path / "cache" / "tensors").glob("*.pt"))
    assert len(cached) == 1
    os.utime(cached[0])
    again = load_images(sample_dir / "images", DATA_CONFIG, progress=False, workers=0)
    assert torch.equal(first.images, again.images) and first.names == again.names
    # a changed image file invalidates the cache key
    write_images(sample_dir / "images", [first.names[0]], seed=5)
    changed = load_images(sample_dir / "images", DATA_CONFIG, progress=False, workers=0)
    assert not torch.equal(first.images[0], changed.images[0])


def test_default_sample_from_env_uses_its_splits(sample_dir, monkeypatch):
    monkeypatch.setenv("VITQUANT_SAMPLE_DIR", str(sample_dir))
    s = default_sample()
    assert s.calib_names == (sample_dir / "splits" / "calib.txt").read_text().split()
    assert len(s.eval_names) == 8 and not set(s.calib_names) & set(s.eval_names)


def test_default_sample_without_splits_is_split_deterministically(tmp_path, monkeypatch):
    write_images(tmp_path / "s", [f"{w}_{i}.JPEG" for w in WNIDS for i in range(50)])
    monkeypatch.setenv("VITQUANT_SAMPLE_DIR", str(tmp_path / "s"))
    a, b = default_sample(), default_sample()
    assert a.calib_names == b.calib_names and len(a.calib_names) == 128 and len(a.eval_names) == 72
    assert not set(a.calib_names) & set(a.eval_names)


def test_unreachable_download_names_the_env_variable(monkeypatch):
    monkeypatch.setenv("VITQUANT_SAMPLE_URL", "http://127.0.0.1:9/imagenet-sample.zip")
    with pytest.raises(VitquantError, match="VITQUANT_SAMPLE_DIR"):
        default_sample()
