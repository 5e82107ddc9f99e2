"""AdaLog's FPCS search and the ``adalog`` recipe built on it."""
import pytest
import torch
from torch import nn

from conftest import save_load_export, tiny_vit
import vitquant
from vitquant import get_recipe, quantize
from vitquant.calibration.fpcs import (AffinePairs, FPCSConfig, calibrate_linear, fpcs, percentile_grid,
                                       positive_percentiles, search_uniform, self_error, set_affine,
                                       weight_output_error)
from vitquant.calibration.search import OpData, evaluate_candidates
from vitquant.nn.modules import QuantConv2d, QuantLinear
from vitquant.quantizers import AdaLogQuantizer, UniformQuantizer
from vitquant.recipes import config_from_dict

G = torch.Generator().manual_seed(0)
SMALL = dict(num_candidates=32, width=8, steps=3, rounds=2, gelu_bases=4, gelu_ranges=4, gelu_width=8)  # fast tests


def test_fpcs_refines_beyond_its_grid():
    """A smooth error with its minimum between grid points: FPCS ends far closer to it than the
    best grid point, in every group."""
    opt = torch.tensor([0.3337, 0.71])
    grid = torch.stack([torch.linspace(0.1, 1.0, 10)[:, None].expand(-1, 2), torch.zeros(10, 2)], -1)

    def score(c, final):
        return (c[..., 0] - opt) ** 2

    best = fpcs(score, grid, torch.full((2,), 0.1), width=4, new=8, steps=4)
    grid_best = grid[score(grid, True).argmin(0), torch.arange(2), 0]
    assert bool(((best[:, 0] - opt).abs() < 1e-3).all())
    assert bool(((best[:, 0] - opt).abs() < (grid_best - opt).abs() / 10).all())
    assert bool((best[:, 1] == 0).all())  # the second coordinate is carried, not refined


def test_percentile_grid_spans_percentile_to_full_range():
    x = torch.randn(4, 1000, generator=G)
    q = UniformQuantizer(4, symmetric=False, groups=4, group_dim=0)
    cfg = FPCSConfig()
    grid, spacing = percentile_grid(x, q, cfg, zero_points=8, floor=1e-8)
    assert grid.shape == (128, 4, 2)
    lo_p, hi_p = torch.quantile(x, 0.1, dim=1), torch.quantile(x, 0.9, dim=1)
    assert torch.allclose(grid[0, :, 0], (hi_p - lo_p) / 15, atol=1e-5)
    assert torch.allclose(grid[15, :, 0], (x.amax(1) - x.amin(1)) / 15, atol=1e-5)
    assert torch.allclose(spacing, grid[1, :, 0] - grid[0, :, 0])
    assert grid[:, 0, 1].unique().tolist() == list(range(4, 12))  # 8 zero points around 2^(b-1)
    # more zero points than candidates (a conv weight above 8 bits, or a small --num-candidates):
    # one step per zero point, as many zero points as candidates, never an empty grid
    few, _ = percentile_grid(x, UniformQuantizer(10, symmetric=False, groups=4, group_dim=0),
                             FPCSConfig(num_candidates=32, width=8, gelu_width=8), zero_points=512, floor=1e-8)
    assert few.shape == (32, 4, 2) and few[:, 0, 1].unique().numel() == 32


def test_affine_pairs_quantize_as_the_uniform_quantizer_they_are_written_to():
    x = torch.randn(6, 40, generator=G) * 3
    q = UniformQuantizer(4, symmetric=False, groups=6, group_dim=0)
    pair = torch.stack([torch.rand(6, generator=G) * 0.5 + 0.1, torch.randint(0, 16, (6,), generator=G).float()], -1)
    view = AffinePairs(q)
    set_affine(q, pair)
    assert torch.equal(view.fake_quant(x, pair[None])[0], q.fake_quant(x))
    assert torch.equal(q.zero_points(), pair[:, 1])


@pytest.mark.parametrize("conv", [False, True])
def test_gram_form_weight_error_equals_the_direct_output_error(conv):
    torch.manual_seed(0)
    if conv:
        op = QuantConv2d(nn.Conv2d(3, 6, 4, stride=4))
        x = torch.randn(5, 3, 16, 16)
    else:
        op = QuantLinear(nn.Linear(12, 7), "proj")
        x = torch.randn(5, 9, 12)
    op.weight_quantizer = UniformQuantizer(4, symmetric=False, groups=op.weight.shape[0], group_dim=0)
    op.input_quantizer = UniformQuantizer(4, symmetric=False)
    op.input_quantizer.set_scale(op.input_quantizer.initial_scale(x))
    with torch.no_grad():
        y = (nn.functional.conv2d(x, op.weight, op.bias, stride=4) if conv else nn.functional.linear(x, op.weight, op.bias))
    data = OpData((x,), y)
    grid, _ = percentile_grid(op.weight, op.weight_quantizer, FPCSConfig(), 8, 1e-8)
    q = op.weight_quantizer
    view = AffinePairs(q)
    op.set_quantizer("weight", view)
    gram = weight_output_error(op, data, view, 256)(grid)
    direct = evaluate_candidates(op, data, "weight", grid, "mse", 256)
    op.set_quantizer("weight", q)
    assert torch.allclose(gram, direct, rtol=1e-4, atol=1e-6)


def test_positive_percentiles_are_nearest_rank_of_positive_values():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    assert positive_percentiles(x, [0.5, 1.0]).tolist() == [2.0, 4.0]  # ceil(4 * 0.5) - 1 = 1
    assert positive_percentiles(-x.abs(), [0.9]).tolist() == [0.0]


def test_output_rounds_lower_the_layer_error_below_the_own_error_start():
    torch.manual_seed(0)
    op = QuantLinear(nn.Linear(16, 8), "proj")
    x = torch.randn(64, 16) * torch.linspace(0.1, 3, 16)
    op.weight_quantizer = UniformQuantizer(3, symmetric=False, groups=8, group_dim=0)
    op.input_quantizer = UniformQuantizer(3, symmetric=False)
    with torch.no_grad():
        data = OpData((x,), op(x))
    cfg = FPCSConfig(screen_images=0)
    w = op.weight.detach()
    search_uniform(op, "weight", w, "weight", cfg, lambda v: self_error(v, w, 256))
    search_uniform(op, "input", x, "input", cfg, lambda v: self_error(v, x, 256))

    def err():
        with torch.no_grad():
            return float(((op(x) - data.output) ** 2).sum())
    start = err()
    info = calibrate_linear(op, data, cfg)
    assert info["rounds"] >= 1
    assert err() < start


def test_fpcs_config_checks_its_fields():
    with pytest.raises(ValueError, match="width"):
        FPCSConfig(width=0)
    with pytest.raises(ValueError, match="percentile"):
        FPCSConfig(grid_percentile=40)
    with pytest.raises(ValueError, match="not both"):
        get_recipe("adalog").replace(search=vitquant.recipes.SearchConfig())


def test_adalog_recipe_end_to_end(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    cfg = get_recipe("adalog", 4, 4, **SMALL)
    assert cfg.fpcs.rounds == 2 and cfg.fpcs.num_candidates == 32 and config_from_dict(cfg.to_dict()) == cfg
    model, report = quantize(tiny_vit(), x, cfg, progress=False)
    assert report.pipeline == ["attach_quantizers", "calibrate", "reparameterize", "calibrate_folded"]
    blk = model.blocks[0]
    gelu, soft = blk.mlp.fc2.input_quantizer, blk.attn.matmul_av.a_quantizer
    assert isinstance(gelu, AdaLogQuantizer) and gelu.shift > 0 and not gelu.fixed_range
    assert isinstance(soft, AdaLogQuantizer) and soft.fixed_range and float(soft.scale[0, 0]) == 1.0
    assert blk.attn.matmul_qk.a_quantizer.groups == 3 and not blk.attn.matmul_qk.a_quantizer.symmetric
    assert model.patch_embed.proj.input_quantizer is None
    qkv_in = blk.attn.qkv.input_quantizer
    assert qkv_in.groups == 1 and "after_fold" in report.ops["blocks.0.attn.qkv"]
    with torch.no_grad():
        ref = tiny_vit()(x)
        out = model(x)
    assert torch.isfinite(out).all() and nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0) > 0.8
    loaded, loaded_out, ort_out, kernels = save_load_export(model, tmp_path, x)
    assert torch.equal(loaded_out, out)
    # q @ k^T (asymmetric per-head q and k: zero points expanded around the codes' matmul) is integer;
    # the log-quantized operands of attn @ v and fc2 have no integer kernel
    assert {kernels[f"blocks.0.{n}"] for n in ("attn.qkv", "attn.proj", "mlp.fc1", "attn.matmul_qk")} == {"integer"}
    assert kernels["head"] == "integer"
    assert {kernels[f"blocks.0.{n}"] for n in ("attn.matmul_av", "mlp.fc2")} == {"float"}
    assert torch.allclose(torch.as_tensor(ort_out), out, atol=1e-3 * float(out.abs().max()))


def test_adalog_keeps_constant_post_layernorm_channels_exact():
    """A LayerNorm weight of exactly 0 makes its channel constant; the fold moves it to 0 exactly
    instead of clipping it to AdaLog's floored step."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    fp = tiny_vit()
    with torch.no_grad():
        fp.blocks[0].norm1.weight[5] = 0.0
        fp.blocks[0].norm1.bias[5] = 2.5
    model2, report2 = quantize(_copy(fp), x, get_recipe("adalog", 4, 4, **SMALL), progress=False)
    info = report2.pass_info["reparameterize"]["blocks.0.norm1"]
    assert info["constant_channels"] == 1
    assert abs(float(model2.blocks[0].norm1.bias[5].detach())) < 1e-6  # the constant moved to exactly 0
    with torch.no_grad():
        assert torch.isfinite(model2(x)).all()


def _copy(m):
    import copy
    return copy.deepcopy(m)


@pytest.mark.parametrize("shared_range", [False, True])
def test_adalog_candidate_table_equals_the_elementwise_kernel(shared_range):
    """The search's table lookup gives bit for bit the values of the quantizer's own kernel, flushed
    codes included."""
    from vitquant.quantizers import kernels
    from vitquant.quantizers.adalog import GELU_SHIFT
    x = nn.functional.gelu(torch.randn(50, 64, generator=G) * 3)
    q = AdaLogQuantizer(3, shift=GELU_SHIFT)
    n = 24
    rng = torch.full((n,), 2.0) if shared_range else torch.linspace(0.2, 6.0, n)
    cands = torch.stack([rng, torch.arange(10, 10 + n * 5, 5).float()], -1)[:, None]
    got = q.fake_quant(x, cands)
    want = kernels.adalog_quant(x, rng.reshape(n, 1, 1), cands[..., 1].reshape(n, 1, 1), q.shift, 37.0,
                                float(q.levels), float(q.table_den))
    assert torch.equal(got, want)
    assert bool((got == -q.shift).any())  # some values flushed to the bottom state
