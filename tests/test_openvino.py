"""OpenVINO, the second runtime (``vitquant.export.openvino``).

Every test that runs OpenVINO does so in a child process: once OpenVINO's CPU plugin has run in
the pytest process, later tests that wait on child processes (sweeps, resume, the emulated-CPU
checks) are killed by SIGSEGV in that wait (seen with OpenVINO 2026.4 under pytest 9, not outside
pytest; cause not found), so the pytest process never loads the plugin."""
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TINY_VIT_ARGS, tiny_deit_checkpoint, tiny_vit
from vitquant import get_recipe, quantize
from vitquant.cli import main
from vitquant.export.onnx import export_onnx

FAST = dict(rounds=1, num_candidates=8)


def _child(script: str, *args, qemu_cpu: str | None = None, timeout: int = 900) -> dict:
    """Run ``script`` in a fresh interpreter (under ``qemu-x86_64 -cpu qemu_cpu`` when given) with
    this process's import path; return the JSON its last output line holds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [os.path.realpath(sys.executable), "-c", script, *map(str, args)]
    if qemu_cpu:
        cmd = ["qemu-x86_64", "-cpu", qemu_cpu] + cmd
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _quantized(method: str, tmp_path, modes=("exact",)):
    """A tiny ViT quantized by ``method`` at W8A8, its inputs and logits saved, exported per mode."""
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model, _ = quantize(tiny_vit(), x, get_recipe(method, 8, 8, **(FAST if method in ("base", "ptq4vit") else {})),
                        progress=False)
    with torch.no_grad():
        torch.save({"x": x, "sim": model(x)}, tmp_path / "io.pt")
    for mode in modes:
        export_onnx(model, tmp_path / f"{mode}.onnx", int8=mode, verify=mode == "exact")
    export_onnx(model, tmp_path / "fp32.onnx", fp32=True, verify=False)
    return model, x


_COMPARE = """
import json, sys, torch
from vitquant.export.openvino import OpenVinoModel
io = torch.load(sys.argv[1])
out = {}
for p in sys.argv[2:]:
    m = OpenVinoModel(p)
    out[p] = {"max_diff": float((m(io["x"]) - io["sim"]).abs().max()), "precision": m.precision,
              "num_classes": m.num_classes}
print(json.dumps(out))
"""


def _vnni() -> bool:
    from vitquant.report import cpu_info
    return bool((cpu_info()["isa"] or {}).get("vnni"))


@pytest.mark.parametrize("method", ["base", "repq", "adalog"])
def test_openvino_computes_the_simulated_model(tmp_path, method):
    """OpenVINO runs vitquant's QDQ files as calibrated: symmetric codes (base), zero points (repq)
    and float-activation matmuls over int8 weights (adalog's log quantizers), which OpenVINO would
    otherwise quantize to int8 on the fly (its dynamic quantization, off in vitquant's settings)."""
    from vitquant.export.openvino import COMPILE_SETTINGS
    modes = ["exact"] + (["fast"] if _vnni() else [])  # u8 x s8 kernels saturate without VNNI (test below)
    model, x = _quantized(method, tmp_path, modes)
    scale = float(torch.load(tmp_path / "io.pt")["sim"].abs().max())
    got = _child(_COMPARE, tmp_path / "io.pt", *(tmp_path / f"{m}.onnx" for m in modes))
    for r in got.values():
        assert r["precision"] == "f32" and r["num_classes"] == 10
        assert r["max_diff"] < 1e-4 * scale
    assert COMPILE_SETTINGS["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 0 and COMPILE_SETTINGS["INFERENCE_PRECISION_HINT"] == "f32"


_CHECK = """
import json, sys, torch
from vitquant import load
from vitquant.export.verify import check_export, describe
model = load(sys.argv[1])
c = check_export(model, sys.argv[2], runtime="openvino")
print(json.dumps({"check": c, "line": describe(c)}))
"""


def test_export_check_under_openvino(tmp_path):
    """The export check, run with OpenVINO, measures OpenVINO against the simulated model."""
    from vitquant import save
    model, x = _quantized("base", tmp_path)
    model.vitquant_calibration_sample = x
    save(model, tmp_path / "q", model_name="vit_tiny_patch16_224", model_args=TINY_VIT_ARGS)
    got = _child(_CHECK, tmp_path / "q", tmp_path / "exact.onnx")
    assert got["check"]["runtime"] == "openvino" and got["check"]["ok"]
    assert "OpenVINO vs simulated" in got["line"] and got["check"]["mean_logit_diff"] <= got["check"]["allowed_mean_diff"]


_CLI = """
import json, sys
from vitquant.cli import main
codes = [main(a.split("\\x1f")) for a in sys.argv[1:]]
print(json.dumps(codes))
"""


def test_cli_eval_and_bench_with_openvino(sample_dir, tmp_path):
    """``eval --runtime openvino`` agrees with ONNX Runtime; ``bench`` times OpenVINO beside it,
    checks every INT8 path and names the fastest verified one against the fastest FP32 runtime."""
    ckpt = tiny_deit_checkpoint(tmp_path)
    img, lists = str(sample_dir / "images"), sample_dir / "splits"
    ev = ["--eval-data", img, "--eval-list", str(lists / "eval.txt"), "--quiet"]
    assert main(["quantize", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--img-size", "32", "--num-calib", "4",
                 "--calib-data", img, "--calib-list", str(lists / "calib.txt"), "--method", "base", "--no-eval",
                 "--num-candidates", "8", "--search-rounds", "1", "--save", str(tmp_path / "q"), "--quiet"]) == 0
    assert main(["export", str(tmp_path / "q"), "--onnx", str(tmp_path / "q.onnx")]) == 0
    assert main(["eval", str(tmp_path / "q.onnx"), *ev, "--json", str(tmp_path / "ort.json")]) == 0
    calls = [["eval", str(tmp_path / "q.onnx"), *ev, "--runtime", "openvino", "--json", str(tmp_path / "ov.json")],
             ["bench", str(tmp_path / "q"), "--batch-sizes", "2", "--repeats", "2", "--warmup", "1",
              "--json", str(tmp_path / "b.json")],
             ["eval", str(tmp_path / "garbage.onnx"), *ev, "--runtime", "openvino"]]
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07 not a protobuf")
    codes = _child(_CLI, *("\x1f".join(c) for c in calls))
    assert codes == [0, 0, 2]  # the garbage file: one error line, exit 2
    ort, ov = (json.loads((tmp_path / f).read_text()) for f in ("ort.json", "ov.json"))
    assert ov["runtime"] == "openvino" and ort["runtime"] == "onnxruntime"
    agree = sum(a[0] == b[0] for a, b in zip(ort["top5_indices"], ov["top5_indices"]))
    assert agree >= 0.75 * len(ort["top5_indices"])  # the same integer model; near ties of a random model aside
    (row,) = json.loads((tmp_path / "b.json").read_text())
    assert row["environment"]["openvino"] and {"openvino_fp32_ips", "openvino_int8_exact_ips"} <= set(row)
    assert set(row["checks"]) == {"onnx_int8_exact", "openvino_int8_exact"}
    assert row["checks"]["onnx_int8_exact"]["ok"] and row["checks"]["openvino_int8_exact"]["runtime"] == "openvino"
    verified = [k for k, c in row["checks"].items() if c["ok"]]
    assert row["int8_paths_verified"] == sorted(verified)
    ips = {k: row[f"{k}_ips"] for k in verified}
    assert row["best_int8"] == max(ips, key=ips.get) and row["best_speedup"] == pytest.approx(
        row["best_int8_ips"] / max(row[k] for k in row if k.endswith("_fp32_ips")), rel=1e-2)


def test_best_path_ignores_unverified_int8():
    """``bench`` names the fastest INT8 path that passed the check, against the fastest FP32 runtime."""
    from vitquant.export.bench import _best_paths
    row = {"torch_fp32_ips": 5.0, "onnx_fp32_ips": 10.0, "openvino_fp32_ips": 12.0, "onnx_int8_exact_ips": 20.0,
           "onnx_int8_fast_ips": 40.0, "openvino_int8_fast_ips": 30.0, "onnx_int8_ips": 20.0, "ort_static_int8_ips": 99.0}
    best = _best_paths(row, ["onnx_int8_exact", "openvino_int8_fast"])
    assert best["best_fp32"] == "openvino_fp32" and best["best_int8"] == "openvino_int8_fast"
    assert best["best_speedup"] == pytest.approx(2.5) and best["int8_paths_verified"] == ["onnx_int8_exact", "openvino_int8_fast"]
    assert "best_int8" not in _best_paths(row, [])


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="needs qemu-user (apt-get install qemu-user) on x86_64 to emulate an AVX2-only CPU")
def test_openvino_exact_int8_storage_on_an_avx2_only_cpu(tmp_path):
    """OpenVINO under an emulated Haswell (AVX2, no VNNI), as ONNX Runtime: the default uint8
    storage computes the simulated model, int8 storage (u8 x s8 kernels) saturates."""
    _quantized("base", tmp_path, ("exact", "fast"))
    got = _child(_COMPARE, tmp_path / "io.pt", tmp_path / "exact.onnx", tmp_path / "fast.onnx", qemu_cpu="Haswell")
    assert got[str(tmp_path / "exact.onnx")]["max_diff"] < 1e-5
    assert got[str(tmp_path / "fast.onnx")]["max_diff"] > 1e-3
