"""Bad input: every case exits non-zero with one clear error line naming the problem, no traceback
and no output file; inputs where continuing is right (grayscale / CMYK images) succeed."""
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import WNIDS, write_images
from test_cli import FAST, MODEL, SEARCH, checkpoint, data_args, run  # noqa: F401  (fixture)
from vitquant.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory, checkpoint):  # noqa: F811
    """A quantized DeiT-Tiny (32 px) checkpoint directory written by quantize --save."""
    d = tmp_path_factory.mktemp("saved")
    write_images(d / "img", [f"{w}_{i}.JPEG" for w in WNIDS for i in range(2)])
    assert main(["quantize", MODEL, "--method", "minmax", "--checkpoint", str(checkpoint),
                 "--calib-data", str(d / "img"), "--eval-data", str(d / "img"), *FAST,
                 "--save", str(d / "q")]) == 0
    return d / "q"


def _bad_cases(sample_dir, checkpoint, saved, tmp_path):  # noqa: F811
    other = tmp_path / "vit_small.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", img_size=32).state_dict(), str(other))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    nan = tmp_path / "nan.safetensors"
    sd = timm.create_model(MODEL, img_size=32).state_dict()
    sd["blocks.3.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(sd, str(nan))
    (tmp_path / "empty").mkdir()
    few = write_images(tmp_path / "few", [f"{WNIDS[0]}_1.JPEG", f"{WNIDS[1]}_2.JPEG"])
    zero = tmp_path / "zero"
    zero.mkdir()
    for n in (f"{WNIDS[0]}_1.JPEG", f"{WNIDS[1]}_2.JPEG"):
        (zero / n).write_bytes(b"")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for n in (f"{WNIDS[0]}_1.JPEG", f"{WNIDS[1]}_2.JPEG"):
        (corrupt / n).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "ghosts.txt").write_text("ghost_1.JPEG\nghost_2.JPEG\n")
    (tmp_path / "labels.txt").write_text(f"{WNIDS[0]}_0.JPEG n99999999\n")
    tampered = tmp_path / "tampered"
    shutil.copytree(saved, tampered)
    raw = bytearray((tampered / "model.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(raw))
    foreign_work = tmp_path / "foreign_work"
    foreign_work.mkdir()
    (foreign_work / "fingerprint.json").write_text(json.dumps({"config": {"w_bits": 4}}))
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    (tmp_path / "typo.yaml").write_text(f"models: [{MODEL}]\nmethods: [base]\nbits: [W8A8]\nseeds: [0]\n"
                                        "options: {num_candidate: 8}\n")
    (tmp_path / "typo_key.yaml").write_text(f"modles: [{MODEL}]\nmethods: [base]\nbits: [W8A8]\n")
    images = sorted(f.name for f in (sample_dir / "images").iterdir())
    (tmp_path / "labels_1005.txt").write_text("".join(f"{n} {1005 if i == len(images) - 1 else 3}\n" for i, n in enumerate(images)))
    (tmp_path / "labels_ghost.txt").write_text("".join(f"{n} 3\n" for n in images) + "ghost_9.JPEG 3\n")
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07not an onnx protobuf" * 50)
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])])
    whole = helper.make_model(graph, producer_name="x" * 200).SerializeToString()
    (tmp_path / "truncated.onnx").write_bytes(whole[: len(whole) // 2])

    def saved_variant(name, edit_manifest=None, tensors=None):
        d = tmp_path / name
        shutil.copytree(saved, d)
        if tensors is not None:
            (d / "model.safetensors").write_bytes(tensors)
        m = json.loads((d / "manifest.json").read_text())
        if tensors is not None:
            import hashlib
            m["tensors_sha256"] = hashlib.sha256(tensors).hexdigest()
        if edit_manifest is not None:
            edit_manifest(m)
        (d / "manifest.json").write_text(json.dumps(m))
        return str(d)
    newer = saved_variant("newer", lambda m: m.update(format="vitquant-checkpoint/99", vitquant_version="9.0.0"))
    incomplete = saved_variant("incomplete", lambda m: m.pop("quantizers"))
    unknown_q = saved_variant("unknown_q", lambda m: next(iter(m["quantizers"].values())).update(type="Future9"))
    bad_tensors = saved_variant("bad_tensors", tensors=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    cut_manifest = tmp_path / "cut_manifest"
    shutil.copytree(saved, cut_manifest)
    text = (cut_manifest / "manifest.json").read_text()
    (cut_manifest / "manifest.json").write_text(text[: len(text) // 2])
    base = ["quantize", MODEL, "--checkpoint", str(checkpoint), *data_args(sample_dir), *FAST, *SEARCH]
    img = str(sample_dir / "images")
    return {
        # models and weights
        "unknown model": (["quantize", "not_a_model_xyz", *FAST[:-2]], "unknown model"),
        "checkpoint of another model": (["quantize", MODEL, "--checkpoint", str(other), *data_args(sample_dir),
                                         *FAST], "does not match model"),
        "truncated checkpoint": (["quantize", MODEL, "--checkpoint", str(truncated), *data_args(sample_dir), *FAST],
                                 "cannot read checkpoint"),
        "missing checkpoint": (["quantize", MODEL, "--checkpoint", str(tmp_path / "nope.pt"), *FAST],
                               "checkpoint not found"),
        "NaN weights": (["quantize", MODEL, "--checkpoint", str(nan), *data_args(sample_dir), *FAST], "NaN"),
        # data
        "missing data dir": (base + ["--calib-data", str(tmp_path / "missing"), "--calib-list",
                                     str(sample_dir / "splits" / "calib.txt")], "not found"),
        "empty data dir": (["quantize", MODEL, "--checkpoint", str(checkpoint), "--calib-data", str(tmp_path / "empty"),
                            "--eval-data", img, *FAST], "no images found"),
        "data dir is a file": (base + ["--calib-data", str(tmp_path / "a_file"), "--calib-list",
                                       str(sample_dir / "splits" / "calib.txt")], "not found"),
        "zero-byte JPEGs only": (["quantize", MODEL, "--checkpoint", str(checkpoint), "--calib-data", str(zero),
                                  "--eval-data", img, *FAST[:-2], "--num-calib", "2"], "could be read"),
        "corrupt JPEGs only": (["quantize", MODEL, "--checkpoint", str(checkpoint), "--calib-data", str(corrupt),
                                "--eval-data", img, *FAST[:-2], "--num-calib", "2"], "could be read"),
        "calibration set smaller than requested": (["quantize", MODEL, "--checkpoint", str(checkpoint),
                                                    "--calib-data", str(few), "--eval-data", str(few), *FAST[:-2],
                                                    "--num-calib", "5"], "--num-calib 5"),
        "missing list file": (base + ["--calib-list", str(tmp_path / "nolist.txt")], "list file not found"),
        "empty list file": (base + ["--calib-list", str(tmp_path / "empty.txt")], "is empty"),
        "list names files that do not exist": (base + ["--calib-list", str(tmp_path / "ghosts.txt")], "are not in"),
        "labels file with an unknown class": (["eval", str(saved), "--eval-data", img, "--labels",
                                               str(tmp_path / "labels.txt"), "--quiet"], "unknown label"),
        "labels outside the model's classes (quantize)": (base + ["--eval-list", str(sample_dir / "splits" / "eval.txt"),
                                                                  "--labels", str(tmp_path / "labels_1005.txt")],
                                                          "outside the model's 1000 classes"),
        "labels outside the model's classes (eval)": (["eval", str(saved), "--eval-data", img, "--labels",
                                                       str(tmp_path / "labels_1005.txt"), "--quiet"],
                                                      "outside the model's 1000 classes"),
        "labels file naming missing images": (["eval", str(saved), "--eval-data", img, "--labels",
                                               str(tmp_path / "labels_ghost.txt"), "--quiet"], "not in"),
        # options
        "bits 0": (base + ["--w-bits", "0"], "bit-width"),
        "bits 1": (base + ["--a-bits", "1"], "bit-width"),
        "bits 17": (base + ["--w-bits", "17"], "bit-width"),
        "bits non-integer": (base + ["--w-bits", "4.5"], "bit-width"),
        "zero calibration images": (base + ["--num-calib", "0"], "expected a positive int"),
        "unknown method": (base + ["--method", "magic"], "invalid choice"),
        "unknown Omega": (base + ["--method", "liu2021", "--mixed-precision", "--omega", "magic"], "invalid choice"),
        "bit choices without mixed precision": (base + ["--method", "liu2021", "--bit-choices", "4,6"],
                                                "need --mixed-precision"),
        "mixed precision with unequal bits": (base + ["--method", "liu2021", "--mixed-precision", "--w-bits", "6",
                                                      "--a-bits", "8"], "equal --w-bits and --a-bits"),
        "bad bit choice": (base + ["--method", "liu2021", "--mixed-precision", "--bit-choices", "4,x"], "bit choices"),
        "mixed-precision budget that cannot be met": (base + ["--method", "liu2021", "--mixed-precision",
                                                              "--target-size-mb", "0.01"], "cannot be met"),
        "ranking options without ranking": (base + ["--method", "liu2021", "--no-ranking", "--ranking-theta", "1"],
                                            "drop --no-ranking"),
        "twin and V-2SF together": (base + ["--softmax-twin", "on", "--softmax-v2sf", "on"], "exclude each other"),
        "LayerNorm quantizer in the partial setting": (base + ["--layernorm-quantizer", "uniform"],
                                                       "needs the fully quantized setting"),
        "unknown LayerNorm quantizer": (base + ["--method", "tsptq", "--layernorm-quantizer", "log"], "invalid choice"),
        "V-2SF at 2 bits": (base + ["--method", "tsptq", "--w-bits", "2", "--a-bits", "2"], "at least 3"),
        "unknown plot block": (base + ["--method", "tsptq", "--plots", "--plot-block", "blocks.99"], "unknown block"),
        # outputs
        "output directory missing": (base + ["--save", str(tmp_path / "nodir" / "q")], "does not exist"),
        "output path under a file": (base + ["--save", str(tmp_path / "a_file" / "q")], "does not exist"),
        "save into a non-empty directory": (base + ["--save", str(nonempty)], "exists and is not empty"),
        "work directory of another run": (base + ["--work-dir", str(foreign_work)], "different run"),
        # saved models and exports
        "export of a directory that is no checkpoint": (["export", str(tmp_path / "empty"), "--onnx",
                                                         str(tmp_path / "x.onnx")], "not a vitquant checkpoint"),
        "export check tolerance not positive": (["export", str(saved), "--onnx", str(tmp_path / "t.onnx"),
                                                 "--verify-tolerance", "0"], "must be positive"),
        "unknown int8 storage": (["export", str(saved), "--onnx", str(tmp_path / "t.onnx"), "--int8", "int4"],
                                 "invalid choice"),
        "tampered checkpoint tensors": (["eval", str(tampered), "--eval-data", img, "--quiet"],
                                        "does not match its manifest"),
        "missing ONNX file": (["eval", str(tmp_path / "nope.onnx"), "--eval-data", img, "--quiet"],
                              "ONNX file not found"),
        "corrupt ONNX file": (["eval", str(tmp_path / "garbage.onnx"), "--eval-data", img, "--quiet"],
                              "cannot read ONNX file"),
        "truncated ONNX file": (["eval", str(tmp_path / "truncated.onnx"), "--eval-data", img, "--quiet"],
                                "cannot read ONNX file"),
        "OpenVINO runtime for a saved directory": (["eval", str(saved), "--eval-data", img, "--quiet",
                                                    "--runtime", "openvino"], "runs .onnx files"),
        "saved directory from a newer vitquant": (["eval", newer, "--eval-data", img, "--quiet"], "upgrade vitquant"),
        "manifest lacking a field": (["eval", incomplete, "--eval-data", img, "--quiet"], "lacks quantizers"),
        "manifest naming an unknown quantizer": (["eval", unknown_q, "--eval-data", img, "--quiet"],
                                                 "unknown type 'Future9'"),
        "unreadable safetensors (hash matches)": (["eval", bad_tensors, "--eval-data", img, "--quiet"],
                                                  "cannot read"),
        "truncated manifest": (["eval", str(cut_manifest), "--eval-data", img, "--quiet"], "cannot read"),
        "export of a truncated manifest": (["export", str(cut_manifest), "--onnx", str(tmp_path / "c.onnx")],
                                           "cannot read"),
        "bench of a directory that is no checkpoint": (["bench", str(tmp_path / "empty")], "not a vitquant checkpoint"),
        "bench of an unknown model name": (["bench", "not_a_model_xyz", "--random-init"], "unknown model"),
        "bench of a file": (["bench", str(tmp_path / "a_file")], "is a file"),
        # sweeps
        "sweep spec with a misspelt option": (["sweep", str(tmp_path / "typo.yaml"), "--out", str(tmp_path / "sw")],
                                              "unknown option 'num_candidate'"),
        "sweep spec with a misspelt key": (["sweep", str(tmp_path / "typo_key.yaml"), "--out", str(tmp_path / "sw")],
                                           "unknown key 'modles'"),
        "missing sweep spec": (["sweep", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "sw")],
                               "sweep spec not found"),
        "report of a directory that is no sweep": (["report", str(tmp_path / "empty")], "not a sweep output directory"),
    }


def test_bad_input_gives_one_error_line_and_no_output(sample_dir, checkpoint, saved, tmp_path, capsys):  # noqa: F811
    cases = _bad_cases(sample_dir, checkpoint, saved, tmp_path)
    assert len(cases) >= 20
    for name, (args, needle) in cases.items():
        out_json = tmp_path / f"{name.replace(' ', '_')}.json"
        code = None
        try:
            code = main(args + ["--json", str(out_json)])
        except SystemExit as e:  # argparse errors
            code = e.code
        out, err = capsys.readouterr()
        lines = [line for line in err.strip().splitlines() if line]
        assert code == 2, (name, err)
        assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], (name, err)
        assert "Traceback" not in err and not out_json.exists(), name
    # nothing half-written anywhere: no temporary files, no created output directories
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "nodir").exists() and not (tmp_path / "sw").exists()


def test_grayscale_and_cmyk_images_are_converted_and_used(checkpoint, tmp_path, capsys):  # noqa: F811
    d = tmp_path / "modes"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (36, 40), dtype=np.uint8), "L").save(d / f"{WNIDS[0]}_1.JPEG")
    Image.fromarray(rng.integers(0, 255, (36, 40, 4), dtype=np.uint8), "CMYK").save(d / f"{WNIDS[1]}_2.JPEG")
    write_images(d, [f"{WNIDS[2]}_3.JPEG"])
    code, _, err = run(["quantize", MODEL, "--method", "minmax", "--checkpoint", str(checkpoint), "--calib-data",
                        str(d), "--eval-data", str(d), *FAST[:-2], "--num-calib", "3", "--json",
                        str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["num_calib"] == 3 and r["num_eval"] == 3 and r["calib_data"]["num_skipped"] == 0
