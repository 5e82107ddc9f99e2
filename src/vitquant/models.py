"""Loading timm models by name, from the hub or from a local checkpoint file."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from .errors import VitquantError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_hash(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes), for hub weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VitquantError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file: one line naming it
        raise VitquantError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VitquantError(f"checkpoint {path} does not contain a state dict of tensors")
    return sd


def check_state_dict(model: nn.Module, sd: dict, what: str) -> None:
    """Raise one clear error when ``sd`` does not fit ``model`` exactly (keys and shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
    raise VitquantError(f"{what}: {'; '.join(parts)}")


def load_model(name: str, checkpoint: Optional[str | Path] = None, *, pretrained: bool = True,
               img_size: Optional[int] = None) -> tuple[nn.Module, dict]:
    """Create timm model ``name`` and load weights: from ``checkpoint`` (safetensors or torch
    state dict) if given, else from the hub (``pretrained=True``) or random init.

    Returns the model (eval mode, CPU) and provenance info (source and weights sha256).
    """
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        base = name.split(".")[0]
        if base not in timm.list_models():
            close = timm.list_models(f"*{base.split('_')[0]}*")[:5]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise VitquantError(f"unknown model {name!r} (not a timm model name{hint})")
    kwargs = {"img_size": img_size} if img_size else {}
    if checkpoint is not None:
        sd = read_state_dict(checkpoint)
        model = timm.create_model(name, pretrained=False, **kwargs)
        check_state_dict(model, sd, f"checkpoint {checkpoint} does not match model {name}")
        model.load_state_dict(sd, strict=True)
        info = {"weights": "checkpoint", "checkpoint": str(checkpoint), "weights_sha256": sha256_file(checkpoint)}
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise VitquantError(f"could not load pretrained weights for {name} from the hub "
                                f"({type(e).__name__}); pass --checkpoint FILE to use a local file") from None
        info = {"weights": "hub", "checkpoint": None, "weights_sha256": state_dict_hash(model)}
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        info = {"weights": "random-init", "checkpoint": None, "weights_sha256": state_dict_hash(model)}
    return model.eval(), info


def input_size(model: nn.Module, default=None):
    """``(H, W)`` the model was built for (its patch embedding's ``img_size``), else ``default``."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return default if size is None else tuple(size)


def data_config_for(model: nn.Module) -> dict:
    """timm's eval data config of ``model``, with the input size the model was built for (it
    differs from the pretrained config when ``img_size`` was changed)."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    size = input_size(model)
    if size is not None:
        cfg["input_size"] = (cfg["input_size"][0], *tuple(size))
    return cfg
