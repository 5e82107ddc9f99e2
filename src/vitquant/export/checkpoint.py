"""Quantized checkpoints: ``save(model, DIR)`` / ``load(DIR)``.

A directory with two files (three with a calibration sample), written atomically (a temporary sibling directory renamed into place):

* ``model.safetensors``: the wrapped model's state dict in which every quantized weight is replaced
  by its integer codes: below 8 bits packed, ``<op>.weight_packed`` (b bits per code, see
  :mod:`vitquant.export.packing`; bit-width, code offset and shape in the manifest's
  ``packed_weights``), else ``<op>.weight_codes`` (int8 when the codes fit, else int16), plus every quantizer parameter (scales, exponents, zero-point minima,
  O-2SF channel ranges) and bias correction. Unquantized tensors stay FP32.
* ``manifest.json``: model name and constructor arguments, timm / torch / vitquant versions, the
  method config, the source weights' sha256, every quantizer's type and constructor arguments,
  and the sha256 of ``model.safetensors``.
* ``calibration_sample.safetensors`` (optional; ``quantize --save`` writes it): the first 8
  calibration images (uint8, with the normalisation), on which ``vitquant export`` checks that
  the ONNX graph computes the simulated model (:mod:`vitquant.export.verify`).

:func:`load` rebuilds the quantized model without calibration: its quantized weights are the
dequantized codes, which the weight quantizers map to themselves, so its logits equal the
in-memory quantized model's bit for bit. The original FP32 weights of quantized ops are not saved
(``quantization_disabled`` on a loaded model runs with the dequantized weights).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import VitquantError
from ..models import input_size
from ..nn.modules import QuantOp, _WeightOp
from ..nn.wrap import is_wrapped, quant_ops, wrap_model
from .packing import fits, pack_codes, unpack_codes

FORMAT = "vitquant-checkpoint/2"  # /2: sub-8-bit codes packed; /1 files (int8 codes) load unchanged
READABLE_FORMATS = ("vitquant-checkpoint/1", FORMAT)
TENSORS, MANIFEST, SAMPLE = "model.safetensors", "manifest.json", "calibration_sample.safetensors"


def _code_dtype(codes: torch.Tensor) -> torch.dtype:
    lo, hi = int(codes.min()), int(codes.max())
    if -128 <= lo and hi <= 127:
        return torch.int8
    if 0 <= lo and hi <= 255:
        return torch.uint8
    return torch.int16 if -2 ** 15 <= lo and hi < 2 ** 15 else torch.int32


def _integer_zero_points(q) -> bool:
    """An asymmetric uniform quantizer: its float minima ``lower`` are stored as the integer zero
    points ``round(-lower / step)`` they define (load sets ``lower = -z step``, which gives back the
    same zero points, checked)."""
    from ..quantizers import UniformQuantizer
    return isinstance(q, UniformQuantizer) and not q.symmetric


def _quantized_weights(model: nn.Module) -> dict[str, _WeightOp]:
    return {n: op for n, op in quant_ops(model) if isinstance(op, _WeightOp) and op.weight_quantizer is not None
            and op.weight_quantizer.calibrated and op.weight_quantizer.enabled}


def _model_args(model: nn.Module) -> dict:
    args = {"num_classes": int(getattr(model, "num_classes", 1000))}
    size = input_size(model)
    if size is not None:
        args["img_size"] = int(size[0]) if size[0] == size[1] else list(size)
    return args


def check_new_dir(path: str | os.PathLike) -> None:
    """Refuse an output directory that exists and is not empty (checkpoints never overwrite)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise VitquantError(f"output directory {path} exists and is not empty")


def _sample_tensors(sample) -> dict[str, torch.Tensor]:
    """A few calibration images for the export check: an ImageSet (uint8 + mean / std) or
    normalised float images ``[n, 3, H, W]``."""
    if hasattr(sample, "images") and hasattr(sample, "mean"):
        return {"images": sample.images.contiguous(), "mean": sample.mean.float().contiguous(),
                "std": sample.std.float().contiguous()}
    if isinstance(sample, torch.Tensor) and sample.dim() == 4 and sample.is_floating_point():
        return {"images": sample.detach().float().cpu().contiguous()}
    raise VitquantError("calibration_sample must be an ImageSet or a float tensor [n, 3, H, W]")


def _read_sample(path: Path, manifest: dict) -> Optional[torch.Tensor]:
    """The saved calibration sample as normalised float images, or None when there is none."""
    from safetensors.torch import load_file

    from ..models import sha256_file
    info = manifest.get("calibration_sample")
    if not info:
        return None
    f = path / SAMPLE
    if not f.is_file() or sha256_file(f) != info.get("sha256"):
        raise VitquantError(f"{f} is missing or does not match its manifest (sha256 differs)")
    t = load_file(str(f))
    if t["images"].dtype == torch.uint8:
        return t["images"].float().div_(255).sub_(t["mean"]).div_(t["std"])
    return t["images"]


def save(model: nn.Module, path: str | os.PathLike, *, model_name: Optional[str] = None,
         model_args: Optional[dict] = None, weights: Optional[dict] = None, extra: Optional[dict] = None,
         calibration_sample=None) -> dict:
    """Write a quantized (wrapped, calibrated) model to directory ``path``; returns the manifest.

    ``model_name``: the timm name (default: ``model.pretrained_cfg['architecture']``);
    ``model_args``: ``timm.create_model`` arguments that rebuild it (default: its ``num_classes``
    and ``img_size``; give the rest for a model built with other arguments);
    ``weights``: provenance of the FP weights (e.g. ``{"weights_sha256": ...}``);
    ``calibration_sample``: a few calibration images (ImageSet or float tensor) saved beside the
    model, on which ``vitquant export`` checks the ONNX graph against the simulation."""
    import timm
    from safetensors.torch import save_file

    from .. import __version__
    if not is_wrapped(model):
        raise VitquantError("save() needs a quantized model (run vitquant.quantize first)")
    name = model_name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise VitquantError("cannot tell the timm model name; pass model_name=")
    path = Path(path)
    check_new_dir(path)
    weights_q = _quantized_weights(model)
    tensors = {}
    for key, t in model.state_dict().items():
        op_name = key.rsplit(".", 1)[0]
        if (key.endswith(".weight") or key.endswith(".rounded_weight")) and op_name in weights_q:
            continue  # stored as integer codes
        tensors[key] = t.detach().cpu().contiguous()
    quantizers = {}
    for name_op, op in quant_ops(model):
        for operand, q in op.quantizers().items():
            quantizers[f"{name_op}.{operand}"] = {"type": type(q).__name__, "args": q.spec(),
                                                  "calibrated": q.calibrated, "enabled": q.enabled}
    packed = {}
    for n, op in weights_q.items():
        wq = op.weight_quantizer
        if _integer_zero_points(wq):  # per-channel zero points as integers, not float minima
            z = wq.zero_points().detach().cpu().to(torch.int64)
            del tensors[f"{n}.weight_quantizer.lower"]
            tensors[f"{n}.weight_quantizer.zero_point"] = z.to(_code_dtype(z)).contiguous()
        codes = wq.quantize(op.weight_to_quantize().detach()).cpu()
        if wq.bits < 8 and hasattr(wq, "qmin") and fits(codes, wq.bits, wq.qmin):
            tensors[f"{n}.weight_packed"] = pack_codes(codes, wq.bits, wq.qmin)
            packed[n] = {"bits": wq.bits, "qmin": int(wq.qmin), "shape": list(codes.shape)}
        else:
            tensors[f"{n}.weight_codes"] = codes.to(_code_dtype(codes)).contiguous()
    cfg = getattr(model, "vitquant_config", None)
    manifest = {
        "format": FORMAT, "model": name, "model_args": _model_args(model) | (model_args or {}),
        "timm_version": timm.__version__, "torch_version": torch.__version__, "vitquant_version": __version__,
        "config": cfg.to_dict() if cfg is not None else None, "weights": weights or {},
        "quantizers": quantizers, "quantized_weights": {n: op.weight_quantizer.bits for n, op in weights_q.items()},
        "packed_weights": packed,
        "bias_correction": [n for n, op in quant_ops(model) if getattr(op, "bias_correction", None) is not None],
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / TENSORS))
        from ..models import sha256_file
        manifest["tensors_sha256"] = sha256_file(tmp / TENSORS)
        manifest["tensors_bytes"] = (tmp / TENSORS).stat().st_size
        if calibration_sample is not None:
            save_file(_sample_tensors(calibration_sample), str(tmp / SAMPLE))
            manifest["calibration_sample"] = {"file": SAMPLE, "num_images": len(calibration_sample),
                                              "sha256": sha256_file(tmp / SAMPLE)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if path.exists():
            path.rmdir()  # empty (checked above)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


_MANIFEST_KEYS = ("model", "model_args", "tensors_sha256", "quantizers", "bias_correction")


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
        raise VitquantError(f"{path} is not a vitquant checkpoint directory (needs {MANIFEST} and {TENSORS})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitquantError(f"cannot read {path / MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(FORMAT.split("/")[0] + "/"):
        raise VitquantError(f"{path / MANIFEST}: not a {FORMAT} manifest")
    if manifest["format"] not in READABLE_FORMATS:
        from .. import __version__
        raise VitquantError(f"{path} was written in format {manifest['format']} by vitquant "
                            f"{manifest.get('vitquant_version', '?')}; this vitquant {__version__} reads "
                            f"{', '.join(READABLE_FORMATS)}: "
                            "upgrade vitquant to load it")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise VitquantError(f"{path / MANIFEST} lacks {', '.join(missing)}: corrupt or hand-edited")
    return manifest


def load(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Rebuild the quantized model saved in ``path`` (no calibration, no FP weights needed)."""
    import timm
    from safetensors.torch import load_file

    from .. import __version__
    from ..models import sha256_file
    from ..quantizers import QUANTIZER_TYPES
    from ..recipes import config_from_dict
    path = Path(path)
    manifest = read_manifest(path)
    if sha256_file(path / TENSORS) != manifest.get("tensors_sha256"):
        raise VitquantError(f"{path / TENSORS} does not match its manifest (sha256 differs): corrupt or replaced")
    try:
        model = timm.create_model(manifest["model"], pretrained=False, **manifest["model_args"])
    except Exception as e:
        raise VitquantError(f"cannot build {manifest['model']} with timm {timm.__version__}: {e}") from None
    wrap_model(model.eval())
    ops = dict(quant_ops(model))
    for key, spec in manifest["quantizers"].items():
        op_name, operand = key.rsplit(".", 1)
        if spec.get("type") not in QUANTIZER_TYPES:
            raise VitquantError(f"checkpoint quantizer {key}: unknown type {spec.get('type')!r} (written by vitquant "
                                f"{manifest.get('vitquant_version', '?')}; this is {__version__})")
        if op_name not in ops:
            raise VitquantError(f"checkpoint quantizer {key} ({spec['type']}) does not fit {manifest['model']}")
        try:
            q = QUANTIZER_TYPES[spec["type"]](**spec["args"])
        except (TypeError, ValueError, KeyError) as e:
            raise VitquantError(f"checkpoint quantizer {key} ({spec['type']}): bad arguments in {MANIFEST}: {e}") from None
        q.calibrated, q.enabled = spec["calibrated"], spec["enabled"]
        ops[op_name].set_quantizer(operand, q)
    for n in manifest["bias_correction"]:
        op = ops[n]
        op.bias_correction = torch.zeros(op.weight.shape[0])
    try:
        sd = load_file(str(path / TENSORS))
    except Exception as e:  # safetensors' SafetensorError: header or data unreadable
        raise VitquantError(f"cannot read {path / TENSORS}: {e}") from None
    codes = {k[: -len(".weight_codes")]: sd.pop(k) for k in list(sd) if k.endswith(".weight_codes")}
    zero_points = {}
    for k in [k for k in sd if k.endswith(".weight_quantizer.zero_point")]:
        base = k[: -len("zero_point")]
        z = sd.pop(k).to(torch.int64)
        if base + "scale" not in sd or sd[base + "scale"].shape != z.shape:
            raise VitquantError(f"{path / TENSORS}: {k} has no matching step")
        sd[base + "lower"] = -z.to(sd[base + "scale"].dtype) * sd[base + "scale"]
        zero_points[base[: -len(".weight_quantizer.")]] = z
    packed = manifest.get("packed_weights") or {}
    for k in [k for k in sd if k.endswith(".weight_packed")]:
        n, t = k[: -len(".weight_packed")], sd.pop(k)
        info = packed.get(n)
        if info is None:
            raise VitquantError(f"{path / TENSORS}: packed weight {n} has no entry in the manifest's packed_weights")
        try:
            codes[n] = unpack_codes(t, int(info["bits"]), int(info["qmin"]), info["shape"])
        except (ValueError, KeyError, TypeError) as e:
            raise VitquantError(f"{path / TENSORS}: cannot unpack {n}: {e}") from None
    for k in sd:  # the reparameterisation gives a bias to a Linear built without one (Swin's reduction)
        op = ops.get(k[:-len(".bias")]) if k.endswith(".bias") else None
        if op is not None and getattr(op, "bias", False) is None and sd[k].dim() == 1:
            op.bias = nn.Parameter(torch.zeros_like(sd[k]))
    own = model.state_dict()
    expected = {k for k in own if not (k.endswith(".weight") and k[:-len(".weight")] in codes)}
    if set(sd) != expected or any(tuple(sd[k].shape) != tuple(own[k].shape) for k in sd):
        raise VitquantError(f"{path / TENSORS} does not match model {manifest['model']} (keys or shapes differ)")
    bad = [n for n, c in codes.items() if n not in ops or tuple(c.shape) != tuple(ops[n].weight.shape)]
    if bad:
        raise VitquantError(f"{path / TENSORS}: weight codes of {bad[0]} do not fit model {manifest['model']}")
    model.load_state_dict(sd, strict=False)
    for n, z in zero_points.items():
        if not torch.equal(ops[n].weight_quantizer.zero_points().to(torch.int64), z):
            raise VitquantError(f"{n}: the stored zero points do not survive this torch's float arithmetic")
    with torch.no_grad():
        for n, c in codes.items():
            op: QuantOp = ops[n]
            op.weight.copy_(op.weight_quantizer.dequantize(c.to(torch.int64)))
            op.refresh()
    if manifest.get("config"):
        model.vitquant_config = config_from_dict(manifest["config"])
    model.vitquant_manifest = manifest
    model.vitquant_calibration_sample = _read_sample(path, manifest)
    return model.to(device)
