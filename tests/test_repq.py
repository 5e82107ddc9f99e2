"""The RepQ-ViT recipe and its pieces: MSE-chosen percentile ranges, zero points outside the codes,
per-op sequential calibration, and the reparameterisation of calibrated per-channel quantizers."""
import contextlib

import pytest
import torch

from conftest import tiny_swin, tiny_vit
import vitquant
from vitquant import get_recipe, quantize
from vitquant.nn.wrap import quant_ops
from vitquant.passes import post_layernorm_pairs, reparameterize_calibrated
from vitquant.passes.pipeline import AttachQuantizers, Calibrate, Context, pipeline_for, run_pipeline
from vitquant.quantizers import LogQuantizer, UniformQuantizer
from vitquant.quantizers.base import row_quantiles

PCTS = (99.9, 99.99, 99.999)


def _heavy_tailed(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, n, generator=g)
    x[:, :5] *= 40  # a few outliers per row: clipping them can pay off
    return x


def test_row_quantiles_match_numpy_linear_interpolation():
    import numpy as np
    x = torch.randn(3, 12345, generator=torch.Generator().manual_seed(0))
    got = row_quantiles(x, [0.001, 0.5, 0.9999])
    want = np.percentile(x.double().numpy(), [0.1, 50, 99.99], axis=1)
    assert np.allclose(got.numpy(), want, atol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_percentile_range_is_the_candidate_of_least_error(symmetric):
    x = _heavy_tailed()
    q = UniformQuantizer(4, symmetric=symmetric, groups=4, group_dim=0, mse_percentiles=PCTS)
    q.set_scale(q.initial_scale(x))
    chosen = ((q.fake_quant(x) - x) ** 2).mean(1)
    for p in PCTS:  # every single candidate is at least as bad, per row
        other = UniformQuantizer(4, symmetric=symmetric, groups=4, group_dim=0, mse_percentiles=(p,))
        other.set_scale(other.initial_scale(x))
        assert bool((chosen <= ((other.fake_quant(x) - x) ** 2).mean(1) + 1e-12).all())
    # and not all rows took the widest range: the outliers were clipped somewhere
    widest = UniformQuantizer(4, symmetric=symmetric, groups=4, group_dim=0, mse_percentiles=(100.0,))
    widest.set_scale(widest.initial_scale(x))
    assert bool((q.scale < widest.scale).any())


def test_log_quantizer_mse_percentile_scale_is_the_candidate_of_least_error():
    attn = torch.softmax(torch.randn(2, 3, 50, 50, generator=torch.Generator().manual_seed(0)) * 3, -1)
    q = LogQuantizer(4, per_octave=2, zero="extra", mse_percentiles=PCTS)
    q.set_scale(q.initial_scale(attn))
    err = float(((q.fake_quant(attn) - attn) ** 2).mean())
    for p in PCTS:
        o = LogQuantizer(4, per_octave=2, zero="extra", mse_percentiles=(p,))
        o.set_scale(o.initial_scale(attn))
        assert err <= float(((o.fake_quant(attn) - attn) ** 2).mean()) + 1e-15
    assert float(q.scale) <= float(attn.max())


def test_asymmetric_range_without_zero_quantizes_within_half_a_step():
    x = 2 + 3 * torch.rand(1000, generator=torch.Generator().manual_seed(0))  # all in [2, 5]
    q = UniformQuantizer(4, symmetric=False, mse_percentiles=(100.0,))
    q.set_scale(q.initial_scale(x))
    assert float(q.lower) >= 2.0  # the range does not contain 0: the zero point lies below the codes
    assert float((q.fake_quant(x) - x).abs().max()) <= float(q.scale) / 2 + 1e-6
    codes = q.quantize(x)
    assert int(codes.min()) == 0 and int(codes.max()) == 15


def _no_reparam(bits=4):
    return get_recipe("repq", bits, bits).replace(reparameterize=False)


def test_sequential_per_op_calibration_sees_the_quantized_model():
    """Each op's range comes from its input in the model with every earlier op quantized."""
    model, _ = quantize(tiny_vit(), torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                        _no_reparam(), progress=False)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def input_of(op, quantized):
        seen = []
        h = op.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
        with torch.no_grad(), (contextlib.nullcontext() if quantized else vitquant.quantization_disabled(model)):
            model(images)
        h.remove()
        return seen[0]

    for name in ("blocks.1.mlp.fc2", "blocks.1.attn.qkv", "head"):
        op = model.get_submodule(name)
        fresh = UniformQuantizer(4, symmetric=False, mse_percentiles=PCTS)
        assert torch.allclose(fresh.initial_scale(input_of(op, True)), op.input_quantizer.scale), name
        # not the FP model's input
        assert not torch.allclose(fresh.initial_scale(input_of(op, False)), op.input_quantizer.scale), name


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_reparameterisation_keeps_the_per_channel_quantized_model(make):
    model = make()
    with torch.no_grad():  # channels of very different ranges and one constant channel (weight 0)
        for _, norm, _ in post_layernorm_pairs(model):
            c = norm.weight.numel()
            norm.weight.mul_(torch.logspace(-1, 1, c)[torch.randperm(c, generator=torch.Generator().manual_seed(c))])
            norm.weight[2] = 0.0
            norm.bias[2] = 0.7
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = get_recipe("repq", 4, 4)
    vitquant.nn.wrap_model(model)
    ctx = Context(model, images, cfg, progress=False)
    run_pipeline([AttachQuantizers(), Calibrate()], ctx)
    folded = [lin for _, _, lins in post_layernorm_pairs(model) for _, lin in lins]
    assert all(lin.input_quantizer.groups == lin.in_features for lin in folded)
    for lin in folded:  # compare activations only: the pass re-initialises the folded weights' quantizers
        lin.weight_quantizer.enabled = False
        lin.refresh()
    with torch.no_grad():
        before = model(images)
    info = reparameterize_calibrated(model)
    assert len(info) == len(folded) and all(i["constant_channels"] == 1 for i in info.values())
    assert all(lin.input_quantizer.groups == 1 for lin in folded)  # deployed per tensor
    with torch.no_grad():
        after = model(images)
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-4)
    for lin in folded:
        lin.weight_quantizer.enabled = True
        lin.refresh()
    assert torch.isfinite(model(images)).all()


def test_repq_recipe_pipeline_and_quantizers():
    cfg = get_recipe("repq", 4, 4)
    assert [p.name for p in pipeline_for(cfg)] == ["attach_quantizers", "calibrate", "reparameterize"]
    model, report = quantize(tiny_vit(), torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                             cfg, progress=False)
    assert report.pipeline == ["attach_quantizers", "calibrate", "reparameterize"]
    assert set(report.pass_info["reparameterize"]) == {"blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                                      "blocks.1.norm2"}
    pe = model.patch_embed.proj
    assert pe.input_quantizer.bits == 8 and pe.weight_quantizer.bits == 4 and pe.weight_quantizer.groups == 48
    attn = model.blocks[0].attn
    assert isinstance(attn.matmul_av.a_quantizer, LogQuantizer) and attn.matmul_av.a_quantizer.levels == 16
    assert attn.qkv.weight_quantizer.groups == attn.qkv.out_features  # per output channel, qkv too
    assert model.head.weight_quantizer.bits == 4 and model.head.input_quantizer.bits == 4
    ups = [q for _, op in quant_ops(model) for q in op.quantizers().values() if isinstance(q, UniformQuantizer)]
    assert ups and all(not q.symmetric for q in ups)


def test_repq_round_trip_is_bit_identical(tmp_path):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = get_recipe("repq", 4, 4)
    model, _ = quantize(tiny_vit(), x, cfg, progress=False)
    with torch.no_grad():
        expect = model(x)
    vitquant.save(model, tmp_path / "q", model_name="vit_tiny_patch16_224",
                  model_args=dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10))
    loaded = vitquant.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(x), expect)
    assert loaded.vitquant_config == cfg


@pytest.mark.parametrize("bits", [8, 4])
def test_repq_model_exports_with_integer_kernels(tmp_path, bits):
    """Asymmetric per-tensor activations (uint8 zero points) and per-channel asymmetric weights run
    as integer kernels in ONNX Runtime and compute the simulated model (the export check)."""
    from conftest import save_load_export
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model, _ = quantize(tiny_vit(), x, get_recipe("repq", bits, bits), progress=False)
    with torch.no_grad():
        expect = model(x)
    _, out, ort_out, ops = save_load_export(model, tmp_path, x)
    assert torch.equal(out, expect)
    torch.testing.assert_close(ort_out, expect, rtol=1e-3, atol=1e-3)
    assert ops["blocks.0.attn.qkv"] == "integer" and ops["blocks.0.mlp.fc2"] == "integer"
    assert ops["blocks.0.attn.matmul_qk"] == "integer" and ops["blocks.0.attn.matmul_av"] == "float"  # log-sqrt2
