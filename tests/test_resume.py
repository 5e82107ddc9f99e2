"""Resumable calibration (killed by a signal between blocks, restarted) and determinism."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_vit
import vitquant
from vitquant import get_recipe, quantize
from vitquant.calibration.checkpoint import CalibrationCheckpoint
from vitquant.errors import VitquantError

FAST = dict(rounds=1, num_candidates=8)


def quantizer_tensors(model):
    return {f"{n}.{k}.{t}": v.clone() for n, op in vitquant.quant_ops(model)
            for k, q in op.quantizers().items() for t, v in q.state_dict().items()}


def assert_same_model(a, b, x):
    ta, tb = quantizer_tensors(a), quantizer_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for (_, oa), (_, ob) in zip(vitquant.quant_ops(a), vitquant.quant_ops(b)):
        ca, cb = getattr(oa, "bias_correction", None), getattr(ob, "bias_correction", None)
        assert (ca is None) == (cb is None) and (ca is None or torch.equal(ca, cb))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("method", ["ptq4vit", "liu2021", "tsptq"])
def test_same_seed_same_quantization_bit_for_bit(method):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = get_recipe(method, 6, 6, **FAST)
    a, _ = quantize(tiny_vit(), x, cfg, progress=False)
    b, _ = quantize(tiny_vit(), x, cfg, progress=False)
    assert_same_model(a, b, x)


def test_an_interrupted_calibration_resumes_to_the_same_model(tmp_path):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = get_recipe("liu2021", 6, 6, **FAST)  # bias correction and ranking: every kind of state
    full, report = quantize(tiny_vit(), x, cfg, progress=False, work_dir=tmp_path / "w")
    n_units = len(list((tmp_path / "w").glob("unit*.pt")))
    assert report.resumed_units == 0 and n_units >= 3
    # an interruption after two blocks leaves exactly their files; the rerun loads them
    for f in sorted((tmp_path / "w").glob("unit*.pt"))[2:]:
        f.unlink()
    resumed, report = quantize(tiny_vit(), x, cfg, progress=False, work_dir=tmp_path / "w")
    assert report.resumed_units == 2
    assert_same_model(full, resumed, x)
    # and a complete work directory reproduces the model without calibrating at all
    again, report = quantize(tiny_vit(), x, cfg, progress=False, work_dir=tmp_path / "w")
    assert report.resumed_units == n_units
    assert_same_model(full, again, x)


@pytest.mark.parametrize("change", ["config", "images", "weights"])
def test_a_different_run_refuses_the_work_directory(change, tmp_path):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = get_recipe("base", 6, 6, **FAST)
    quantize(tiny_vit(), x, cfg, progress=False, work_dir=tmp_path / "w")
    model = tiny_vit()
    if change == "config":
        cfg = cfg.replace(w_bits=8)
    elif change == "images":
        x = x.flip(0)
    else:
        with torch.no_grad():
            model.head.weight.mul_(2)
    with pytest.raises(VitquantError, match=f"different run .*differs in: .*{change[:6]}"):
        quantize(model, x, cfg, progress=False, work_dir=tmp_path / "w")


def test_a_corrupt_unit_file_is_named(tmp_path):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = get_recipe("base", 6, 6, **FAST)
    quantize(tiny_vit(), x, cfg, progress=False, work_dir=tmp_path / "w")
    (tmp_path / "w" / "unit0001.pt").write_bytes(b"not a torch file")
    with pytest.raises(VitquantError, match="unit0001.pt is corrupt"):
        quantize(tiny_vit(), x, cfg, progress=False, work_dir=tmp_path / "w")


def test_a_non_empty_directory_without_fingerprint_is_refused(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "other.txt").write_text("x")
    with pytest.raises(VitquantError, match="not empty"):
        CalibrationCheckpoint(tmp_path / "w", {"a": 1})


KILLER = textwrap.dedent("""
    import os, signal, sys
    from vitquant.calibration import checkpoint
    saved = [0]
    original = checkpoint.CalibrationCheckpoint.save
    def save(self, *args, **kwargs):
        original(self, *args, **kwargs)
        saved[0] += 1
        if saved[0] == int(os.environ["KILL_AFTER_UNITS"]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like a killed job
    checkpoint.CalibrationCheckpoint.save = save
    from vitquant.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_cli_killed_by_sigkill_between_blocks_resumes_to_identical_results(sample_dir, tmp_path):
    from test_cli import MODEL, SEARCH, data_args
    torch.manual_seed(0)
    import timm
    from safetensors.torch import save_file
    ckpt = tmp_path / "w.safetensors"
    save_file(timm.create_model(MODEL, img_size=32).state_dict(), str(ckpt))
    base = ["quantize", MODEL, "--method", "ptq4vit", "--checkpoint", str(ckpt), "--img-size", "32", "--quiet",
            "--num-calib", "4", *SEARCH, *data_args(sample_dir), "--threads", "1"]
    (tmp_path / "killer.py").write_text(KILLER)
    env = dict(os.environ, KILL_AFTER_UNITS="2", PYTHONPATH=os.pathsep.join(sys.path))

    def cli(*extra, killer=False):
        cmd = [sys.executable, str(tmp_path / "killer.py")] if killer else [sys.executable, "-m", "vitquant.cli"]
        return subprocess.run(cmd + base + list(extra), env=env, capture_output=True, text=True, timeout=600)

    full = cli("--work-dir", str(tmp_path / "wa"), "--save", str(tmp_path / "sa"), "--json", str(tmp_path / "a.json"))
    assert full.returncode == 0, full.stderr
    killed = cli("--work-dir", str(tmp_path / "wb"), "--save", str(tmp_path / "sb"), "--json", str(tmp_path / "b.json"), killer=True)
    assert killed.returncode == -9
    assert len(list((tmp_path / "wb").glob("unit*.pt"))) == 2  # killed right after the second block
    assert not (tmp_path / "sb").exists() and not (tmp_path / "b.json").exists()  # no partial outputs
    resumed = cli("--work-dir", str(tmp_path / "wb"), "--save", str(tmp_path / "sb"), "--json", str(tmp_path / "b.json"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert b["work_dir"]["resumed_units"] == 2 and a["work_dir"]["resumed_units"] == 0
    assert a["quant_top1"] == b["quant_top1"] and a["top1_agreement"] == b["top1_agreement"]
    ta, tb = load_file(str(tmp_path / "sa" / "model.safetensors")), load_file(str(tmp_path / "sb" / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vitquant.load(tmp_path / "sa")(x), vitquant.load(tmp_path / "sb")(x))
    # the same command with another config refuses the directory with one line
    other = cli("--work-dir", str(tmp_path / "wb"), "--w-bits", "6")
    assert other.returncode == 2 and "different run" in other.stderr and "Traceback" not in other.stderr


def test_memory_budget_moves_activations_to_disk_without_changing_the_result():
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = get_recipe("ptq4vit", 6, 6, **FAST)  # Hessian: gradients are collected too
    ram, report = quantize(tiny_vit(), x, cfg, progress=False)
    assert report.offloaded_bytes == 0
    disk, report = quantize(tiny_vit(), x, cfg, progress=False, max_memory_gb=1e-3)  # 1 MB: nothing fits
    assert report.offloaded_bytes > 1e5
    assert_same_model(ram, disk, x)
