"""Quantized checkpoints: save -> load gives the same logits bit for bit, for every recipe."""
import json

import pytest
import torch

from conftest import tiny_swin, tiny_vit
import vitquant
from vitquant import VitquantError, get_recipe, quantize
from vitquant.recipes import MixedPrecisionConfig, RoundingConfig

VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
SWIN_ARGS = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                 num_classes=10)
FAST = dict(rounds=1, num_candidates=8)


def _configs():
    return {
        "minmax": get_recipe("minmax", 8, 8),
        "percentile": get_recipe("percentile", 6, 8),
        "base": get_recipe("base", 4, 4, **FAST),
        "ptq4vit": get_recipe("ptq4vit", 6, 6, **FAST),
        "liu2021 mixed precision": get_recipe("liu2021", 6, 6, rounds=2, num_candidates=8).replace(
            mixed_precision=MixedPrecisionConfig(choices=(4, 6, 8))),
        "tsptq full": get_recipe("tsptq", 6, 6, **FAST),
        "tsptq uniform LayerNorm, per-channel weights": get_recipe("tsptq", 8, 8, **FAST).replace(
            layernorm_quantizer="uniform", per_channel_weights=True),
        "vitq (GPTQ-rounded weights)": get_recipe("vitq", 4, 4, num_candidates=32, width=8, steps=2, rounds=1,
                                                  gelu_bases=4, gelu_ranges=4, gelu_width=8).replace(
            rounding=RoundingConfig()),
    }


CASES = [(r, "vit") for r in _configs()] + [("liu2021 mixed precision", "swin"), ("tsptq full", "swin"),
                                            ("vitq (GPTQ-rounded weights)", "swin")]


@pytest.mark.parametrize("recipe,family", CASES, ids=[f"{r}-{f}" for r, f in CASES])
def test_round_trip_gives_identical_logits(recipe, family, tmp_path):
    make, name, args = ((tiny_vit, "vit_tiny_patch16_224", VIT_ARGS) if family == "vit"
                        else (tiny_swin, "swin_tiny_patch4_window7_224", SWIN_ARGS))
    cfg = _configs()[recipe]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model, _ = quantize(make(), x, cfg, progress=False)
    with torch.no_grad():
        expect = model(x)
    manifest = vitquant.save(model, tmp_path / "q", model_name=name, model_args=args)
    loaded = vitquant.load(tmp_path / "q")
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, expect)
    assert loaded.vitquant_config == cfg
    # integer codes on disk: 8-bit weights as int8 / uint8, narrower ones packed at their bit-width
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    codes = {k[:-len(".weight_codes")]: v for k, v in sd.items() if k.endswith(".weight_codes")}
    packed = {k[:-len(".weight_packed")]: v for k, v in sd.items() if k.endswith(".weight_packed")}
    assert set(codes) | set(packed) == set(manifest["quantized_weights"])
    assert all(v.dtype in (torch.int8, torch.uint8) for v in codes.values())
    ops = dict(vitquant.quant_ops(model))
    for n, v in packed.items():
        bits = manifest["quantized_weights"][n]
        assert bits < 8 and manifest["packed_weights"][n]["bits"] == bits
        assert v.dtype == torch.uint8 and v.numel() == (ops[n].weight.numel() * bits + 7) // 8
    assert all(manifest["quantized_weights"][n] == 8 for n in codes)
    assert set(manifest["quantized_weights"].values()) <= {4, 6, 8}
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["model"] == name


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_load_rejects_corrupt_or_foreign_directories(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model, _ = quantize(tiny_vit(), x, get_recipe("minmax"), progress=False)
    vitquant.save(model, tmp_path / "q", model_name="vit_tiny_patch16_224", model_args=VIT_ARGS)
    with pytest.raises(VitquantError, match="exists and is not empty"):
        vitquant.save(model, tmp_path / "q", model_name="vit_tiny_patch16_224", model_args=VIT_ARGS)
    with pytest.raises(VitquantError, match="not a vitquant checkpoint"):
        vitquant.load(tmp_path)
    _flip_last_byte(tmp_path / "q" / "model.safetensors")
    with pytest.raises(VitquantError, match="sha256 differs"):
        vitquant.load(tmp_path / "q")
    assert not list(tmp_path.glob(".q.*"))  # no temporary directory left behind


def test_calibration_sample_travels_with_the_checkpoint(tmp_path):
    """quantize --save stores the first calibration images (uint8 + normalisation) for the export
    check; load returns them normalised, and refuses a tampered sample file."""
    from vitquant.data import ImageSet
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    calib = ImageSet(images, None, ["a", "b", "c"], torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1),
                     torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))
    model, _ = quantize(tiny_vit(), calib.tensors(), get_recipe("minmax"), progress=False)
    manifest = vitquant.save(model, tmp_path / "q", model_name="vit_tiny_patch16_224", model_args=VIT_ARGS,
                             calibration_sample=calib)
    assert manifest["calibration_sample"]["num_images"] == 3
    loaded = vitquant.load(tmp_path / "q")
    assert torch.equal(loaded.vitquant_calibration_sample, calib.tensors())
    vitquant.save(model, tmp_path / "none", model_name="vit_tiny_patch16_224", model_args=VIT_ARGS)
    assert vitquant.load(tmp_path / "none").vitquant_calibration_sample is None
    _flip_last_byte(tmp_path / "q" / "calibration_sample.safetensors")
    with pytest.raises(VitquantError, match="calibration_sample.safetensors is missing or does not match"):
        vitquant.load(tmp_path / "q")


@pytest.mark.parametrize("bits,qmin", [(2, 0), (3, -4), (4, -8), (4, 0), (5, 0), (6, -32), (7, 0), (12, -2048)])
def test_packed_codes_round_trip_exactly(bits, qmin):
    from vitquant.export.packing import pack_codes, unpack_codes
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(qmin, qmin + 2 ** bits, (37, 11), generator=g)
    codes[0, 0], codes[-1, -1] = qmin, qmin + 2 ** bits - 1  # both ends of the range
    packed = pack_codes(codes, bits, qmin)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, qmin, codes.shape), codes)
    with pytest.raises(ValueError, match="outside"):
        pack_codes(codes + 2 ** bits, bits, qmin)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(packed[:-1], bits, qmin, codes.shape)


def test_asymmetric_weight_zero_points_are_stored_as_integers(tmp_path):
    from safetensors.torch import load_file
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model, _ = quantize(tiny_vit(), x, get_recipe("repq", 4, 4), progress=False)
    vitquant.save(model, tmp_path / "q", model_name="vit_tiny_patch16_224", model_args=VIT_ARGS)
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    zs = {k: v for k, v in sd.items() if k.endswith("weight_quantizer.zero_point")}
    assert zs and not any(k.endswith("weight_quantizer.lower") for k in sd)
    assert all(not v.is_floating_point() for v in zs.values())
    loaded = vitquant.load(tmp_path / "q")
    for (n, a), (_, b) in zip(vitquant.quant_ops(model), vitquant.quant_ops(loaded)):
        if a.quantizers().get("weight") is not None:
            assert torch.equal(a.weight_quantizer.zero_points(), b.weight_quantizer.zero_points()), n
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_format_1_checkpoints_still_load(tmp_path):
    """Format 1 (before packing and integer zero points) stored int8 codes and float minima."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model, _ = quantize(tiny_vit(), x, get_recipe("minmax"), progress=False)
    vitquant.save(model, tmp_path / "q", model_name="vit_tiny_patch16_224", model_args=VIT_ARGS)
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert m["format"] == "vitquant-checkpoint/2" and not m["packed_weights"]  # 8-bit: int8 codes, as format 1
    m["format"] = "vitquant-checkpoint/1"
    del m["packed_weights"]
    (tmp_path / "q" / "manifest.json").write_text(json.dumps(m))
    with torch.no_grad():
        assert torch.equal(vitquant.load(tmp_path / "q")(x), model(x))
