"""Objectives, batched candidate evaluation, search and the calibration engine."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_swin, tiny_vit
from vitquant import quantization_disabled, quantize
from vitquant.calibration import OpData, alternating_search, collect_gradients, evaluate_candidates
from vitquant.calibration.objectives import OBJECTIVES
from vitquant.calibration.search import search_operand
from vitquant.nn import QuantLinear, QuantMatMul, quant_ops, wrap_model
from vitquant.quantizers import UniformQuantizer
from vitquant.recipes import attach_quantizers, get_recipe


def naive(name, y, t, g, group_dim, groups):
    """Reference per-candidate, per-group loop."""
    out = torch.zeros(y.shape[0], groups, dtype=torch.float64)
    for c in range(y.shape[0]):
        for k in range(groups):
            if groups == 1:
                yc, tc, gc = y[c], t, g
            else:
                yc, tc = y[c].chunk(groups, dim=group_dim)[k], t.chunk(groups, dim=group_dim)[k]
                gc = None if g is None else g.chunk(groups, dim=group_dim)[k]
            if name == "mse":
                v = ((yc - tc) ** 2).sum()
            elif name == "hessian":
                v = ((gc * (yc - tc)) ** 2).sum()
            elif name == "cosine":
                v = -F.cosine_similarity(yc, tc, dim=-1).sum()
            else:  # Pearson of each sample's whole (group) output, Eq. (12) of Liu et al. 2021
                v = -sum(torch.corrcoef(torch.stack([yc[i].flatten(), tc[i].flatten()]))[0, 1]
                         for i in range(yc.shape[0]))
            out[c, k] = v
    return out


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("group_dim,groups", [(None, 1), (1, 3), (-1, 2)])
def test_objectives_match_naive_loops(name, group_dim, groups):
    torch.manual_seed(0)
    t = torch.randn(2, 3, 5, 6)
    y = t + 0.1 * torch.randn(4, 2, 3, 5, 6)
    g = torch.rand(2, 3, 5, 6)
    got = OBJECTIVES[name](y.clone(), t, g, group_dim, groups)
    assert torch.allclose(got.double(), naive(name, y, t, g, group_dim, groups), rtol=1e-4, atol=1e-4)


def _linear_op(groups=1):
    torch.manual_seed(0)
    op = QuantLinear(torch.nn.Linear(12, 6), "qkv" if groups == 3 else "linear")
    op.weight_quantizer = UniformQuantizer(4, groups=groups, group_dim=0)
    op.input_quantizer = UniformQuantizer(4)
    x = torch.randn(5, 7, 12)
    data = OpData((x,), F.linear(x, op.weight, op.bias), torch.rand(5, 7, 6))
    for n, q in op.quantizers().items():
        q.set_scale(q.initial_scale(data.operand(op, n)))
    op.refresh()
    return op, data


@pytest.mark.parametrize("operand", ["weight", "input"])
def test_batched_candidates_equal_one_at_a_time_and_chunking_is_invisible(operand):
    op, data = _linear_op(groups=3)
    q = op.quantizer(operand)
    grid = q.candidates(data.operand(op, operand), 0.1, 1.2, 9)
    big = evaluate_candidates(op, data, operand, grid, "hessian", memory_budget_mb=64)
    tiny = evaluate_candidates(op, data, operand, grid, "hessian", memory_budget_mb=1e-4)  # 1 sample x 1 cand
    assert torch.allclose(big, tiny, rtol=1e-6)
    saved = q.scale.clone()
    for c in range(grid.shape[0]):
        q.set_scale(grid[c])
        op.refresh()
        with torch.no_grad():
            y = op(data.inputs[0])
        ref = naive("hessian", y[None], data.output, data.grad, -1 if operand == "weight" else None,
                    3 if operand == "weight" else 1)
        assert torch.allclose(big[c, :ref.shape[1]], ref[0], rtol=1e-4)
    q.set_scale(saved)


def test_two_stage_search_without_screening_is_the_exhaustive_argmin():
    op, data = _linear_op()
    grid = op.weight_quantizer.candidates(op.weight, 0.01, 1.2, 50)
    scores = evaluate_candidates(op, data, "weight", grid, "mse", 64)
    best, _ = search_operand(op, data, "weight", grid, "mse", 64, screen_images=0)
    assert torch.equal(best, grid[scores.argmin(0)[0]])
    screened, _ = search_operand(op, data, "weight", grid, "mse", 64, screen_images=2, screen_top_k=50)
    assert torch.equal(screened, best)  # top-k covering the grid re-scores everything exactly


def test_alternating_search_beats_the_max_initialisation():
    op, data = _linear_op()
    def dist():
        with torch.no_grad():
            return ((op(data.inputs[0]) - data.output) ** 2).sum().item()
    before = dist()
    r = alternating_search(op, data, "mse", 0.01, 1.2, 40, 3, 64)
    assert dist() < before and r.searches_run >= 2


def test_gradients_are_informative_not_noise():
    model = wrap_model(tiny_vit())
    attach_quantizers(model, get_recipe("ptq4vit"))
    grads = collect_gradients(model, torch.randn(6, 3, 32, 32), batch_size=4)
    names = [n for n, _ in quant_ops(model, active=True)]  # LayerNorms have no quantizer in this setting
    assert set(grads) == set(names) and not any("norm" in n for n in grads)
    g0 = grads["blocks.0.mlp.fc2"].float()
    assert g0.shape == (6, 17, 48)
    assert (g0 != 0).float().mean() > 0.9 and g0.abs().max() > 1e-4  # unlike the reference's ~1e-13 noise
    last = grads["blocks.1.mlp.fc2"].float()  # only the class token reaches the head in the last block
    assert (last[:, 0] != 0).float().mean() > 0.9 and (last[:, 1:] == 0).all()


@pytest.mark.parametrize("method", ["minmax", "percentile", "base", "ptq4vit"])
def test_every_recipe_calibrates_every_quantizer(method):
    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    cfg = get_recipe(method, 8, 8)
    if cfg.search is not None:
        cfg = cfg.replace(num_candidates=20, screen_images=4, screen_top_k=4)
    model, report = quantize(model, x[:4], cfg, progress=False)
    qs = [q for _, op in quant_ops(model) for q in op.quantizers().values()]
    assert qs and all(q.calibrated for q in qs)
    assert len(report.ops) == len(quant_ops(model, active=True))
    with torch.no_grad():
        out = model(x)
        with quantization_disabled(model):
            fp = model(x)
    assert torch.allclose(fp, ref, atol=1e-5)
    assert not torch.equal(out, fp)
    assert F.cosine_similarity(out.flatten(), fp.flatten(), dim=0) > 0.95


def test_fewer_bits_give_larger_error_and_ptq4vit_uses_twin_quantizers():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    errs = {}
    for bits in (8, 4):
        model = tiny_vit()
        cfg = get_recipe("ptq4vit", bits, bits).replace(num_candidates=20, screen_images=0)
        quantize(model, x, cfg, progress=False)
        with torch.no_grad():
            out = model(x)
            with quantization_disabled(model):
                fp = model(x)
        errs[bits] = ((out - fp) ** 2).mean().item()
    assert errs[4] > errs[8]
    kinds = {type(q).__name__ for _, op in quant_ops(model) for q in op.quantizers().values()}
    assert {"TwinSoftmaxQuantizer", "TwinGeluQuantizer", "UniformQuantizer"} <= kinds


def test_ablation_switches_change_quantizer_types():
    model = wrap_model(tiny_vit())
    attach_quantizers(model, get_recipe("ptq4vit", softmax_twin=False, gelu_twin=False))
    kinds = {type(q).__name__ for _, op in quant_ops(model) for q in op.quantizers().values()}
    assert kinds == {"UniformQuantizer"}
    assert get_recipe("ptq4vit", objective="cosine").hessian is False


def test_sequential_mode_and_swin_run_end_to_end():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    cfg = get_recipe("ptq4vit", 6, 6).replace(num_candidates=10, rounds=1, sequential=True)
    model, _ = quantize(tiny_swin(), x, cfg, progress=False)
    matmuls = [op for _, op in quant_ops(model) if isinstance(op, QuantMatMul)]
    assert matmuls and all(op.b_quantizer.calibrated for op in matmuls)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_calibration_is_deterministic():
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cfg = get_recipe("ptq4vit", 6, 6).replace(num_candidates=15)
    scales = []
    for _ in range(2):
        model, _ = quantize(tiny_vit(), x, cfg, progress=False)
        scales.append(torch.cat([q.scale for _, op in quant_ops(model) for q in op.quantizers().values()]))
    assert torch.equal(scales[0], scales[1])


def test_bad_calibration_input_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        quantize(tiny_vit(), torch.zeros(0, 3, 32, 32), "minmax", progress=False)
    with pytest.raises(ValueError, match="NaN"):
        quantize(tiny_vit(), torch.full((2, 3, 32, 32), float("nan")), "minmax", progress=False)
    model = tiny_vit()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="head.weight"):
        quantize(model, torch.randn(2, 3, 32, 32), "minmax", progress=False)
