"""Calibrated quantizer state: snapshots of ops, and resumable calibration on disk.

:class:`CalibrationCheckpoint` keeps one file per finished calibration unit (a block, the patch
embedding, the head) in a work directory, written atomically right after the unit is calibrated. A
run killed at any point and restarted with the same inputs loads the finished units and calibrates
only the rest; as calibration is deterministic and each unit's state is restored exactly, the result
is bit-identical to an uninterrupted run. The directory records a fingerprint of everything that
defines the run (model weights, config, calibration images, versions); a different run refuses it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import VitquantError
from ..io import atomic_torch_save, atomic_write_text
from ..nn.modules import QuantOp, _WeightOp

FINGERPRINT = "fingerprint.json"


# -- in-memory snapshots (mixed precision keeps one per bit-width) ----------------------------------


def _clone(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().clone()


def snapshot(ops: list[tuple[str, QuantOp]]) -> dict:
    """A copy of every op's quantizers, bias correction and rounded weight (weight-rounding pass)."""
    return {n: ({k: copy.deepcopy(q) for k, q in op.quantizers().items()},
                _clone(getattr(op, "bias_correction", None)), _clone(getattr(op, "rounded_weight", None)))
            for n, op in ops}


def restore(ops: list[tuple[str, QuantOp]], state: dict) -> None:
    """Put a :func:`snapshot` (or :func:`load_state`) back into the ops."""
    for n, op in ops:
        quantizers, correction, rounded = state[n]
        for operand, q in quantizers.items():
            op.set_quantizer(operand, copy.deepcopy(q))
        if isinstance(op, _WeightOp):
            op.bias_correction = _clone(correction)
            op.set_rounded_weight(rounded)
        op.refresh()


# -- on disk: plain tensors and specs (loads with torch.load(weights_only=True)) --------------------


def _encode(state: dict) -> dict:
    out = {}
    for n, (quantizers, correction, rounded) in state.items():
        out[n] = {"quantizers": {k: {"type": type(q).__name__, "spec": json.dumps(q.spec()),
                                     "calibrated": q.calibrated, "enabled": q.enabled,
                                     "tensors": {t: v.detach().cpu() for t, v in q.state_dict().items()}}
                                 for k, q in quantizers.items()},
                  "bias_correction": None if correction is None else correction.detach().cpu(),
                  "rounded_weight": None if rounded is None else rounded.detach().cpu()}
    return out


def _decode(data: dict) -> dict:
    from ..quantizers import QUANTIZER_TYPES
    state = {}
    for n, entry in data.items():
        quantizers = {}
        for k, rec in entry["quantizers"].items():
            q = QUANTIZER_TYPES[rec["type"]](**json.loads(rec["spec"]))
            q.load_state_dict(rec["tensors"])
            q.calibrated, q.enabled = rec["calibrated"], rec["enabled"]
            quantizers[k] = q
        state[n] = (quantizers, entry["bias_correction"], entry.get("rounded_weight"))
    return state


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class CalibrationCheckpoint:
    """Work directory of one calibration run (see the module docstring).

    ``fingerprint``: JSON-able description of the run; opening a directory written with another
    fingerprint raises :class:`VitquantError` naming the fields that differ."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict):
        self.dir = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        path = self.dir / FINGERPRINT
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                raise VitquantError(f"{path} is unreadable; delete the work directory {self.dir}") from None
            if old != self.fingerprint:
                keys = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise VitquantError(f"work directory {self.dir} holds the calibration of a different run "
                                    f"(differs in: {', '.join(keys)}); use another --work-dir or delete it")
        elif self.dir.exists() and any(self.dir.iterdir()):
            raise VitquantError(f"work directory {self.dir} is not empty and has no {FINGERPRINT}")
        else:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise VitquantError(f"cannot create work directory {self.dir}: {e.strerror}") from None
            atomic_write_text(path, json.dumps(self.fingerprint, indent=1))

    def child(self, name: str, **extra) -> "CalibrationCheckpoint":
        """A sub-directory for one part of the run (e.g. one bit-width of mixed precision)."""
        return CalibrationCheckpoint(self.dir / name, self.fingerprint | extra)

    def _unit_path(self, index: int, unit: str) -> Path:
        return self.dir / f"unit{index:04d}.pt"

    def load(self, index: int, unit: str) -> Optional[tuple[dict, dict]]:
        """``(state, op reports)`` of unit ``index`` if it was finished, else None."""
        path = self._unit_path(index, unit)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise VitquantError(f"{path} is corrupt; delete the work directory {self.dir}") from None
        if data.get("unit") != unit:
            raise VitquantError(f"{path} holds unit {data.get('unit')!r}, expected {unit!r}; delete {self.dir}")
        return _decode(data["state"]), json.loads(data["report"])

    def save(self, index: int, unit: str, ops: list[tuple[str, QuantOp]], report: dict) -> None:
        data = {"unit": unit, "state": _encode(snapshot(ops)), "report": json.dumps(report, default=float)}
        atomic_torch_save(data, self._unit_path(index, unit))

