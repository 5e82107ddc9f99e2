"""Image data: the folder layouts people have, list files, timm preprocessing, a tensor cache
and the default ImageNet sample.

Layouts (detected automatically):
* ImageNet-style ``root/<class>/*.JPEG`` (class = WordNet id, or any folder name, sorted);
* flat files with a labels file (``--labels FILE``: lines ``<file name> <class index or wnid>``);
* flat files named ``<wnid>_*.JPEG`` (the public ImageNet sample).
Calibration never needs labels. Decoded, resized and cropped images are cached as uint8 tensors
(exactly what timm's transform produces before ``ToTensor``), so JPEG decoding happens once.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import VitquantError

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
WNID = re.compile(r"^(n\d{8})")
SAMPLE_URL = "https://github.com/EliSchwartz/imagenet-sample-images/archive/refs/heads/master.zip"
SAMPLE_ENV = "VITQUANT_SAMPLE_DIR"
SAMPLE_CALIB_SIZE = 128


def cache_dir() -> Path:
    return Path(os.environ.get("VITQUANT_CACHE_DIR", Path.home() / ".cache" / "vitquant"))


def imagenet_classes() -> list[str]:
    """WordNet ids in timm's ImageNet-1k class order (index i = class i)."""
    from timm.data import ImageNetInfo
    return list(ImageNetInfo().label_names())


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def read_list(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise VitquantError(f"list file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise VitquantError(f"list file {path} is empty")
    return names


def _read_labels(path: Path, classes: list[str]) -> dict[str, int]:
    if not path.is_file():
        raise VitquantError(f"labels file not found: {path}")
    index = {w: i for i, w in enumerate(classes)}
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise VitquantError(f"labels file {path}, line {n}: expected '<file> <label>'")
        name, lab = parts[0], parts[1]
        if lab.isdigit():
            labels[name] = int(lab)
        elif lab in index:
            labels[name] = index[lab]
        else:
            raise VitquantError(f"labels file {path}, line {n}: unknown label {lab!r}")
    return labels


def discover(root: str | Path, list_file: Optional[str | Path] = None,
             labels_file: Optional[str | Path] = None,
             names_wanted: Optional[Sequence[str]] = None) -> tuple[list[str], Optional[list[int]]]:
    """Image paths (relative to ``root``) and labels (None when the layout carries none),
    restricted to (and ordered as) ``list_file`` or ``names_wanted`` when given."""
    root = Path(root)
    if not root.is_dir():
        raise VitquantError(f"data directory not found: {root}")
    classes = imagenet_classes()
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and any(_is_image(f) for f in d.iterdir()))
    if subdirs and labels_file is None:
        names = [f"{d.name}/{f.name}" for d in subdirs for f in sorted(d.iterdir()) if _is_image(f)]
        if all(d.name in set(classes) for d in subdirs):
            index = {w: i for i, w in enumerate(classes)}
            label_of = {d.name: index[d.name] for d in subdirs}
        else:
            label_of = {d.name: i for i, d in enumerate(subdirs)}
        labels: Optional[list[int]] = [label_of[n.split("/")[0]] for n in names]
    else:
        names = sorted(f.name for f in root.iterdir() if f.is_file() and _is_image(f))
        if labels_file is not None:
            table = _read_labels(Path(labels_file), classes)
            known = set(names) | {Path(n).stem for n in names}
            ghosts = [k for k in table if k not in known]
            if ghosts:
                raise VitquantError(f"{len(ghosts)} of {len(table)} entries of {labels_file} name images that are not "
                                    f"in {root} (e.g. {ghosts[0]}): a labels file must describe the data directory")
            labels = [table.get(n, table.get(Path(n).stem, -1)) for n in names]
            unlabelled = [n for n, lab in zip(names, labels) if lab < 0]
            if unlabelled:
                raise VitquantError(f"{len(unlabelled)} images have no entry in {labels_file} (e.g. {unlabelled[0]})")
        elif names and all(WNID.match(n) for n in names):
            index = {w: i for i, w in enumerate(classes)}
            labels = [index.get(WNID.match(n).group(1), -1) for n in names]
            if min(labels) < 0:
                labels = None
        else:
            labels = None
    if not names:
        raise VitquantError(f"no images found in {root}")
    if list_file is not None or names_wanted is not None:
        wanted = read_list(list_file) if list_file is not None else list(names_wanted)
        source = list_file if list_file is not None else "the requested list"
        pos = {n: i for i, n in enumerate(names)}
        missing = [n for n in wanted if n not in pos]
        if missing:
            raise VitquantError(f"{len(missing)} of {len(wanted)} files in {source} are not in {root} "
                                f"(e.g. {missing[0]})")
        idx = [pos[n] for n in wanted]
        names = [names[i] for i in idx]
        labels = None if labels is None else [labels[i] for i in idx]
    return names, labels


def split_transform(data_config: dict):
    """timm's eval transform split at ``ToTensor``: (PIL steps, mean, std)."""
    from timm.data import create_transform
    tf = create_transform(**data_config, is_training=False)
    steps = list(tf.transforms)
    cut = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    return steps[:cut], mean, std


def _load_one(path: Path, pil_steps) -> torch.Tensor:
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        for t in pil_steps:
            im = t(im)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths, pil_steps):
        self.paths, self.pil_steps = paths, pil_steps

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, _load_one(self.paths[i], self.pil_steps), ""
        except Exception as e:
            return i, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _collate(items):
    return items


@dataclass
class ImageSet:
    """Preprocessed images (uint8, cropped) with optional labels; ``skipped`` lists unreadable
    files with the reason (they are counted and reported, never silently dropped)."""
    images: torch.Tensor
    labels: Optional[torch.Tensor]
    names: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    root: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def tensors(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Normalised float images ``[n, 3, H, W]`` as timm's transform gives them."""
        x = self.images[start:stop].float().div_(255)
        return x.sub_(self.mean).div_(self.std)

    def subset(self, n: int, seed: Optional[int] = None) -> "ImageSet":
        """The first ``n`` images, or with ``seed`` ``n`` images drawn at random (a seeded
        permutation, so the same seed always picks the same images, in the same order)."""
        if seed is None:
            idx = list(range(min(n, len(self))))
        else:
            idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx],
                        [self.names[i] for i in idx], self.mean, self.std, self.root, self.skipped)

    def describe(self) -> dict:
        return {"root": self.root, "num_images": len(self), "num_skipped": len(self.skipped),
                "skipped": [f"{n}: {r}" for n, r in self.skipped],
                "names_sha256": hashlib.sha256("\n".join(self.names).encode()).hexdigest()}


def load_images(root: str | Path, data_config: dict, *, list_file=None, labels_file=None,
                names: Optional[Sequence[str]] = None, limit: Optional[int] = None, use_cache: bool = True,
                workers: Optional[int] = None, progress: bool = True, require_labels: bool = False) -> ImageSet:
    """Discover, decode and preprocess images with the model's timm data config."""
    names, labels = discover(root, list_file, labels_file, names)
    if require_labels and labels is None:
        raise VitquantError(f"images in {root} carry no labels: use root/<wnid>/ folders, <wnid>_*.JPEG "
                            "names or --labels FILE")
    if limit is not None:
        if limit > len(names):
            raise VitquantError(f"requested {limit} images but {root}"
                                f"{' (' + str(list_file) + ')' if list_file else ''} has only {len(names)}")
        names, labels = names[:limit], None if labels is None else labels[:limit]
    pil_steps, mean, std = split_transform(data_config)
    root = Path(root)
    paths = [root / n for n in names]
    key = hashlib.sha256(repr((str(root.resolve()), [(n, p.stat().st_size, p.stat().st_mtime_ns)
                                                    for n, p in zip(names, paths)],
                               [repr(t) for t in pil_steps])).encode()).hexdigest()[:24]
    cache_file = cache_dir() / "tensors" / f"{key}.pt"
    if use_cache and cache_file.is_file():
        try:
            blob = torch.load(cache_file, weights_only=True)
            images, keep, skipped = blob["images"], blob["keep"].tolist(), [tuple(s) for s in blob["skipped"]]
            return _make_set(images, keep, names, labels, mean, std, root, skipped)
        except Exception:
            pass  # unreadable cache: rebuild it
    images, keep, skipped = _decode_all(paths, names, pil_steps, workers, progress)
    if use_cache:
        from .io import atomic_torch_save
        try:
            atomic_torch_save({"images": images, "keep": torch.tensor(keep), "skipped": skipped}, cache_file)
        except OSError:
            pass  # a read-only cache is not an error; decoding just happens again next time
    return _make_set(images, keep, names, labels, mean, std, root, skipped)


def _decode_all(paths, names, pil_steps, workers, progress):
    from tqdm.auto import tqdm
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(_Decode(paths, pil_steps), batch_size=16, num_workers=workers,
                                         collate_fn=_collate)
    out: list = [None] * len(paths)
    skipped = []
    with tqdm(total=len(paths), desc="decoding images", unit="img", disable=not progress) as bar:
        for batch in loader:
            for i, img, err in batch:
                if img is None:
                    skipped.append((names[i], err))
                else:
                    out[i] = img
            bar.update(len(batch))
    keep = [i for i, t in enumerate(out) if t is not None]
    if not keep:
        raise VitquantError(f"none of the {len(paths)} images could be read (e.g. {skipped[0][0]}: {skipped[0][1]})")
    shapes = {tuple(out[i].shape) for i in keep}
    if len(shapes) > 1:
        raise VitquantError(f"preprocessed images have different shapes {sorted(shapes)[:3]}")
    return torch.stack([out[i] for i in keep]), keep, skipped


def _make_set(images, keep, names, labels, mean, std, root, skipped):
    return ImageSet(images, None if labels is None else torch.tensor([labels[i] for i in keep]),
                    [names[i] for i in keep], mean, std, str(root), skipped)


# --------------------------------------------------------------------------------------------
# Default data: the public 1000-image ImageNet sample


@dataclass
class SampleData:
    image_dir: Path
    calib_names: list[str]
    eval_names: list[str]
    source: str


def _sample_image_dir(d: Path) -> Path:
    for cand in (d / "images", d):
        if cand.is_dir() and any(_is_image(f) for f in cand.iterdir()):
            return cand
    raise VitquantError(f"{d} contains no images (expected {d}/images/*.JPEG or {d}/*.JPEG)")


def _download_sample(dest: Path, url: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            blob = r.read()
    except Exception as e:
        raise VitquantError(f"could not download the default ImageNet sample from {url} ({type(e).__name__}: "
                            f"{e}); set {SAMPLE_ENV} to a local copy or pass --calib-data/--eval-data") from None
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".sample-"))
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            members = [m for m in z.namelist() if _is_image(Path(m))]
            if not members:
                raise VitquantError(f"the archive at {url} contains no images")
            (tmp / "images").mkdir()
            for m in members:
                (tmp / "images" / Path(m).name).write_bytes(z.read(m))
        os.replace(tmp, dest)
    except zipfile.BadZipFile:
        raise VitquantError(f"the download from {url} is not a zip archive; set {SAMPLE_ENV} to a local copy") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_sample(seed: int = 0) -> SampleData:
    """The default data: ``$VITQUANT_SAMPLE_DIR`` if set, else the public ImageNet sample
    downloaded once into the user cache. Uses ``splits/calib.txt`` / ``splits/eval.txt`` when
    present, else a deterministic split (permutation by ``seed``: 128 calibration images, the
    rest for evaluation)."""
    env = os.environ.get(SAMPLE_ENV)
    if env:
        d = Path(env)
        if not d.is_dir():
            raise VitquantError(f"{SAMPLE_ENV}={env} is not a directory")
        source = f"{SAMPLE_ENV}={env}"
    else:
        d = cache_dir() / "imagenet-sample"
        url = os.environ.get("VITQUANT_SAMPLE_URL", SAMPLE_URL)
        if not d.is_dir():
            _download_sample(d, url)
        source = url
    image_dir = _sample_image_dir(d)
    splits = d / "splits"
    if (splits / "calib.txt").is_file() and (splits / "eval.txt").is_file():
        return SampleData(image_dir, read_list(splits / "calib.txt"), read_list(splits / "eval.txt"), source)
    names = sorted(f.name for f in image_dir.iterdir() if _is_image(f))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [names[i] for i in order]
    return SampleData(image_dir, sorted(shuffled[:SAMPLE_CALIB_SIZE]), sorted(shuffled[SAMPLE_CALIB_SIZE:]), source)
