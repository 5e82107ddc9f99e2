"""ONNX export (QDQ) and ONNX Runtime: same predictions as the simulated model, integer kernels."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_deit_checkpoint, tiny_swin, tiny_vit
import vitquant
from vitquant import get_recipe, quantize
from vitquant.cli import main
from vitquant.export.onnx import OrtModel, export_onnx, integer_kernels
from vitquant.export.verify import ExportMismatch

FAST = dict(rounds=1, num_candidates=8)
CASES = [("ptq4vit", 8, tiny_vit), ("tsptq", 8, tiny_vit), ("liu2021", 8, tiny_vit), ("base", 6, tiny_vit),
         ("ptq4vit", 8, tiny_swin), ("tsptq", 8, tiny_swin)]


@pytest.mark.parametrize("method,bits,make", CASES, ids=[f"{m}-w{b}-{f.__name__}" for m, b, f in CASES])
def test_onnx_runtime_reproduces_the_simulated_model(method, bits, make, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g)
    model, _ = quantize(make(), x, get_recipe(method, bits, bits, **FAST), progress=False)
    info = export_onnx(model, tmp_path / "q.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "q.onnx"))
    check = info["check"]  # the export verified itself on seeded random inputs
    assert check["ok"] and check["mean_logit_diff"] <= check["allowed_mean_diff"] and check["num_inputs"] == 8
    assert check["inputs"].startswith("random") and 0 <= check["top1_agreement"] <= 1
    with torch.no_grad():
        expect = model(x)
    got = OrtModel(tmp_path / "q.onnx")(x)
    # same quantized arithmetic; only float summation order differs (and rare rounding ties)
    torch.testing.assert_close(got, expect, rtol=1e-2, atol=1e-2 * float(expect.abs().max()))
    assert torch.equal(got.argmax(1), expect.argmax(1))
    # weights are stored as int8 and every quantized Linear / matmul runs an integer kernel
    n_linear = sum(1 for n, m in model.named_modules() if type(m).__name__ == "QuantLinear")
    assert info["int8_weights"] == n_linear + 1  # + the patch-embedding conv
    runtime = integer_kernels(tmp_path / "q.onnx", model)
    assert sum(runtime["integer_ops"].values()) >= n_linear
    # traced per op: every quantized Linear (the 2-D head included) and matmul runs an integer kernel,
    # except (known ONNX Runtime limitation, reported by the bench) Swin's patch-merging reduction
    # when its LayerNorm input is quantized too (full setting): ORT leaves that MatMul in float
    matmul_ops = [n for n, op in vitquant.quant_ops(model, active=True)
                  if type(op).__name__ in ("QuantLinear", "QuantMatMul")]
    unfused = {n for n in matmul_ops if "downsample.reduction" in n and model.vitquant_config.quantize_layernorm}
    assert {n for n, k in runtime["ops"].items() if k == "float" and n in matmul_ops} == unfused
    assert sorted(n for n, k in runtime["ops"].items() if k == "integer") == sorted(set(matmul_ops) - unfused)
    assert runtime["accelerated"] == (not unfused) and runtime["float_matmuls"] == len(unfused)
    assert sum(c["integer"] for c in runtime["by_quantizer"].values()) == len(matmul_ops) - len(unfused)
    assert "QuantizeLinear" in info["nodes"] and "DequantizeLinear" in info["nodes"]
    # two-range splits are Mul / Sub, not ONNX Runtime's slow Where (vitquant.quantizers.base.split_at);
    # a Where outside the blocks is a shape computation (the class token's expand to the batch size)
    assert [n.name for n in onnx.load(tmp_path / "q.onnx").graph.node
            if n.op_type == "Where" and any(k in n.name for k in ("blocks", "layers"))] == []


def test_fp32_export_has_no_quantization(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model, _ = quantize(tiny_vit(), x, get_recipe("minmax"), progress=False)
    info = export_onnx(model, tmp_path / "f.onnx", fp32=True)
    assert "QuantizeLinear" not in info["nodes"] and info["int8_weights"] == 0
    with torch.no_grad(), vitquant.quantization_disabled(model):
        torch.testing.assert_close(OrtModel(tmp_path / "f.onnx")(x), model(x), rtol=1e-4, atol=1e-4)
    assert not integer_kernels(tmp_path / "f.onnx")["integer_ops"]


def test_more_than_8_bits_is_refused():
    model, _ = quantize(tiny_vit(), torch.randn(2, 3, 32, 32), get_recipe("minmax", 10, 10), progress=False)
    with pytest.raises(ValueError, match="do not fit"):
        export_onnx(model, "/nonexistent/never_written.onnx")


def test_cli_save_export_eval_bench(sample_dir, tmp_path, capsys):
    ckpt = tiny_deit_checkpoint(tmp_path)
    img, lists = str(sample_dir / "images"), sample_dir / "splits"
    evalargs = ["--eval-data", img, "--eval-list", str(lists / "eval.txt"), "--quiet"]
    assert main(["quantize", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--img-size", "32", "--num-calib", "4",
                 "--calib-data", img, "--calib-list", str(lists / "calib.txt"), *evalargs, "--num-candidates", "8",
                 "--search-rounds", "1", "--save", str(tmp_path / "q"), "--json", str(tmp_path / "r.json")]) == 0
    assert main(["export", str(tmp_path / "q"), "--onnx", str(tmp_path / "q.onnx"), "--json", str(tmp_path / "x.json")]) == 0
    exported = json.loads((tmp_path / "x.json").read_text())
    assert exported["runtime"]["integer_ops"] and exported["check"]["ok"]
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
    bits = json.loads(meta["vitquant.weight_bits"])  # the bit-width of every weight, whatever its storage
    assert bits and set(bits.values()) == set(exported["weight_bits"]) and "8-bit" in meta["vitquant.weight_storage"]
    assert exported["check"]["inputs"] == "calibration images" and exported["check"]["num_inputs"] == 4
    assert "export check on 4 calibration images" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "q.onnx"), *evalargs, "--json", str(tmp_path / "e1.json")]) == 0
    assert main(["eval", str(tmp_path / "q"), *evalargs, "--json", str(tmp_path / "e2.json")]) == 0
    e1, e2 = (json.loads((tmp_path / f).read_text()) for f in ("e1.json", "e2.json"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert e1["runtime"] == "onnxruntime" and e2["runtime"] == "pytorch"
    assert e2["top1"] == pytest.approx(r["quant_top1"], abs=1e-3)  # the saved model is the evaluated one
    agree = sum(a[0] == b[0] for a, b in zip(e1["top5_indices"], e2["top5_indices"])) / len(e1["top5_indices"])
    assert agree >= 0.75  # 8 images of a random-init model: near-tied logits may flip
    # OpenVINO beside it: tests/test_openvino.py (in a child process)
    assert main(["bench", str(tmp_path / "q"), "--batch-sizes", "1", "2", "--repeats", "2", "--warmup", "1",
                 "--runtime", "onnxruntime", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        for k in ("torch_fp32_ips", "onnx_fp32_ips", "onnx_int8_ips", "int8_speedup", "accelerated"):
            assert k in row
        assert row["accelerated"] is True and row["int8_speedup"] == pytest.approx(
            row["onnx_int8_ips"] / row["onnx_fp32_ips"], rel=1e-2)
        assert row["ort_static"]["per_channel"] and row["ort_static_speedup"] == pytest.approx(
            row["ort_static_int8_ips"] / row["onnx_fp32_ips"], rel=1e-2)
        assert set(row["checks"]) == {"onnx_int8_exact"} and row["checks"]["onnx_int8_exact"]["ok"]
        assert "openvino_fp32_ips" not in row and row["best_int8"] == "onnx_int8_exact"
    # a model name instead of a saved directory: quantized here (random init, synthetic images), then timed
    assert main(["bench", "deit_tiny_patch16_224", "--random-init", "--img-size", "32", "--method", "minmax",
                 "--batch-sizes", "2", "--repeats", "1", "--warmup", "1", "--quiet", "--runtime", "onnxruntime",
                 "--json", str(tmp_path / "b2.json")]) == 0
    (row,) = json.loads((tmp_path / "b2.json").read_text())
    assert row["model"] == "deit_tiny_patch16_224" and row["saved"] is None and row["accelerated"] is True
    assert row["quantized_here"]["method"] == "minmax" and "synthetic" in row["quantized_here"]["calib_data"]
    # --softmax-quantizer on a model name: log2 codes after the softmax leave attn @ v without integer kernel
    assert main(["bench", "deit_tiny_patch16_224", "--random-init", "--img-size", "32", "--method", "minmax",
                 "--softmax-quantizer", "log2", "--batch-sizes", "2", "--repeats", "1", "--warmup", "1", "--quiet",
                 "--runtime", "onnxruntime", "--json", str(tmp_path / "b3.json")]) == 0
    (row,) = json.loads((tmp_path / "b3.json").read_text())
    assert row["quantized_here"]["config"]["softmax_log"] == "log2" and row["accelerated"] is False
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "missing.onnx"), *evalargs]) == 2
    assert "ONNX file not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--onnx", str(tmp_path / "z.onnx")]) == 2
    assert "not a vitquant checkpoint" in capsys.readouterr().err and not (tmp_path / "z.onnx").exists()


def test_ort_quantize_static_baseline(tmp_path, caplog):
    """ONNX Runtime's own quantize_static of the FP32 export: a QDQ graph with per-channel int8
    weights that ORT runs as integer kernels and that tracks the FP32 model; no images, no file;
    ORT's per-LayerNorm root-logger warnings are held back, and the root logger's level restored."""
    import logging
    from vitquant.export.ort_static import ort_quantize_static
    torch.manual_seed(0)
    model = tiny_vit()
    calib = torch.randn(16, 3, 32, 32)
    model, _ = quantize(model, calib, get_recipe("minmax", 8, 8), progress=False)
    export_onnx(model, tmp_path / "fp32.onnx", fp32=True, verify=False)
    with pytest.raises(ValueError, match="at least one calibration image"):
        ort_quantize_static(tmp_path / "fp32.onnx", tmp_path / "none.onnx", calib[:0])
    assert not (tmp_path / "none.onnx").exists()
    caplog.set_level(logging.WARNING)
    info = ort_quantize_static(tmp_path / "fp32.onnx", tmp_path / "static.onnx", calib)
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    assert logging.getLogger().level == logging.WARNING
    assert info["num_calib"] == 16 and info["calibrate_method"] == "MinMax"
    graph = onnx.load(tmp_path / "static.onnx").graph
    inits = {t.name: t for t in graph.initializer}
    weight_scales = [inits[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8
                     and len(inits[n.input[0]].dims) == 2]
    assert weight_scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in weight_scales)  # per channel
    assert integer_kernels(tmp_path / "static.onnx")["integer_ops"]
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with vitquant.quantization_disabled(model), torch.no_grad():
        ref = model(x)
    got = OrtModel(tmp_path / "static.onnx")(x)
    # MinMax per-tensor activations on this random-init model: cosine ~0.74 to FP32 (vitquant's minmax
    # W8A8 simulation 0.999); a wrong graph (scales, layout) gives ~0
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.5


def _broken_qdq(monkeypatch, factor=1.05):
    """Every activation QDQ of the export uses a step ``factor`` off: a plausible export defect."""
    from vitquant.quantizers import base
    real = base.qdq
    monkeypatch.setattr(base, "qdq", lambda x, scale, *a: real(x, torch.as_tensor(scale) * factor, *a))


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_a_broken_export_is_refused_and_not_written(make, tmp_path, monkeypatch):
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model, _ = quantize(make(), x, get_recipe("ptq4vit", 8, 8, **FAST), progress=False)
    good = export_onnx(model, tmp_path / "good.onnx")["check"]
    _broken_qdq(monkeypatch)
    with pytest.raises(ExportMismatch, match="does not compute the simulated model") as e:
        export_onnx(model, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.glob(".bad.onnx*"))
    assert "not written" in str(e.value) and "\n" not in str(e.value)
    # the defect shows far above the noise floor; the good export sits within it
    bad = export_onnx(model, tmp_path / "unchecked.onnx", tolerance=1e12)["check"]
    assert bad["mean_logit_diff"] > 10 * good["allowed_mean_diff"] / good["tolerance"]
    assert good["ok"] and good["mean_logit_diff"] <= good["allowed_mean_diff"]


def test_cli_export_refuses_a_broken_graph_with_one_line(sample_dir, tmp_path, capsys, monkeypatch):
    ckpt = tiny_deit_checkpoint(tmp_path)
    img, lists = str(sample_dir / "images"), sample_dir / "splits"
    assert main(["quantize", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "--img-size", "32", "--num-calib", "4",
                 "--calib-data", img, "--calib-list", str(lists / "calib.txt"), "--no-eval", "--quiet",
                 "--num-candidates", "8", "--search-rounds", "1", "--save", str(tmp_path / "q")]) == 0
    loaded = vitquant.load(tmp_path / "q")  # the 4 calibration images travel with the checkpoint
    assert loaded.vitquant_calibration_sample.shape == (4, 3, 32, 32)
    _broken_qdq(monkeypatch, 1.1)  # a 12-block random-init model: LayerNorms damp a step error
    capsys.readouterr()
    assert main(["export", str(tmp_path / "q"), "--onnx", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitquant: error: the exported graph does not compute")
    assert "4 calibration images" in err[0] and not (tmp_path / "q.onnx").exists()
    # --no-verify writes it anyway (and says the check was skipped)
    assert main(["export", str(tmp_path / "q"), "--onnx", str(tmp_path / "q.onnx"), "--no-verify"]) == 0
    assert "export check skipped" in capsys.readouterr().out and (tmp_path / "q.onnx").exists()


def test_int8_storage_modes_compute_the_same_codes(tmp_path, monkeypatch):
    """exact (default) stores every code a matmul reads as uint8 (signed codes + 128); fast keeps
    int8. Same codes, same logits; a fast file on a CPU without VNNI warns."""
    import warnings
    from vitquant import report
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model, _ = quantize(tiny_vit(), x, get_recipe("ptq4vit", 8, 8, **FAST), progress=False)
    exact = export_onnx(model, tmp_path / "exact.onnx")
    cpu = report.cpu_info()
    vnni = bool(cpu["isa"]) and cpu["isa"].get("vnni", False)
    # without VNNI the fast file computes wrong results here (saturating u8 x s8 kernels): its export
    # check may fail, as it should, and its logits are not compared
    fast = export_onnx(model, tmp_path / "fast.onnx", int8="fast", verify=vnni)
    graphs = {m: onnx.load(tmp_path / f"{m}.onnx").graph for m in ("exact", "fast")}
    weight_types = {m: {n.attribute[0].t.data_type for n in g.node if n.op_type == "Constant" and n.attribute
                        and len(n.attribute[0].t.dims) >= 2 and n.attribute[0].t.data_type != onnx.TensorProto.FLOAT}
                    for m, g in graphs.items()}
    assert weight_types == {"exact": {onnx.TensorProto.UINT8}, "fast": {onnx.TensorProto.INT8}}
    assert exact["check"]["ok"] and exact["int8_weights"] == fast["int8_weights"]
    if vnni:
        assert fast["check"]["ok"]
        a, b = OrtModel(tmp_path / "exact.onnx")(x), OrtModel(tmp_path / "fast.onnx")(x)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    no_vnni = report.cpu_info() | {"architecture": "x86_64",
                                   "isa": dict.fromkeys(["avx2", "avx512f", "avx512_vnni", "avx_vnni", "vnni"], False)}
    monkeypatch.setattr(report, "cpu_info", lambda: no_vnni)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OrtModel(tmp_path / "exact.onnx")
        OrtModel(tmp_path / "fast.onnx")
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "fast.onnx" in msgs[0] and "no VNNI" in msgs[0]
    with pytest.raises(ValueError, match="int8 storage"):
        export_onnx(model, tmp_path / "bad.onnx", int8="int4")


_ORT_RUNNER = """
import json, sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.log_severity_level = 3
x, sim = np.load(sys.argv[1]), np.load(sys.argv[2])
out = {}
for path in sys.argv[3:]:
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out[path] = float(np.abs(s.run(None, {s.get_inputs()[0].name: x})[0] - sim).max())
print(json.dumps(out))
"""


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64",
                    reason="needs qemu-user (apt-get install qemu-user) on x86_64 to emulate an AVX2-only CPU")
def test_exact_int8_storage_is_exact_on_an_avx2_only_cpu(tmp_path):
    """ONNX Runtime under an emulated Haswell (AVX2, no AVX-512, no VNNI): the default uint8 storage
    computes the simulated model; int8 storage (u8 x s8 kernels) saturates there."""
    import numpy as np
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model, _ = quantize(tiny_vit(), x, get_recipe("ptq4vit", 8, 8, **FAST), progress=False)
    with torch.no_grad():
        np.save(tmp_path / "sim.npy", model(x).numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    export_onnx(model, tmp_path / "exact.onnx")
    # unchecked: on a host without VNNI the fast file's export check fails, as this test shows emulated
    export_onnx(model, tmp_path / "fast.onnx", int8="fast", verify=False)
    (tmp_path / "run.py").write_text(_ORT_RUNNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", os.path.realpath(sys.executable), str(tmp_path / "run.py"),
                           str(tmp_path / "x.npy"), str(tmp_path / "sim.npy"), str(tmp_path / "exact.onnx"),
                           str(tmp_path / "fast.onnx")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    diff = json.loads(done.stdout.strip().splitlines()[-1])
    assert diff[str(tmp_path / "exact.onnx")] < 1e-5
    assert diff[str(tmp_path / "fast.onnx")] > 1e-3  # the emulated CPU really lacks VNNI

def _weight_dequantize(path):
    """Each weight DequantizeLinear of an ONNX file whose zero point is a per-channel tensor:
    name -> (code dtype, codes - zero as int32, scales, whether any zero point is nonzero)."""
    from onnx import numpy_helper
    m = onnx.load(str(path))
    const = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"}
    out = {}
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in const or len(n.input) < 3:
            continue
        codes, scale, zero = const[n.input[0]], const[n.input[1]], const[n.input[2]]
        if codes.ndim < 2 or zero.ndim != 1:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * codes.ndim
        shape[axis] = -1
        out[n.output[0]] = (codes.dtype, codes.astype(np.int32) - zero.astype(np.int32).reshape(shape), scale,
                            bool((zero != 0).any()))
    return out


def _ops_until(path, op_name, stop):
    """The op types ONNX Runtime runs (optimised graph) from the integer matmul of the first block's
    ``op_name`` to the first ``stop`` node along its consumers (sorted)."""
    from vitquant.export.onnx import session
    opt = str(path) + ".opt.onnx"
    session(path, optimized_path=opt)
    nodes = list(onnx.load(opt).graph.node)
    start = next(n for n in nodes if n.op_type in ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul")
                 and f"blocks.0/attn/{op_name}/" in n.name)
    seen, frontier = [], list(start.output)
    while frontier:
        consumers = [n for n in nodes if frontier[0] in n.input]
        frontier = frontier[1:]
        for n in consumers:
            if n.op_type == stop:
                return sorted(seen)
            seen.append(n.op_type)
            frontier += list(n.output)
    raise AssertionError(f"no {stop} after {op_name}")


def _integer_matmuls(path, scope):
    """Integer matmul kernels ONNX Runtime runs in ``scope`` (and its numbered repeat calls)."""
    from vitquant.export.onnx import session
    opt = str(path) + ".opt.onnx"
    session(path, optimized_path=opt)
    return sum(1 for n in onnx.load(opt).graph.node if n.op_type == "MatMulIntegerToFloat"
               and (f"{scope}/" in n.name or re.search(re.escape(scope) + r"_\d+/", n.name)))


def test_uniform_families_make_the_flagship_run_integer_kernels(tmp_path):
    """``--softmax-quantizer uniform --gelu-quantizer uniform`` (``recipes.activation_quantizer``) on
    vitq: every quantized Linear and matmul then runs an integer kernel in ONNX Runtime (the
    recipe's own log quantizers leave attn @ v and fc2 float), and the file computes the simulation."""
    from vitquant.recipes import activation_quantizer
    small = dict(num_candidates=32, width=8, steps=2, rounds=1, gelu_bases=4, gelu_ranges=4, gelu_width=8)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    uniform = get_recipe("vitq", 8, 8, **small).replace(**activation_quantizer("softmax", "uniform"),
                                                         **activation_quantizer("gelu", "uniform"))
    assert uniform.softmax_log is None and uniform.gelu_log is None and uniform.fpcs is not None
    runtimes = {}
    for name, cfg in {"log": get_recipe("vitq", 8, 8, **small), "uniform": uniform}.items():
        model, _ = quantize(tiny_vit(), x, cfg, progress=False)
        info = export_onnx(model, tmp_path / f"{name}.onnx")
        assert info["check"]["ok"]
        runtimes[name] = integer_kernels(tmp_path / f"{name}.onnx", model)
        if name == "uniform":
            with torch.no_grad():
                expect = model(x)
            got = OrtModel(tmp_path / f"{name}.onnx")(x)
            torch.testing.assert_close(got, expect, rtol=1e-2, atol=1e-2 * float(expect.abs().max()))
            # --int8 fast: AdaLog's asymmetric weights become int8 codes - 128 with zero points - 128
            # (u8 x s8 kernels), the same values as the uint8 file's
            fast = export_onnx(model, tmp_path / "fast.onnx", int8="fast")
            assert fast["check"]["ok"] and integer_kernels(tmp_path / "fast.onnx", model)["accelerated"]
            weights = {n: _weight_dequantize(tmp_path / f"{f}.onnx") for n, f in (("exact", name), ("fast", "fast"))}
            assert weights["exact"].keys() == weights["fast"].keys() and weights["exact"]
            for key, (dtype, levels, scale, shifted) in weights["fast"].items():
                e_dtype, e_levels, e_scale, _ = weights["exact"][key]
                assert dtype == np.int8 and e_dtype == np.uint8
                np.testing.assert_array_equal(levels, e_levels)
                np.testing.assert_array_equal(scale, e_scale)
            assert any(shifted for *_, shifted in weights["fast"].values())  # asymmetric zero points kept
            torch.testing.assert_close(OrtModel(tmp_path / "fast.onnx")(x), got, rtol=1e-5, atol=1e-5)
            # q @ k^T with per-head zero points and steps is exported one head at a time, each head's
            # steps and zero points per tensor inside the integer kernel: between it and the softmax
            # only the attention scale (the batched form had two corrections and a Mul here, and a
            # Div and an Add before every QDQ)
            assert _ops_until(tmp_path / "fast.onnx", "matmul_qk", "Softmax") == ["Mul"]
            heads = model.blocks[0].attn.num_heads
            for role in ("matmul_qk", "matmul_av"):
                assert _integer_matmuls(tmp_path / "fast.onnx", f"blocks.0/attn/{role}") == heads
    assert not runtimes["log"]["accelerated"] and runtimes["log"]["float_matmuls"] > 0
    assert runtimes["uniform"]["accelerated"] and runtimes["uniform"]["float_matmuls"] == 0
    with pytest.raises(ValueError, match="unknown post-gelu quantizer 'log2'"):
        activation_quantizer("gelu", "log2")
