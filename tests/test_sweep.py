"""Sweeps: spec validation, one process per cell, kill and resume, failed cells, report."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from test_cli import MODEL, checkpoint  # noqa: F401  (fixture)
from vitquant.cli import main
from vitquant.errors import VitquantError
from vitquant.sweep import load_spec


def write_spec(tmp_path, sample_dir, checkpoint, **over):  # noqa: F811
    spec = {
        "name": "tiny sweep",
        "out": "out",
        "data": {"calib_data": str(sample_dir / "images"), "calib_list": str(sample_dir / "splits" / "calib.txt"),
                 "eval_data": str(sample_dir / "images"), "eval_list": str(sample_dir / "splits" / "eval.txt")},
        "models": [{"name": MODEL, "checkpoint": str(checkpoint), "img_size": 32, "label": "deit_tiny_32"}],
        "methods": ["minmax", {"method": "base", "options": {"num_candidates": 8, "search_rounds": 1}}],
        "bits": ["W8A8", "W6A6"],
        "calib_sizes": [2],
        "seeds": [0, 1],
        "options": {"threads": 1, "no_cache": True},
    }
    spec.update(over)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_spec_expands_to_the_grid_and_maps_options_to_flags(sample_dir, checkpoint, tmp_path):  # noqa: F811
    spec = load_spec(write_spec(tmp_path, sample_dir, checkpoint))
    assert len(spec.cells) == 1 * 2 * 2 * 1 * 2
    base = next(c for c in spec.cells if c.method == "base" and c.w_bits == 6 and c.seed == 1)
    a = list(base.args)
    assert a[a.index("--num-candidates") + 1] == "8" and a[a.index("--calib-seed") + 1] == "1"
    assert "--no-cache" in a and a[a.index("--img-size") + 1] == "32"
    assert len({c.id for c in spec.cells}) == len(spec.cells)
    # switches: store_true / store_false flags and on|off options
    methods = [{"method": "liu2021", "options": {"ranking": False, "mixed_precision": True, "bit_choices": "4,6,8"}},
               {"method": "ptq4vit", "options": {"hessian": False, "quantize_layernorm": True}}]
    liu, ptq = load_spec(write_spec(tmp_path, sample_dir, checkpoint, methods=methods, bits=[8], seeds=[0])).cells
    tail = " ".join(liu.args[-4:])  # the spec file's option order
    assert "--no-ranking" in tail and "--mixed-precision" in tail and "--bit-choices 4,6,8" in tail
    tail = " ".join(ptq.args[-4:])
    assert "--hessian off" in tail and "--quantize-layernorm on" in tail


@pytest.mark.parametrize("over,needle", [
    ({"methdos": ["base"]}, "unknown key 'methdos'"),
    ({"methods": [{"method": "base", "options": {"num_candidate": 8}}]}, "unknown option 'num_candidate'"),
    ({"methods": ["ptq5vit"]}, "unknown method 'ptq5vit'"),
    ({"bits": ["W8X8"]}, "is not like W8A8"),
    ({"options": {"json": "x.json"}}, "set by the sweep itself"),
    ({"seeds": []}, "'seeds' is empty"),
])
def test_spec_typos_are_named(over, needle, sample_dir, checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(VitquantError, match=needle.replace("(", r"\(")):
        load_spec(write_spec(tmp_path, sample_dir, checkpoint, **over))


def test_sweep_killed_half_way_resumes_retries_failures_and_reports(sample_dir, checkpoint, tmp_path):  # noqa: F811
    methods = ["minmax", {"method": "liu2021", "label": "liu2021 impossible budget",
                "options": {"mixed_precision": True, "target_size_mb": 0.01}}]
    spec = write_spec(tmp_path, sample_dir, checkpoint, methods=methods)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "vitquant.cli", "sweep", str(spec), "--quiet"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "cells").glob("*__s*.json"))) < 2:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # the sweep and its running cell, mid-way
    p.wait()
    finished = {f.name for f in (out / "cells").glob("*.json")}
    assert 2 <= len(finished) < 8
    for f in (out / "cells").glob("*.json"):
        json.loads(f.read_text())  # every result file present is complete
    code = main(["sweep", str(spec), "--quiet", "--json", str(tmp_path / "counts.json")])
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert code == 2  # the impossible-budget cells fail, are recorded, and do not stop the sweep
    assert counts["cells"] == 8 and counts["failed"] == 4 and counts["ok"] + counts["skipped_done"] == 4
    assert counts["skipped_done"] >= sum(1 for n in finished if not n.endswith(".failed.json"))
    failed = json.loads((out / "cells" / "deit_tiny_32__liu2021-impossible-budget__w8a8__n2__s0.failed.json").read_text())
    assert "cannot be met" in failed["error"]
    # a second run skips every finished cell and only retries the failed ones
    main(["sweep", str(spec), "--quiet", "--json", str(tmp_path / "counts2.json")])
    again = json.loads((tmp_path / "counts2.json").read_text())
    assert again["skipped_done"] == 4 and again["retried"] == 4 and again["failed"] == 4

    assert main(["report", str(out), "--quiet", "--json", str(tmp_path / "report.json")]) == 0
    md = (out / "report.md").read_text()
    assert "## minmax" in md and "## Ablation layout: deit_tiny_32" in md
    assert "Failed cells (4)" in md and "±" in md  # two seeds: mean ± std
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 2 and {r["bits"] for r in rows} == {"W8A8", "W6A6"} and all(r["seeds"] == "0 1" for r in rows)
    # the CSV mean is the mean of the seeds' cell results
    r = next(r for r in rows if r["method"] == "minmax" and r["bits"] == "W6A6")
    cells = [json.loads((out / "cells" / f"deit_tiny_32__minmax__w6a6__n2__s{s}.json").read_text()) for s in (0, 1)]
    assert float(r["top1_mean"]) == pytest.approx(sum(c["quant_top1"] for c in cells) / 2, abs=1e-4)
    for png in ("accuracy_vs_size.png", "drop_per_model.png"):
        assert (out / png).stat().st_size > 10_000
    # seeds pick different calibration images, recorded in each cell
    assert cells[0]["calib_data"]["names"] != cells[1]["calib_data"]["names"]


def test_report_of_a_directory_that_is_no_sweep(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a sweep output directory" in capsys.readouterr().err


def test_cells_are_dispatched_one_process_per_gpu(sample_dir, checkpoint, tmp_path, monkeypatch):  # noqa: F811
    """``--devices cuda`` expands to every visible GPU; each cell process sees one GPU
    (CUDA_VISIBLE_DEVICES) and runs with --device cuda; a device never runs two cells at once."""
    import threading

    import torch

    from vitquant import sweep
    spec = load_spec(write_spec(tmp_path, sample_dir, checkpoint))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    devices = sweep.resolve_devices(["cuda"])
    assert devices == ["cuda:0", "cuda:1", "cuda:2"]
    running, seen, lock = set(), [], threading.Lock()

    def fake_run(cmd, env, **kw):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert gpu not in running, "two cells on one GPU at once"
            running.add(gpu)
            seen.append((gpu, cmd[cmd.index("--device") + 1]))
        time.sleep(0.05)
        with open(cmd[cmd.index("--json") + 1], "w") as f:
            json.dump({"quant_top1": 1.0}, f)
        with lock:
            running.discard(gpu)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    counts = sweep.run_sweep(spec, tmp_path / "out", devices, progress=False)
    assert counts["ok"] == len(spec.cells) == len(seen)
    assert {g for g, _ in seen} == {"0", "1", "2"} and {d for _, d in seen} == {"cuda"}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(VitquantError, match="no CUDA device"):
        sweep.resolve_devices(["cuda"])
    with pytest.raises(VitquantError, match="unknown device 'gpu0'"):
        sweep.resolve_devices(["gpu0"])


def test_only_runs_the_matching_cells_and_a_glob_matching_nothing_fails(sample_dir, checkpoint, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    from vitquant import sweep
    spec = load_spec(write_spec(tmp_path, sample_dir, checkpoint))
    ran = []

    def fake_run(cmd, env, **kw):
        ran.append(cmd[cmd.index("--json") + 1])
        with open(ran[-1], "w") as f:
            json.dump({"quant_top1": 1.0}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    target = spec.cells[-1].id
    counts = sweep.run_sweep(spec, tmp_path / "out", ["cpu"], progress=False, only=[target])
    assert counts["ok"] == counts["cells"] == 1 and len(ran) == 1 and target in ran[0]
    with pytest.raises(VitquantError, match="matches no cell"):
        sweep.run_sweep(spec, tmp_path / "out", ["cpu"], progress=False, only=["nothing__*"])
