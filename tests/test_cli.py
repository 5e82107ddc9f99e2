"""The CLI contract: options, JSON fields, and one clear error line for bad input."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import WNIDS, write_images
from vitquant.cli import main

MODEL = "deit_tiny_patch16_224"
FAST = ["--img-size", "32", "--quiet", "--num-calib", "4"]
SEARCH = ["--num-candidates", "8", "--search-rounds", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "deit_tiny_32.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model(MODEL, img_size=32).state_dict(), str(path))
    return path


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def data_args(sample_dir):
    img = str(sample_dir / "images")
    return ["--calib-data", img, "--calib-list", str(sample_dir / "splits" / "calib.txt"),
            "--eval-data", img, "--eval-list", str(sample_dir / "splits" / "eval.txt")]


@pytest.mark.parametrize("method", ["minmax", "percentile", "base", "ptq4vit", "liu2021", "tsptq"])
def test_quantize_writes_the_contract_json(method, sample_dir, checkpoint, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run(["quantize", MODEL, "--method", method, "--w-bits", "6", "--a-bits", "6",
                          "--checkpoint", str(checkpoint), *data_args(sample_dir), *FAST,
                          "--json", str(out_json), "--seed", "0", "--device", "cpu",
                          *(SEARCH if method in ("base", "ptq4vit", "tsptq") else [])], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    for key in ("model", "method", "w_bits", "a_bits", "num_calib", "num_eval", "fp32_top1", "quant_top1",
                "top1_drop", "top1_agreement", "model_size_mb", "calib_seconds", "eval_seconds", "config"):
        assert key in r
    assert (r["model"], r["method"], r["w_bits"], r["num_calib"], r["num_eval"]) == (MODEL, method, 6, 4, 8)
    assert r["top1_drop"] == pytest.approx(r["fp32_top1"] - r["quant_top1"], abs=1e-3)
    assert r["weights"]["weights_sha256"] and r["environment"]["torch"] == torch.__version__
    env = r["environment"]  # the machine that produced the figures
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch_threads"] == torch.get_num_threads() and env["onnxruntime"]
    assert env["processor"]["model"] and env["processor"]["logical_cpus"] >= 1
    if Path("/proc/cpuinfo").exists() and platform.machine() == "x86_64":
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
        assert env["processor"]["isa"]["avx2"] == ("avx2" in flags)
        assert env["processor"]["isa"]["vnni"] == ("avx512_vnni" in flags or "avx_vnni" in flags)
    assert env["fused_kernels"]["fallback"] is None and r["fused_kernels"] == env["fused_kernels"]["enabled"]
    assert r["config"]["method"] == method and r["calib_data"]["names"] == r["calib_data"]["names"][:4]
    assert r["pipeline"] == ["attach_quantizers", "calibrate"]  # what ran, and which quantizer each site got
    assert r["quantizers_by_site"]["post_softmax"]["kind"] == {"ptq4vit": "twin_softmax", "tsptq": "v2sf"}.get(
        method, "uniform") and r["quantizers_by_site"]["patch_embed.input"] is None
    assert r["model_size_mb"] < r["fp32_model_size_mb"]
    assert "top-1 FP32 / quant" in out


def test_ablation_switches_reach_the_config(sample_dir, checkpoint, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, _, err = run(["quantize", MODEL, "--method", "ptq4vit", "--hessian", "off", "--softmax-twin", "off",
                        "--gelu-twin", "on", "--checkpoint", str(checkpoint), *data_args(sample_dir), *FAST, *SEARCH,
                        "--json", str(out_json)], capsys)
    assert code == 0, err
    cfg = json.loads(out_json.read_text())["config"]
    assert cfg["search"]["objective"] == "cosine" and not cfg["softmax_twin"] and cfg["gelu_twin"]


def test_default_data_comes_from_the_sample_env(sample_dir, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITQUANT_SAMPLE_DIR", str(sample_dir))
    out_json = tmp_path / "r.json"
    code, _, err = run(["quantize", MODEL, "--method", "minmax", "--checkpoint", str(checkpoint), *FAST,
                        "--json", str(out_json)], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["num_eval"] == 8 and r["default_data_source"].startswith("VITQUANT_SAMPLE_DIR")


def test_liu2021_mixed_precision_json_and_plots(sample_dir, checkpoint, tmp_path, capsys):
    out = tmp_path / "liu.json"
    code, text, err = run(["quantize", MODEL, "--method", "liu2021", "--w-bits", "6", "--a-bits", "6",
                           "--checkpoint", str(checkpoint), *data_args(sample_dir), *FAST, *SEARCH,
                           "--mixed-precision", "--bit-choices", "4,6,8", "--plots", "--json", str(out)], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    mp = r["mixed_precision"]
    assert r["config"]["mixed_precision"]["choices"] == [4, 6, 8]
    assert r["pipeline"] == ["check_mixed_precision_budget", "calibrate_bit_widths", "allocate_bits"]
    assert len(mp["modules"]) == 2 * 12 and {m["kind"] for m in mp["modules"]} == {"msa", "mlp"}
    assert all(m["bits"] in (4, 6, 8) and m["nuclear_norm"] > 0 for m in mp["modules"])
    assert mp["size_mb"] <= mp["budget_mb"] + 1e-9 and mp["size_mb"] == pytest.approx(r["model_size_mb"], abs=1e-4)
    for png in r["plots"]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "mixed precision" in text


def test_tsptq_full_and_partial_settings_json_and_plots(sample_dir, checkpoint, tmp_path, capsys):
    out = tmp_path / "ts.json"
    code, text, err = run(["quantize", MODEL, "--method", "tsptq", "--w-bits", "6", "--a-bits", "6",
                           "--checkpoint", str(checkpoint), *data_args(sample_dir), *FAST, *SEARCH,
                           "--plots", "--plot-block", "blocks.3", "--json", str(out)], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["setting"] == "full" == r["config"]["setting"]
    lo = r["layernorm_outliers"]
    assert len(lo) == 2 * 12 + 1 and all(v["quantizer"] == "o2sf" and v["channels"] == 192 for v in lo.values())
    assert all(v["outliers"] == len(v["outlier_channels"]) for v in lo.values())
    assert any(p.endswith("_v2sf_hist.png") for p in r["plots"])
    assert sum("_o2sf_" in p for p in r["plots"]) == 2  # norm1 and norm2 of the chosen block
    for png in r["plots"]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "setting" in text and "O-2SF" in text

    # partial setting: no LayerNorm quantized; PTQ4ViT in the full setting gets O-2SF LayerNorms
    code, _, err = run(["quantize", MODEL, "--method", "tsptq", "--quantize-layernorm", "off", "--w-bits", "6",
                        "--a-bits", "6", "--checkpoint", str(checkpoint), *data_args(sample_dir), *FAST, *SEARCH,
                        "--json", str(out)], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["setting"] == "partial" and "layernorm_outliers" not in r and r["config"]["softmax_v2sf"]
    code, _, err = run(["quantize", MODEL, "--method", "ptq4vit", "--quantize-layernorm", "--softmax-v2sf", "on",
                        "--checkpoint", str(checkpoint), *data_args(sample_dir), *FAST, *SEARCH, "--json", str(out)],
                       capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["setting"] == "full" and r["config"]["softmax_v2sf"] and not r["config"]["softmax_twin"]
    assert r["config"]["gelu_twin"] and len(r["layernorm_outliers"]) == 25


def test_save_then_load_reproduces_the_evaluated_model(sample_dir, checkpoint, tmp_path, capsys):
    import vitquant
    from vitquant.data import load_images
    from vitquant.evaluate import predict_top5, topk_accuracy
    from vitquant.models import data_config_for
    out, saved = tmp_path / "r.json", tmp_path / "saved"
    code, text, err = run(["quantize", MODEL, "--method", "ptq4vit", "--w-bits", "6", "--a-bits", "6",
                           "--checkpoint", str(checkpoint), *data_args(sample_dir), *FAST, *SEARCH,
                           "--save", str(saved), "--json", str(out)], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    model = vitquant.load(saved)
    evalset = load_images(sample_dir / "images", data_config_for(model), list_file=sample_dir / "splits" / "eval.txt",
                          require_labels=True)
    assert topk_accuracy(predict_top5(model, evalset, progress=False).top5, evalset.labels)[0] == pytest.approx(
        r["quant_top1"], abs=1e-3)
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["weights"]["weights_sha256"] == r["weights"]["weights_sha256"]
    assert manifest["model_args"]["img_size"] == 32 and manifest["config"]["w_bits"] == 6
    # 6-bit codes stored in int8: the file is about a quarter of the FP32 size
    assert r["saved"]["bytes_on_disk"] < 0.4 * r["fp32_model_size_mb"] * 1e6
    assert "saved" in text
    code, _, err = run(["quantize", MODEL, "--method", "minmax", "--checkpoint", str(checkpoint),
                        *data_args(sample_dir), *FAST, "--save", str(saved)], capsys)
    assert code == 2 and "exists and is not empty" in err


def test_no_eval_calibrates_and_saves_without_reading_evaluation_data(sample_dir, checkpoint, tmp_path, capsys):
    import vitquant
    out, saved = tmp_path / "r.json", tmp_path / "saved"
    img = str(sample_dir / "images")
    code, text, err = run(["quantize", MODEL, "--method", "minmax", "--checkpoint", str(checkpoint),
                           "--calib-data", img, "--calib-list", str(sample_dir / "splits" / "calib.txt"),
                           "--no-eval", *FAST, "--save", str(saved), "--json", str(out)], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["num_eval"] == 0 and r["eval_data"] is None and "quant_top1" not in r
    assert "not evaluated" in text and "top-1" not in text
    assert vitquant.load(saved) is not None
    code, _, err = run(["quantize", MODEL, "--method", "minmax", "--checkpoint", str(checkpoint),
                        *data_args(sample_dir), "--no-eval", *FAST], capsys)
    assert code == 2 and "--no-eval excludes --eval-data" in err


def test_unreadable_image_is_reported_not_fatal(sample_dir, checkpoint, tmp_path, capsys):
    (sample_dir / "images" / f"{WNIDS[0]}_9.JPEG").write_bytes(b"\xff\xd8broken")
    code, _, err = run(["quantize", MODEL, "--method", "minmax", "--checkpoint", str(checkpoint),
                        "--calib-data", str(sample_dir / "images"), "--eval-data", str(sample_dir / "images"),
                        *FAST], capsys)
    assert code == 0
    assert "warning: skipped 1 unreadable calibration images" in err
    assert "warning: skipped 1 unreadable evaluation images" in err


def test_console_script_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vitquant.cli", "quantize", "not_a_model_xyz"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("vitquant: error: unknown model")
    assert "Traceback" not in r.stderr


def test_torch_checkpoint_in_a_training_wrapper_loads_with_its_hash(tmp_path):
    from vitquant.models import load_model, sha256_file
    torch.manual_seed(1)
    ref = timm.create_model(MODEL, img_size=32)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": ref.state_dict(), "epoch": 3}, path)
    model, info = load_model(MODEL, path, img_size=32)
    assert info["weights_sha256"] == sha256_file(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
