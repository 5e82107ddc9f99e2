"""Sweeps: models x methods x bit-widths x calibration sizes x seeds, one ``vitquant quantize`` per cell.

A spec (YAML) names the grid; every cell runs in its own process (a crash or a bad cell cannot take
the sweep down; on GPUs each process gets one device) and writes its result JSON atomically to
``OUT/cells/<cell>.json``. Re-running the sweep skips finished cells and retries failed ones
(``<cell>.failed.json`` holds the error of the last try). ``vitquant report OUT`` renders the tables.
"""
from __future__ import annotations

import fnmatch
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import VitquantError
from .io import atomic_write_json

SPEC_KEYS = {"out", "data", "models", "methods", "bits", "calib_sizes", "seeds", "options", "name"}
DATA_KEYS = {"calib_data", "calib_list", "eval_data", "eval_list", "labels", "num_eval"}
MODEL_KEYS = {"name", "checkpoint", "label", "img_size", "random_init"}
METHOD_KEYS = {"method", "label", "options"}
# options a spec may not set per method / globally: the sweep owns them
RESERVED = {"json", "save", "w_bits", "a_bits", "num_calib", "seed", "calib_seed", "checkpoint", "model",
            "method", "quiet", "plots", "work_dir", "device"}


@dataclass(frozen=True)
class Cell:
    model: str
    model_label: str
    method: str
    method_label: str
    w_bits: int
    a_bits: int
    num_calib: int
    seed: int
    args: tuple  # quantize arguments (without --json / --device)

    @property
    def id(self) -> str:
        raw = f"{self.model_label}__{self.method_label}__w{self.w_bits}a{self.a_bits}__n{self.num_calib}__s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.+-]+", "-", raw)


@dataclass
class SweepSpec:
    cells: list[Cell]
    out: Optional[str] = None
    name: str = "sweep"
    raw: dict = field(default_factory=dict)


def _quantize_options() -> dict[str, list]:
    """dest -> argparse actions of every ``vitquant quantize`` option (``--ranking`` and
    ``--no-ranking`` share one dest)."""
    from .options import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    known: dict[str, list] = {}
    for a in sub.choices["quantize"]._actions:
        if a.option_strings:
            known.setdefault(a.dest, []).append(a)
    return known


def _flag_args(options: dict, where: str, known: dict) -> list[str]:
    """``{"mixed_precision": True, "ranking": False, "bit_choices": "4,6,8"}`` ->
    ``["--mixed-precision", "--no-ranking", "--bit-choices", "4,6,8"]``."""
    args = []
    for key, value in (options or {}).items():
        dest = str(key).replace("-", "_")
        if dest in RESERVED:
            raise VitquantError(f"sweep spec, {where}: option {key!r} is set by the sweep itself")
        if dest not in known:
            close = [k for k in known if k.startswith(dest[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise VitquantError(f"sweep spec, {where}: unknown option {key!r}{hint}")
        switches = {a.const: a for a in known[dest] if a.nargs == 0}  # store_true / store_false
        takes_value = next((a for a in known[dest] if a.nargs != 0), None)
        flag = lambda a: next(s for s in a.option_strings if s.startswith("--"))  # noqa: E731
        if isinstance(value, bool):
            if value in switches:
                args.append(flag(switches[value]))
            elif takes_value is not None and getattr(takes_value, "metavar", None) == "on|off":
                args += [flag(takes_value), "on" if value else "off"]
            elif value:
                raise VitquantError(f"sweep spec, {where}: option {key!r} needs a value")
        elif value is None:
            continue
        elif takes_value is None:
            raise VitquantError(f"sweep spec, {where}: option {key!r} is a switch; give true or false")
        elif isinstance(value, (list, tuple)):
            args += [flag(takes_value), *map(str, value)]
        else:
            args += [flag(takes_value), str(value)]
    return args


def _bits(entry, where: str) -> tuple[int, int]:
    if isinstance(entry, str):
        m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", entry.strip())
        if not m:
            raise VitquantError(f"sweep spec, {where}: bits {entry!r} is not like W8A8")
        return int(m.group(1)), int(m.group(2))
    if isinstance(entry, int):
        return entry, entry
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(b, int) for b in entry):
        return entry[0], entry[1]
    raise VitquantError(f"sweep spec, {where}: bits {entry!r} must be W<w>A<a>, an int or [w, a]")


def _check_keys(d, allowed: set, where: str) -> dict:
    if not isinstance(d, dict):
        raise VitquantError(f"sweep spec, {where}: expected a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise VitquantError(f"sweep spec, {where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return d


def _list(spec: dict, key: str, default=None) -> list:
    v = spec.get(key, default)
    if v is None:
        raise VitquantError(f"sweep spec: {key!r} is required")
    v = v if isinstance(v, list) else [v]
    if not v:
        raise VitquantError(f"sweep spec: {key!r} is empty")
    return v


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Parse and validate a sweep spec (YAML or JSON); paths in it are relative to the spec file."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise VitquantError(f"sweep spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise VitquantError(f"sweep spec {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    spec = _check_keys(raw, SPEC_KEYS, "top level")
    known = _quantize_options()
    from .recipes import RECIPES

    def rel(p):
        return str(p) if p is None or os.path.isabs(str(p)) else str((path.parent / str(p)).resolve())

    data = _check_keys(spec.get("data") or {}, DATA_KEYS, "data")
    common = []
    for k in ("calib_data", "calib_list", "eval_data", "eval_list", "labels"):
        if data.get(k) is not None:
            common += ["--" + k.replace("_", "-"), rel(data[k])]
    if data.get("num_eval") is not None:
        common += ["--num-eval", str(data["num_eval"])]
    common += _flag_args(spec.get("options"), "options", known)

    models = []
    for i, m in enumerate(_list(spec, "models")):
        m = {"name": m} if isinstance(m, str) else _check_keys(m, MODEL_KEYS, f"models[{i}]")
        if "name" not in m:
            raise VitquantError(f"sweep spec, models[{i}]: 'name' is required")
        args = []
        if m.get("checkpoint"):
            args += ["--checkpoint", rel(m["checkpoint"])]
        if m.get("random_init"):
            args.append("--random-init")
        if m.get("img_size"):
            args += ["--img-size", str(m["img_size"])]
        models.append((m["name"], m.get("label") or m["name"], args))
    methods = []
    for i, m in enumerate(_list(spec, "methods")):
        m = {"method": m} if isinstance(m, str) else _check_keys(m, METHOD_KEYS, f"methods[{i}]")
        if m.get("method") not in RECIPES:
            raise VitquantError(f"sweep spec, methods[{i}]: unknown method {m.get('method')!r} "
                                f"(choose from {', '.join(RECIPES)})")
        methods.append((m["method"], m.get("label") or m["method"],
                        _flag_args(m.get("options"), f"methods[{i}] ({m['method']})", known)))
    bits = [_bits(b, f"bits[{i}]") for i, b in enumerate(_list(spec, "bits"))]
    sizes = _list(spec, "calib_sizes", [32])
    seeds = _list(spec, "seeds", [0])
    for what, values in (("calib_sizes", sizes), ("seeds", seeds)):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= (what == "calib_sizes") for v in values):
            raise VitquantError(f"sweep spec: {what} must be {'positive' if what == 'calib_sizes' else ''} integers")
    cells = []
    for name, mlabel, margs in models:
        for method, label, opts in methods:
            for w, a in bits:
                for n in sizes:
                    for s in seeds:
                        args = ("quantize", name, "--method", method, "--w-bits", str(w), "--a-bits", str(a),
                                "--num-calib", str(n), "--seed", str(s), "--calib-seed", str(s), "--quiet",
                                *margs, *common, *opts)
                        cells.append(Cell(name, mlabel, method, label, w, a, n, s, args))
    ids = [c.id for c in cells]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise VitquantError(f"sweep spec: two cells share the id {dup!r}; give the methods / models distinct labels")
    return SweepSpec(cells, spec.get("out"), spec.get("name") or path.stem, raw)


def cell_status(out: Path, cell: Cell) -> str:
    """``done`` (a readable result), ``failed`` (the last try failed) or ``todo``."""
    done = out / "cells" / f"{cell.id}.json"
    if done.is_file():
        try:
            json.loads(done.read_text())
            return "done"
        except ValueError:
            pass
    return "failed" if (out / "cells" / f"{cell.id}.failed.json").is_file() else "todo"


def resolve_devices(devices: list[str]) -> list[str]:
    """``--devices`` entries as worker devices: ``cpu``, ``cuda:N``, or ``cuda`` = every visible GPU."""
    out = []
    for d in devices:
        if d == "cuda":
            import torch
            n = torch.cuda.device_count()
            if n == 0:
                raise VitquantError("--devices cuda: no CUDA device is visible")
            out += [f"cuda:{i}" for i in range(n)]
        elif d == "cpu" or re.fullmatch(r"cuda:\d+", d):
            out.append(d)
        else:
            raise VitquantError(f"unknown device {d!r}: use cpu, cuda (every GPU) or cuda:N")
    return out


def _run_cell(out: Path, cell: Cell, device: str, timeout: Optional[float]) -> tuple[bool, str]:
    cells = out / "cells"
    result = cells / f"{cell.id}.json"
    failed = cells / f"{cell.id}.failed.json"
    env = dict(os.environ)
    dev_args = []
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        env["CUDA_VISIBLE_DEVICES"] = index
        dev_args = ["--device", "cuda"]
    cmd = [sys.executable, "-m", "vitquant.cli", *cell.args, *dev_args, "--json", str(result)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        code, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        code, err = -1, f"timed out after {timeout} s"
    seconds = round(time.perf_counter() - t, 1)
    if code == 0 and result.is_file():
        failed.unlink(missing_ok=True)
        return True, f"{seconds} s"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    message = lines[-1] if lines else f"exit code {code}"
    atomic_write_json(failed, {"cell": cell.id, "error": message, "returncode": code, "seconds": seconds,
                               "device": device, "command": cmd, "stderr_tail": lines[-20:]})
    return False, message


def select_cells(cells: list, only: Optional[list[str]]) -> list:
    """The cells whose id matches one of the ``only`` globs (all without); a glob that matches no
    cell is an error (a typo would otherwise run nothing, silently)."""
    if not only:
        return list(cells)
    unmatched = [g for g in only if not any(fnmatch.fnmatchcase(c.id, g) for c in cells)]
    if unmatched:
        raise VitquantError(f"--only {' '.join(unmatched)} matches no cell of the sweep (ids look like {cells[0].id})")
    return [c for c in cells if any(fnmatch.fnmatchcase(c.id, g) for g in only)]


def run_sweep(spec: SweepSpec, out: str | os.PathLike, devices: list[str], *, timeout: Optional[float] = None,
              progress: bool = True, only: Optional[list[str]] = None) -> dict:
    """Run every unfinished cell (with ``only``: of the cells matching those globs), one process
    per device at a time. Returns counts."""
    from tqdm.auto import tqdm
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", {"name": spec.name, "spec": spec.raw, "cells": [
        {"id": c.id, "model": c.model, "model_label": c.model_label, "method": c.method,
         "method_label": c.method_label, "w_bits": c.w_bits, "a_bits": c.a_bits, "num_calib": c.num_calib,
         "seed": c.seed} for c in spec.cells]})
    chosen = select_cells(spec.cells, only)
    status = {c.id: cell_status(out, c) for c in chosen}
    todo = [c for c in chosen if status[c.id] != "done"]
    counts = {"cells": len(chosen), "skipped_done": len(chosen) - len(todo),
              "retried": sum(status[c.id] == "failed" for c in todo), "ok": 0, "failed": 0}
    work: queue.Queue = queue.Queue()
    for c in todo:
        work.put(c)
    lock = threading.Lock()
    bar = tqdm(total=len(todo), desc="sweep", unit="cell", disable=not progress)

    def worker(device):
        while True:
            try:
                cell = work.get_nowait()
            except queue.Empty:
                return
            ok, msg = _run_cell(out, cell, device, timeout)
            with lock:
                counts["ok" if ok else "failed"] += 1
                bar.write(f"{'ok    ' if ok else 'FAILED'} {cell.id} [{device}]: {msg}", file=sys.stderr)
                bar.update(1)

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    return counts
