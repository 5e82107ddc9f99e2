"""Liu et al. 2021: ranking loss, Pearson objective, bias correction, mixed precision."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_swin, tiny_vit
import vitquant
from vitquant import quantize
from vitquant.calibration import OpData
from vitquant.calibration.bias_correction import correct_bias, mean_output_error
from vitquant.calibration.objectives import RankingPearson, pearson, ranking_loss, ranking_pairs
from vitquant.evaluate import model_size_mb
from vitquant.mixed_precision import allocate_bits, nuclear_norms
from vitquant.nn import QuantLinear
from vitquant.nn.wrap import quant_modules, quant_ops, wrap_model
from vitquant.quantizers import UniformQuantizer
from vitquant.recipes import MixedPrecisionConfig, get_recipe


def brute_force_ranking(y, t, theta):
    """Eq. (10) with explicit loops: sum over rows and pairs p < q, per candidate, / (rows * pairs)."""
    c, w = y.shape[0], t.shape[-1]
    yr, tr = y.reshape(c, -1, w), t.reshape(-1, w)
    out = torch.zeros(c, dtype=torch.float64)
    for ci in range(c):
        for r in range(tr.shape[0]):
            for p in range(w - 1):
                for q in range(p + 1, w):
                    m = (yr[ci, r, p] - yr[ci, r, q]) * torch.sign(tr[r, p] - tr[r, q])
                    out[ci] += max(0.0, theta - float(m))
    rows_per_sample = tr.shape[0] // t.shape[0]
    return out / (rows_per_sample * w * (w - 1) / 2)


@pytest.mark.parametrize("theta", [0.0, 0.3])
def test_ranking_loss_equals_brute_force_double_loop(theta):
    torch.manual_seed(0)
    t = torch.randn(2, 3, 5, 7)  # [images, heads, rows, keys]
    y = t + 0.4 * torch.randn(4, 2, 3, 5, 7)
    got = ranking_loss(y, t, theta, max_pairs=10_000)[:, 0]
    assert torch.allclose(got.double(), brute_force_ranking(y, t, theta), rtol=1e-5, atol=1e-6)


def test_ranking_loss_penalises_order_flips_not_shifts():
    t = torch.randn(1, 2, 4, 9)
    flipped = -t
    loss = ranking_loss(torch.stack([t + 3.0, flipped]), t, 0.0, 10_000)[:, 0]
    assert loss[0] == 0 and loss[1] > 0


def test_sampled_pairs_are_deterministic_distinct_and_ordered():
    a, b = ranking_pairs(197, 256), ranking_pairs(197, 256)
    assert torch.equal(a, b) and a.shape == (2, 256)
    assert (a[0] < a[1]).all() and len({tuple(x) for x in a.T.tolist()}) == 256
    assert ranking_pairs(6, 256).shape == (2, 15)  # all pairs when few


def test_ranking_pearson_objective_combines_eq_11_and_splits_over_heads():
    torch.manual_seed(1)
    t = torch.randn(2, 3, 5, 7)
    y = t + 0.3 * torch.randn(4, 2, 3, 5, 7)
    obj = RankingPearson(theta=0.1, gamma=2.0, max_pairs=10_000)
    total = obj(y.clone(), t, None, None, 1)
    expect = 2.0 * ranking_loss(y, t, 0.1, 10_000) + pearson(y.clone(), t, None, None, 1)
    assert torch.allclose(total, expect, atol=1e-5)
    per_head = obj(y.clone(), t, None, 1, 3)  # groups = heads: the ranking part splits over them
    assert per_head.shape == (4, 3)
    assert torch.allclose(ranking_loss(y, t, 0.1, 10_000, 1, 3).sum(1), ranking_loss(y, t, 0.1, 10_000)[:, 0], atol=1e-5)


@pytest.mark.parametrize("has_bias", [True, False])
def test_bias_correction_removes_the_mean_output_error(has_bias):
    torch.manual_seed(0)
    op = QuantLinear(torch.nn.Linear(16, 8, bias=has_bias), "fc1")
    op.weight_quantizer = UniformQuantizer(3)
    op.input_quantizer = UniformQuantizer(3)
    x = torch.randn(6, 10, 16) + 0.5
    data = OpData((x,), F.linear(x, op.weight, op.bias))
    for n, q in op.quantizers().items():
        q.set_scale(q.initial_scale(data.operand(op, n)) * 1.3)
    op.refresh()
    before = mean_output_error(op, data).abs().max()
    info = correct_bias(op, data)
    after = mean_output_error(op, data).abs().max()
    assert before > 1e-3 and after < 1e-3 * before
    assert info["error_after"] < 1e-3 * info["error_before"]
    fp_bias = None if op.bias is None else op.bias.clone()
    from vitquant.nn.wrap import quantization_disabled
    with quantization_disabled(op):  # the FP model keeps its bias
        assert torch.allclose(op(x), F.linear(x, op.weight, fp_bias))


def test_dp_allocation_equals_exhaustive_search_and_respects_budget():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = rng.integers(1, 6, size=5) * 12
        choices = [4, 5, 6, 7, 8]
        omega = rng.random((5, 5)) * np.array([16, 8, 4, 2, 1])[None]  # more bits, less error
        budget = float(n.sum() * rng.uniform(4.2, 7.8))
        alloc = allocate_bits(n.tolist(), choices, omega, budget)
        best = min((sum(omega[i, k] for i, k in enumerate(ks)), ks)
                   for ks in itertools.product(range(5), repeat=5)
                   if sum(n[i] * choices[k] for i, k in enumerate(ks)) <= budget)
        assert alloc.omega == pytest.approx(best[0])
        assert alloc.cost_bits <= budget and alloc.exact
        assert sum(omega[i, choices.index(b)] for i, b in enumerate(alloc.bits)) == pytest.approx(alloc.omega)


def test_dp_rejects_a_budget_that_cannot_be_met():
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_bits([10, 10], [4, 8], np.ones((2, 2)), budget_bits=70)


def test_nuclear_norms_are_the_mean_sum_of_singular_values():
    model = wrap_model(tiny_vit())
    images = torch.randn(3, 3, 32, 32)
    modules = quant_modules(model)
    assert [m.kind for m in modules] == ["msa", "mlp", "msa", "mlp"]
    got = nuclear_norms(model, images, modules, batch_size=2)
    cap = {}
    op = dict(quant_ops(model))["blocks.1.mlp.fc2"]
    h = op.register_forward_hook(lambda m, a, o: cap.setdefault("o", o))
    with torch.no_grad():
        model(images)
    h.remove()
    expect = sum(torch.linalg.svdvals(o.double()).sum() for o in cap["o"]) / 3
    assert got["blocks.1.mlp"] == pytest.approx(float(expect), rel=1e-9)


def test_liu2021_recipe_uses_ranking_for_qk_and_corrects_biases():
    model = tiny_vit()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = get_recipe("liu2021", 6, 6, num_candidates=12)
    _, report = quantize(model, images, cfg, progress=False)
    ops = dict(quant_ops(model))
    assert ops["blocks.0.attn.matmul_av"].a_quantizer.qmin == 0  # unsigned post-softmax
    assert "bias_correction" in report.ops["blocks.0.mlp.fc1"]
    assert ops["blocks.0.mlp.fc1"].bias_correction is not None
    assert "bias_correction" not in report.ops["blocks.0.attn.matmul_qk"]
    assert 1 <= report.ops["blocks.0.attn.qkv"]["rounds"] <= 20


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_mixed_precision_meets_the_budget_and_reports_modules(make):
    model = make()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = get_recipe("liu2021", 6, 6, num_candidates=8, rounds=2).replace(
        mixed_precision=MixedPrecisionConfig(choices=(4, 6, 8)))
    _, report = quantize(model, images, cfg, progress=False)
    mp = report.mixed_precision
    assert mp["size_mb"] <= mp["budget_mb"] + 1e-9
    assert mp["size_mb"] == pytest.approx(model_size_mb(model))
    bits = {r["name"]: r["bits"] for r in mp["modules"]}
    assert set(bits.values()) <= {4, 6, 8} and len(bits) == len(quant_modules(model))
    for m in quant_modules(model):
        for _, op in m.ops:
            for q in op.quantizers().values():
                assert q.bits == bits[m.name]
    assert all(r["nuclear_norm"] > 0 for r in mp["modules"])


def test_mixed_precision_needs_equal_weight_and_input_bits():
    with pytest.raises(ValueError, match="equal"):
        get_recipe("liu2021", 6, 8).replace(mixed_precision=MixedPrecisionConfig())


def test_hessian_trace_is_hutchinson_on_the_explicit_hessian():
    """Same Rademacher vectors, explicit Hessian of the module's weights: mean v^T H v / n."""
    from vitquant.mixed_precision import hessian_traces, module_weights, rademacher_vectors
    model = wrap_model(tiny_vit(embed_dim=8, num_heads=2, depth=1, mlp_ratio=1.0))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    modules = quant_modules(model)
    got = hessian_traces(model, images, modules, batch_size=2, samples=5, seed=3)
    vectors = rademacher_vectors({m.name: module_weights(m) for m in modules}, 5, 3)
    for m in modules:
        ps = module_weights(m)
        logits = model(images)
        loss = F.cross_entropy(logits, logits.argmax(-1), reduction="sum") / 2
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, ps, create_graph=True)])
        h = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[j], ps, retain_graph=True)])
                         for j in range(g.numel())])
        vs = [torch.cat([t.reshape(-1) for t in v]) for v in vectors[m.name]]
        expect = sum(float(v @ h @ v) for v in vs) / len(vs) / g.numel()
        assert got[m.name] == pytest.approx(expect, rel=1e-4, abs=1e-7)


def mixed_precision_with_omega(omega: str):
    """A tiny ViT quantized by liu2021 W6A6 with {4, 8}-bit mixed precision and this Omega form;
    returns the images, the model and the mixed-precision report (checked against its budget)."""
    from vitquant.recipes import MixedPrecisionConfig
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # the biases stay as each bit-width's calibration left them, i.e. as Omega measured them
    mp = MixedPrecisionConfig(choices=(4, 8), omega=omega, remeasure_bias=False)
    cfg = get_recipe("liu2021", 6, 6, rounds=1, num_candidates=8).replace(mixed_precision=mp)
    model, report = quantize(tiny_vit(), x, cfg, progress=False)
    r = report.mixed_precision
    assert r["omega_form"] == omega and r["size_mb"] <= r["budget_mb"] + 1e-9
    return x, model, r


def test_module_output_omega_measures_each_module_at_its_output():
    _, _, r = mixed_precision_with_omega("module_output")
    for m in r["modules"]:  # more bits never perturb a module's output more
        assert m["omega"]["8"] <= m["omega"]["4"]
    # the nuclear norm is taken relative to the mean of its kind: MSA and MLP omegas at 4 bits are
    # then within a few orders of magnitude, not the 10^4-10^5 of the paper's form on DeiT
    msa = [m["omega"]["4"] for m in r["modules"] if m["kind"] == "msa"]
    mlp = [m["omega"]["4"] for m in r["modules"] if m["kind"] == "mlp"]
    assert 1e-3 < (sum(msa) / len(msa)) / (sum(mlp) / len(mlp)) < 1e3


def test_output_kl_omega_is_the_kl_of_the_class_probabilities_with_one_module_quantized():
    from vitquant.nn.wrap import quant_modules, quantization_only
    x, model, r = mixed_precision_with_omega("output_kl")
    with torch.no_grad(), vitquant.quantization_disabled(model):
        p = model(x).double().log_softmax(-1)
    for module, row in zip(quant_modules(model), r["modules"]):
        assert 0 <= row["omega"]["8"] <= row["omega"]["4"]
        # the model holds each module at its chosen bit-width: recompute that entry by hand
        with torch.no_grad(), quantization_only(model, [op for _, op in module.ops]):
            q = model(x).double().log_softmax(-1)
        kl = float((p.exp() * (p - q)).sum(-1).mean())
        assert row["omega"][str(row["bits"])] == pytest.approx(kl, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("remeasure", [True, False])
def test_bias_correction_is_measured_again_in_the_mixed_model(remeasure):
    """After the allocation each corrected layer's mean output error on the inputs it gets in the
    mixed model is ~0 when re-measured (Eqs. 13-15 in the final configuration), and is not
    when the per-bit-width corrections are kept as calibrated."""
    from vitquant.calibration.bias_correction import output_errors
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mp = MixedPrecisionConfig(choices=(4, 8), remeasure_bias=remeasure)
    cfg = get_recipe("liu2021", 6, 6, rounds=1, num_candidates=8).replace(mixed_precision=mp)
    model, report = quantize(tiny_vit(), x, cfg, progress=False)
    r = report.mixed_precision
    assert sorted({m["bits"] for m in r["modules"]}) == [4, 8]  # really mixed
    corrected = [(n, op) for n, op in quant_ops(model) if getattr(op, "bias_correction", None) is not None]
    errors = output_errors(model, x, corrected)
    worst = max(float(e.abs().max()) for e in errors.values())
    if remeasure:
        assert r["bias_remeasured"]["ops"] == len(corrected) > 0
        assert r["bias_remeasured"]["error_after"] < 1e-3 * r["bias_remeasured"]["error_before"]
        assert worst < 1e-5
    else:
        assert r["bias_remeasured"] is None and worst > 1e-3
