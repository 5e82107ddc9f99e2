"""Block reconstruction (calibration.reconstruction): AdaRound weights, LSQ steps, QDrop, resumable."""
import contextlib
import json

import pytest
import torch

from conftest import save_load_export, tiny_swin, tiny_vit
import vitquant
from vitquant import get_recipe, quantize
from vitquant.calibration.reconstruction import AdaRoundWeight, LearnedStep, ReconstructionConfig
from vitquant.nn import quantization_disabled
from vitquant.nn.modules import _WeightOp
from vitquant.quantizers import UniformQuantizer

X = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
RC = ReconstructionConfig(iters=60, batch_size=8, lr_round=1e-2)


def _block_errors(model, x):
    """Relative squared error of every block's output (quantized model vs FP), measured with hooks."""
    outs = {}

    def grab(tag):
        def fn(name):
            def hook(mod, args, out):
                outs[(tag, name)] = out.detach()
            return hook
        return fn
    for tag, ctx in (("fp", quantization_disabled(model)), ("q", contextlib.nullcontext())):
        handles = [b.register_forward_hook(grab(tag)(n)) for n, b in model.named_modules() if type(b).__name__ == "Block"]
        with ctx, torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
    names = sorted({n for _, n in outs})
    return {n: float(((outs[("q", n)] - outs[("fp", n)]) ** 2).sum() / (outs[("fp", n)] ** 2).sum()) for n in names}


@pytest.mark.parametrize("method", ["repq", "ptq4vit"])
def test_reconstruction_lowers_the_block_output_error_of_calibration_alone(method):
    kw = dict(num_candidates=8, rounds=1) if method == "ptq4vit" else {}
    cfg = get_recipe(method, 4, 4, **kw)
    calibrated, _ = quantize(tiny_vit(), X, cfg, progress=False)
    rebuilt, report = quantize(tiny_vit(), X, cfg.replace(reconstruction=RC), progress=False)
    before, after = _block_errors(calibrated, X), _block_errors(rebuilt, X)
    assert set(before) == {"blocks.0", "blocks.1"}
    assert after["blocks.1"] < 0.9 * before["blocks.1"], (before, after)
    assert sum(after.values()) < sum(before.values())
    with torch.no_grad():
        fp = tiny_vit()(X)
        assert ((rebuilt(X) - fp) ** 2).mean() < ((calibrated(X) - fp) ** 2).mean()
    assert report.pipeline[-1] == "reconstruct"
    info = report.pass_info["reconstruct"]
    assert info["iters"] == 60 and info["images"] == 16 and info["mean_error_after"] < info["mean_error_before"]
    unit = report.ops["blocks.0"]["reconstruction"]
    assert unit["adaround_ops"] == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert unit["codes_changed"] > 0 and unit["learned_steps"] > 0
    # the frozen (non-uniform) quantizers are named: post-softmax (log-sqrt2 / twin), post-GELU twin
    assert "blocks.0.attn.matmul_av.a" in unit["frozen"]


def test_learned_codes_lie_on_the_grid_and_zero_points_stay():
    cfg = get_recipe("repq", 4, 4)
    calibrated, _ = quantize(tiny_vit(), X, cfg, progress=False)
    rebuilt, _ = quantize(tiny_vit(), X, cfg.replace(reconstruction=RC), progress=False)
    for (name, a), (_, b) in zip(vitquant.quant_ops(calibrated), vitquant.quant_ops(rebuilt)):
        if isinstance(b, _WeightOp) and b.rounded_weight is not None:
            wq = b.weight_quantizer
            codes = wq.quantize(b.rounded_weight)
            assert torch.equal(wq.dequantize(codes), b.rounded_weight), name  # on the grid, exactly
            assert torch.equal(wq.scale, a.weight_quantizer.scale)  # AdaRound keeps the weight steps
            # each code is the floor or the ceiling of W / s: at most one step from nearest
            near = wq.quantize(a.weight_to_quantize())
            assert int((codes - near).abs().max()) <= 1
        q_in = b.quantizers().get("input")
        if isinstance(q_in, UniformQuantizer) and not q_in.symmetric:
            assert torch.equal(q_in.zero_points(), a.quantizers()["input"].zero_points()), name


def test_adaround_starts_at_the_weight_and_hardens_to_floor_or_ceiling():
    cfg = get_recipe("repq", 4, 4)
    model, _ = quantize(tiny_vit(), X, cfg, progress=False)
    op = dict(vitquant.quant_ops(model))["blocks.0.mlp.fc1"]
    r = AdaRoundWeight(op, op.weight_quantizer)
    wq = op.weight_quantizer
    lo = wq.dequantize(torch.full_like(op.weight, wq.qmin, dtype=torch.int64))
    hi = wq.dequantize(torch.full_like(op.weight, wq.qmax, dtype=torch.int64))
    inside = (op.weight > lo) & (op.weight < hi)
    soft = r(op.weight)
    assert torch.allclose(soft[inside], op.weight[inside], atol=1e-5)  # h(V) = frac(W / s) at the start
    r.hard = True
    assert torch.equal(r(op.weight), wq(op.weight))  # [V >= 0] at the start is nearest rounding
    assert 0 < float(r.regulariser(20.0).detach()) <= op.weight.numel()


def test_lsq_step_gets_a_gradient_and_commit_keeps_the_zero_point():
    q = UniformQuantizer(4, symmetric=False)
    x = torch.randn(64, 8) * 2 + 1
    q.set_scale(q.initial_scale(x))
    z = q.zero_points().clone()
    ls = LearnedStep(q)
    xr = x.clone().requires_grad_(True)
    out = ls(xr)
    assert torch.allclose(out, q.fake_quant(x), atol=1e-6)
    ((out - x) ** 2).sum().backward()
    assert ls.log_ratio.grad is not None and float(ls.log_ratio.grad.abs().sum()) > 0
    assert xr.grad is not None and float(xr.grad.abs().sum()) > 0  # straight-through to the input
    with torch.no_grad():
        ls.log_ratio.add_(0.1)
    ls.commit()
    assert torch.equal(q.zero_points(), z) and torch.allclose(q.scale, ls.step.detach())


def test_reconstruction_is_deterministic_and_a_killed_run_resumes_bit_identical(tmp_path):
    cfg = get_recipe("repq", 4, 4).replace(reconstruction=ReconstructionConfig(iters=20, batch_size=8))
    full, _ = quantize(tiny_vit(), X, cfg, progress=False, work_dir=tmp_path / "w")
    again, _ = quantize(tiny_vit(), X, cfg, progress=False)
    units = sorted((tmp_path / "w" / "reconstruction").glob("unit*.pt"))
    assert len(units) == 4  # patch embedding, two blocks, head
    for f in units[2:]:  # as if killed after the first block
        f.unlink()
    resumed, report = quantize(tiny_vit(), X, cfg, progress=False, work_dir=tmp_path / "w")
    assert report.ops["blocks.0"]["reconstruction"].get("resumed")
    assert not report.ops["blocks.1"]["reconstruction"].get("resumed")
    with torch.no_grad():
        assert torch.equal(full(X), again(X))
        assert torch.equal(full(X), resumed(X))
    other, _ = quantize(tiny_vit(), X, cfg.replace(reconstruction=ReconstructionConfig(iters=20, batch_size=8, seed=1)),
                        progress=False)
    with torch.no_grad():
        assert not torch.equal(full(X), other(X))  # the seed draws the batches and the QDrop masks


def test_fisher_loss_and_no_qdrop_run_and_differ_from_the_default():
    cfg = get_recipe("repq", 4, 4)
    runs = {}
    for tag, rc in (("mse", ReconstructionConfig(iters=20, batch_size=8)),
                    ("fisher", ReconstructionConfig(iters=20, batch_size=8, loss="fisher")),
                    ("no_qdrop", ReconstructionConfig(iters=20, batch_size=8, drop_prob=0.0))):
        m, r = quantize(tiny_vit(), X, cfg.replace(reconstruction=rc), progress=False)
        assert r.pass_info["reconstruct"]["loss"] == rc.loss
        with torch.no_grad():
            runs[tag] = m(X)
    assert not torch.equal(runs["mse"], runs["fisher"]) and not torch.equal(runs["mse"], runs["no_qdrop"])


def test_the_pass_equals_reconstruct_on_a_copy_of_the_calibrated_model():
    """benchmarks/recon_ablation.py calibrates once and reconstructs copies: that must be the pipeline's result."""
    import copy
    from vitquant.calibration.reconstruction import reconstruct
    cfg = get_recipe("vitq", 4, 4)
    rc = ReconstructionConfig(iters=8, batch_size=4)
    torch.manual_seed(0)
    piped, _ = quantize(tiny_vit(), X, cfg.replace(reconstruction=rc), progress=False)
    torch.manual_seed(0)
    calibrated, _ = quantize(tiny_vit(), X, cfg, progress=False)
    copied = copy.deepcopy(calibrated)
    reconstruct(copied, X, rc, batch_size=cfg.batch_size, progress=False)
    with torch.no_grad():
        assert torch.equal(piped(X), copied(X))
        assert not torch.equal(copied(X), calibrated(X))


def test_reconstruction_images_can_outnumber_calibration_images():
    cfg = get_recipe("repq", 4, 4).replace(reconstruction=ReconstructionConfig(iters=5, batch_size=8))
    more = torch.cat([X, X.flip(-1)])
    _, r = quantize(tiny_vit(), X, cfg, progress=False, recon_data=more)
    assert r.pass_info["reconstruct"]["images"] == 32
    with pytest.raises(ValueError, match="no reconstruction pass"):
        quantize(tiny_vit(), X, get_recipe("repq", 4, 4), progress=False, recon_data=more)


def test_bad_reconstruction_settings_are_refused():
    for kw, says in ((dict(iters=0), "iterations"), (dict(drop_prob=1.0), "QDrop"), (dict(loss="l1"), "loss"),
                     (dict(beta=(2, 20)), "beta"), (dict(lr_round=0), "learning rates")):
        with pytest.raises(ValueError, match=says):
            ReconstructionConfig(**kw)


def test_reconstructed_swin_saves_and_loads_bit_identical(tmp_path):
    """(The ONNX export of reconstructed codes is the export of any rounded weight: ViT below; Swin's
    rounded-weight export is covered in test_weight_rounding.)"""
    cfg = get_recipe("repq", 4, 4).replace(reconstruction=ReconstructionConfig(iters=10, batch_size=8))
    model, _ = quantize(tiny_swin(), X, cfg, progress=False)
    vitquant.save(model, tmp_path / "q", model_name="swin_tiny_patch4_window7_224",
                  model_args=dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2),
                                  num_heads=(2, 4), num_classes=10))
    loaded = vitquant.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert loaded.vitquant_config.reconstruction == cfg.reconstruction


def test_reconstructed_vit_roundtrips_and_exports(tmp_path):
    cfg = get_recipe("repq", 4, 4).replace(reconstruction=ReconstructionConfig(iters=10, batch_size=8))
    model, _ = quantize(tiny_vit(), X, cfg, progress=False)
    with torch.no_grad():
        ref = model(X)
    loaded, out, ort, _ = save_load_export(model, tmp_path, X)
    assert torch.equal(out, ref)
    assert loaded.vitquant_config.reconstruction == cfg.reconstruction
    assert torch.allclose(ort, ref, atol=1e-3)


def test_cli_reconstruct_switches_reach_the_config_and_bad_combinations_fail(sample_dir, tmp_path, capsys):
    from vitquant.cli import main
    img = str(sample_dir / "images")
    common = ["quantize", "deit_tiny_patch16_224", "--random-init", "--img-size", "32", "--quiet", "--num-calib", "4",
              "--calib-data", img, "--calib-list", str(sample_dir / "splits" / "calib.txt"), "--no-eval",
              "--w-bits", "4", "--a-bits", "4", "--method", "minmax"]
    out_json = tmp_path / "r.json"
    assert main([*common, "--reconstruct", "--recon-iters", "3", "--recon-batch-size", "2", "--qdrop", "0.25",
                 "--recon-loss", "fisher", "--seed", "5", "--json", str(out_json)]) == 0
    r = json.loads(out_json.read_text())
    assert r["pipeline"][-1] == "reconstruct"
    rc = r["config"]["reconstruction"]
    assert (rc["iters"], rc["batch_size"], rc["drop_prob"], rc["loss"], rc["seed"]) == (3, 2, 0.25, "fisher", 5)
    assert r["pass_info"]["reconstruct"]["iters"] == 3
    capsys.readouterr()
    for bad, says in ((["--recon-iters", "5"], "need --reconstruct"),
                      (["--reconstruct", "--qdrop", "1.5"], "QDrop probability"),
                      (["--reconstruct", "--recon-images", "99"], "--recon-images 99")):
        out = tmp_path / "bad.json"
        assert main([*common, *bad, "--json", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and not out.exists(), err



def test_a_unit_made_worse_keeps_its_calibration():
    """keep_better (default): a unit whose hard-rounded output error rises during learning (here: a
    learning rate far too large) keeps its calibrated rounding and steps, bit for bit; with it off
    the worse result is committed."""
    cfg = get_recipe("repq", 4, 4)
    calibrated, _ = quantize(tiny_vit(), X, cfg, progress=False)
    wild = ReconstructionConfig(iters=20, batch_size=8, lr_round=50.0, lr_step=5.0, drop_prob=0.0)
    kept, rk = quantize(tiny_vit(), X, cfg.replace(reconstruction=wild), progress=False)
    import dataclasses
    raw, rr = quantize(tiny_vit(), X, cfg.replace(reconstruction=dataclasses.replace(wild, keep_better=False)),
                       progress=False)
    units = {n: u["reconstruction"] for n, u in rk.ops.items() if "reconstruction" in u}
    worse = [n for n, u in units.items() if u["error_learned"] > u["error_before"]]
    assert worse, units  # the wild learning rates did make some unit worse
    for n in worse:
        assert units[n]["kept_calibration"] and units[n]["error_after"] == units[n]["error_before"]
        assert rr.ops[n]["reconstruction"]["kept_calibration"] is False
    for n, u in units.items():
        assert u["kept_calibration"] == (u["error_learned"] > u["error_before"])
    for (name, a), (_, b) in zip(vitquant.quant_ops(calibrated), vitquant.quant_ops(kept)):
        unit = name if name in units else next((u for u in units if name.startswith(u + ".")), None)
        if unit in worse:
            for (k, qa), (_, qb) in zip(a.quantizers().items(), b.quantizers().items()):
                assert torch.equal(qa.scale, qb.scale), f"{name}.{k}"
            if isinstance(b, _WeightOp):
                assert b.rounded_weight is None or torch.equal(b.rounded_weight, a.rounded_weight), name
    with torch.no_grad():
        fp = tiny_vit()(X)
        assert ((kept(X) - fp) ** 2).mean() < ((raw(X) - fp) ** 2).mean()


def test_with_the_fisher_loss_the_guard_judges_the_weighted_error():
    """The unit error the keep-better guard compares is weighted as the loss is: with a Fisher weight
    that is zero on half the channels, those channels do not count."""
    import copy
    from vitquant.calibration.reconstruction import reconstruct_unit, unit_io
    from vitquant.nn.wrap import calibration_units
    calibrated, _ = quantize(tiny_vit(), X, get_recipe("repq", 4, 4), progress=False)
    seen, expected = {}, {}
    for loss in ("mse", "fisher"):
        model = copy.deepcopy(calibrated)  # each call commits what it learned
        index, (unit, ops) = next((i, u) for i, u in enumerate(calibration_units(model)) if u[0] == "blocks.1")
        block = model.get_submodule(unit)
        _, target, _ = unit_io(model, block, X, 16, fp=True, inputs=False, output=True)
        inputs, _, kw = unit_io(model, block, X, 16, fp=False, inputs=True, output=False)
        weight = torch.zeros_like(target)
        weight[..., ::2] = 2.0
        g = weight if loss == "fisher" else torch.ones_like(target)
        with torch.no_grad():
            out = block(*inputs, **kw)
        expected[loss] = float((g * (out - target) ** 2).sum() / (g * target ** 2).sum())
        rc = ReconstructionConfig(iters=1, batch_size=16, loss=loss)
        seen[loss] = reconstruct_unit(index, unit, block, ops, inputs, kw, target,
                                      weight if loss == "fisher" else None, rc, 1, 16)["error_before"]
    assert abs(expected["mse"] - expected["fisher"]) > 1e-3 * expected["mse"]
    for loss in seen:
        assert seen[loss] == pytest.approx(expected[loss], rel=1e-5), (seen, expected)
