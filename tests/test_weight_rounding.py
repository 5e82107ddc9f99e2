"""Weight rounding better than nearest: GPTQ, ERQ's ridge step, bias refit (calibration.weight_rounding)."""
import json

import pytest
import torch
from torch import nn

from conftest import save_load_export, tiny_vit
import vitquant
from vitquant import get_recipe, quantize
from vitquant.calibration.search import OpData
from vitquant.calibration.weight_rounding import RoundingConfig, _rows, gptq, round_weight
from vitquant.nn.modules import QuantConv2d, QuantLinear
from vitquant.quantizers import UniformQuantizer


def _correlated_inputs(n=512, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix + 0.3


def _linear_op(d=24, out=16, bits=3, seed=0):
    torch.manual_seed(seed)
    op = QuantLinear(nn.Linear(d, out))
    wq = UniformQuantizer(bits, symmetric=False, groups=out, group_dim=0)
    wq.set_scale(wq.initial_scale(op.weight.detach()))
    op.set_quantizer("weight", wq)
    return op


def _weighted_error(w, q, h):
    d = (w.double() - q.double())
    return float(torch.einsum("oi,ij,oj->", d, h, d))


def test_gptq_lowers_the_hessian_weighted_error_and_stays_on_the_grid():
    op = _linear_op()
    x = _correlated_inputs().double()
    h = x.T @ x
    w = op.weight.detach()
    wq = op.weight_quantizer
    nearest = wq.fake_quant(w)

    def fq(cols):
        return wq.fake_quant(cols.float())

    for act_order in (True, False):
        q = gptq(w, h, fq, damp=0.01, act_order=act_order, block_size=5)
        assert torch.equal(wq.fake_quant(q.float()), q.float())  # every weight is a grid value
        assert _weighted_error(w, q, h) < 0.8 * _weighted_error(w, nearest, h)


def test_round_weight_refits_the_least_squares_bias_and_lowers_the_output_error():
    op = _linear_op()
    iq = UniformQuantizer(3, symmetric=False)
    x = _correlated_inputs().reshape(16, 32, 24)
    iq.set_scale(iq.initial_scale(x))
    op.set_quantizer("input", iq)
    with torch.no_grad():
        y = nn.functional.linear(x, op.weight, op.bias)  # the FP output (FP input)
    for cfg in (RoundingConfig(method="nearest"), RoundingConfig(), RoundingConfig(ridge=0.05)):
        op.set_rounded_weight(None)
        op.bias_correction = None
        info = round_weight(op, OpData((x,), y), cfg)
        assert info["error_after"] < info["error_nearest"]
        with torch.no_grad():
            r = (y - op(x)).double().reshape(-1, y.shape[-1])
        # least-squares bias: the residual has zero mean per output channel
        assert r.mean(0).abs().max() < 1e-4 * r.abs().mean()
        q = op.quantized_weight()
        assert torch.equal(op.weight_quantizer.fake_quant(q), q)
    # the ridge step absorbs the input's quantization error: better than GPTQ on the FP weight alone
    errors = {}
    for cfg in (RoundingConfig(), RoundingConfig(ridge=0.05)):
        op.set_rounded_weight(None)
        errors[cfg.ridge] = round_weight(op, OpData((x,), y), cfg)["error_after"]
    assert errors[0.05] < errors[None]


def test_conv_rows_reproduce_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    op = QuantConv2d(conv)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = conv(x)
        xr, yr = _rows(op, x, y)
        assert torch.allclose(xr @ conv.weight.reshape(8, -1).T + conv.bias, yr, atol=1e-5)


def test_constant_input_channel_and_too_few_rows():
    op = _linear_op(d=8, out=4)
    x = _correlated_inputs(n=256, d=8).reshape(8, 32, 8)
    x[..., 3] = 0.7  # no variance: carried by the bias
    with torch.no_grad():
        y = nn.functional.linear(x, op.weight, op.bias)
    info = round_weight(op, OpData((x,), y), RoundingConfig())
    assert torch.isfinite(op.quantized_weight()).all() and info["error_after"] <= info["error_nearest"]
    op.set_rounded_weight(None)
    op.bias_correction = None
    info = round_weight(op, OpData((x[:1, :4],), y[:1, :4]), RoundingConfig(min_rows_per_input=1.0))
    assert "skipped" in info and op.rounded_weight is None and op.bias_correction is None


def test_a_weight_quantizer_that_is_not_elementwise_is_refused():
    op = _linear_op(d=8, out=4)
    wq = UniformQuantizer(3, groups=2, group_dim=1)  # groups along the input columns
    wq.set_scale(torch.tensor([0.1, 0.2]))
    op.set_quantizer("weight", wq)
    x = torch.randn(4, 64, 8)
    with torch.no_grad():
        y = nn.functional.linear(x, op.weight, op.bias)
    with pytest.raises(ValueError, match="output channels"):
        round_weight(op, OpData((x,), y), RoundingConfig())


def test_rounding_config_checks():
    with pytest.raises(ValueError, match="unknown weight rounding"):
        RoundingConfig(method="adaround")
    with pytest.raises(ValueError, match="ridge"):
        RoundingConfig(ridge=0)
    with pytest.raises(ValueError, match="roles"):
        RoundingConfig(roles=("mlp",))
    with pytest.raises(ValueError, match="no weight-rounding pass"):
        get_recipe("repq", 4, 4).replace(damp=0.1)


def test_rounding_pass_in_a_recipe_pipeline_save_load_export(tmp_path):
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fp = tiny_vit()
    with torch.no_grad():
        ref = fp(x)
    plain, _ = quantize(tiny_vit(), x, get_recipe("repq", 4, 4), progress=False)
    cfg = get_recipe("repq", 4, 4).replace(rounding=RoundingConfig(ridge=0.1))
    model, report = quantize(tiny_vit(), x, cfg, progress=False)
    assert report.pipeline[-1] == "round_weights"
    info = report.pass_info["round_weights"]
    assert info["ops"] == 9 and info["mean_error_after"] < info["mean_error_nearest"]  # 2 blocks x 4 + patch embed
    rounded = [n for n, op in vitquant.quant_ops(model) if getattr(op, "rounded_weight", None) is not None]
    assert "head" not in rounded and len(rounded) == 9
    with torch.no_grad():
        err = lambda m: float((m(x) - ref).square().mean() / ref.square().mean())  # noqa: E731
        assert err(model) < 0.8 * err(plain)
        out = model(x)
    loaded, loaded_out, ort_out, kinds = save_load_export(model, tmp_path, x)
    assert torch.equal(loaded_out, out)  # save -> load bit-identical
    assert float((ort_out - out).abs().max()) < 1e-3 * float(out.abs().max())
    assert vitquant.load(tmp_path / "q").vitquant_config.rounding == cfg.rounding


def test_a_killed_rounding_pass_resumes_bit_identical(tmp_path):
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cfg = get_recipe("repq", 4, 4).replace(rounding=RoundingConfig())
    full, _ = quantize(tiny_vit(), x, cfg, progress=False, work_dir=tmp_path / "w")
    units = sorted((tmp_path / "w" / "rounding").glob("unit*.pt"))
    assert len(units) == 9
    for f in units[4:]:  # as if killed after four rounded ops
        f.unlink()
    resumed, _ = quantize(tiny_vit(), x, cfg, progress=False, work_dir=tmp_path / "w")
    for (_, a), (_, b) in zip(vitquant.quant_ops(full), vitquant.quant_ops(resumed)):
        ra, rb = getattr(a, "rounded_weight", None), getattr(b, "rounded_weight", None)
        assert (ra is None) == (rb is None) and (ra is None or torch.equal(ra, rb))
    with torch.no_grad():
        assert torch.equal(full(x), resumed(x))


def test_cli_rounding_switches_reach_the_config_and_bad_combinations_fail(sample_dir, tmp_path, capsys):
    from vitquant.cli import main
    img = str(sample_dir / "images")
    common = ["quantize", "deit_tiny_patch16_224", "--random-init", "--img-size", "32", "--quiet", "--num-calib", "4",
              "--calib-data", img, "--calib-list", str(sample_dir / "splits" / "calib.txt"), "--no-eval",
              "--w-bits", "4", "--a-bits", "4"]
    out_json = tmp_path / "r.json"
    assert main([*common, "--method", "minmax", "--rounding", "gptq", "--ridge", "0.2", "--act-order", "off",
                 "--json", str(out_json)]) == 0
    r = json.loads(out_json.read_text())
    assert r["pipeline"][-1] == "round_weights"
    assert r["config"]["rounding"]["ridge"] == 0.2 and r["config"]["rounding"]["act_order"] is False
    assert r["config"]["rounding"]["method"] == "gptq"
    capsys.readouterr()
    for bad, says in ((["--method", "minmax", "--ridge", "0.1"], "no weight-rounding pass"),
                      (["--method", "minmax", "--rounding", "nearest", "--gptq-damp", "0.1"], "need --rounding gptq"),
                      (["--method", "minmax", "--rounding", "off", "--ridge", "0.1"], "drop --rounding off")):
        out = tmp_path / "bad.json"
        assert main([*common, *bad, "--json", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and not out.exists()


def test_vitq_on_swin_rounds_every_weight_but_the_head_and_exports(tmp_path):
    from conftest import tiny_swin
    from vitquant.export.onnx import OrtModel, export_onnx
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cfg = get_recipe("vitq", 4, 4, num_candidates=32, width=8, steps=2, rounds=1, gelu_bases=4, gelu_ranges=4,
                     gelu_width=8)
    small = dict(num_candidates=32, width=8, steps=2, rounds=1, gelu_bases=4, gelu_ranges=4, gelu_width=8)
    assert cfg.rounding is None and cfg.replace(method="adalog") == get_recipe("adalog", 4, 4, **small)  # defaults
    cfg = cfg.replace(rounding=RoundingConfig())  # the opt-in rounding pass
    model, report = quantize(tiny_swin(), x, cfg, progress=False)
    assert report.pipeline == ["attach_quantizers", "calibrate", "reparameterize", "calibrate_folded", "round_weights"]
    rounded = {n for n, op in vitquant.quant_ops(model) if getattr(op, "rounded_weight", None) is not None}
    assert any("downsample.reduction" in n for n in rounded) and "head.fc" not in rounded
    assert report.pass_info["round_weights"]["ops"] == len(rounded)
    summary = export_onnx(model, tmp_path / "m.onnx")
    assert summary["check"]["ok"]
    with torch.no_grad():
        out = model(x)
    assert float((OrtModel(tmp_path / "m.onnx")(x) - out).abs().max()) < 1e-3 * float(out.abs().max())
