"""TSPTQ-ViT on DeiT-Tiny with the shared weights.

1. Quantizer error on real activations (FP, first ``--error-images`` calibration images): for every
   block, the best relative squared error ``sum (Q(x) - x)^2 / sum x^2`` each quantizer reaches on
   its own candidate grid (per head for post-softmax): V-2SF vs plain uniform (and PTQ4ViT's twin)
   for post-softmax and post-GELU, O-2SF vs per-tensor uniform for the LayerNorm inputs.
2. Top-1 on the evaluation split: PTQ4ViT and TSPTQ in the partial (PTQ4ViT) and the full
   (+ every LayerNorm input) setting, and the full setting with uniform quantizers in place of the
   two-scaled ones. Writes ``tsptq.json`` / ``.md`` into ``--out`` after every row.

    python benchmarks/tsptq.py
"""
from __future__ import annotations

import time

import torch

from common import base_parser, load_data, log, peak_rss_gb, setup

ROWS = [  # (label, recipe, overrides, bits); most important first
    ("tsptq, full", "tsptq", {}, (8, 6)),
    ("ptq4vit, partial", "ptq4vit", {}, (6, 8)),
    ("tsptq, partial", "tsptq", dict(quantize_layernorm=False), (6, 8)),
    ("ptq4vit, full (O-2SF LayerNorm)", "ptq4vit", dict(quantize_layernorm=True), (6, 8)),
    ("tsptq, full, uniform LayerNorm", "tsptq", dict(layernorm_quantizer="uniform"), (8, 6)),
    ("full, uniform only (no V-2SF, no O-2SF)", "tsptq",
     dict(softmax_v2sf=False, gelu_v2sf=False, layernorm_quantizer="uniform"), (8, 6)),
]


def main():
    p = base_parser(__doc__)
    p.add_argument("--error-images", type=int, default=8)
    p.add_argument("--only", nargs="*", help="run only these rows (exact labels); 'errors' for part 1")
    args = p.parse_args()
    setup(args.threads)
    from vitquant import get_recipe, quantization_disabled, quantize
    from vitquant.evaluate import compare, model_size_mb, predict_top5, topk_accuracy
    from vitquant.io import atomic_write_json, atomic_write_text
    from vitquant.models import load_model
    from vitquant.nn import wrap_model
    from vitquant.report import environment, layernorm_outliers

    model, info = load_model("deit_tiny_patch16_224", args.checkpoint)
    calib, evalset = load_data(model, args.sample, args.num_calib, args.num_eval, progress=True)
    images = calib.tensors()
    out = f"{args.out}/tsptq"
    doc = dict(meta=dict(model="deit_tiny_patch16_224", weights=info, num_calib=len(calib), num_eval=len(evalset),
                         calib_names=calib.names, eval_names_sha256=evalset.describe()["names_sha256"],
                         environment=environment()), errors=None, results=[])

    def save():
        doc["meta"]["peak_rss_gb"] = peak_rss_gb()
        atomic_write_json(out + ".json", doc)
        atomic_write_text(out + ".md", markdown(doc))

    if not args.only or "errors" in args.only:
        wrap_model(model)
        doc["errors"] = quantizer_errors(model, images[:args.error_images])
        save()
        log(markdown_errors(doc["errors"]))
    with quantization_disabled(wrap_model(model)):
        fp32 = predict_top5(model, evalset, progress=False)
    doc["meta"]["fp32_top1"] = topk_accuracy(fp32.top5, evalset.labels)[0]
    for label, recipe, overrides, bits_list in ROWS:
        if args.only and label not in args.only:
            continue
        for bits in bits_list:
            cfg = get_recipe(recipe, bits, bits).replace(**overrides)
            m, _ = load_model("deit_tiny_patch16_224", args.checkpoint)
            t0 = time.perf_counter()
            quantize(m, images, cfg, progress=False)
            seconds = time.perf_counter() - t0
            c = compare(m, evalset, fp32=fp32, progress=False)
            r = dict(row=label, w_bits=bits, a_bits=bits, setting=cfg.setting, quant_top1=c.quant_top1,
                     top1_drop=c.top1_drop, top1_agreement=c.top1_agreement, quant_top5=c.quant_top5,
                     model_size_mb=model_size_mb(m), calib_seconds=round(seconds, 1), config=cfg.to_dict())
            if cfg.quantize_layernorm:
                r["layernorm_outliers"] = layernorm_outliers(m)
            doc["results"].append(r)
            log(f"{label:42s} W{bits}A{bits}: top-1 {c.quant_top1:.2f} (drop {c.top1_drop:+.2f}), calib {seconds:.0f} s")
            save()
    print(markdown(doc))


@torch.no_grad()
def quantizer_errors(model, images) -> dict:
    """Best relative squared error of each quantizer on each block's FP activations."""
    from vitquant.nn import quant_ops
    from vitquant.quantizers import (OutlierTwoScaleQuantizer, TwinGeluQuantizer, TwinSoftmaxQuantizer,
                                     UniformQuantizer, ValueTwoScaleQuantizer)
    acts: dict[str, torch.Tensor] = {}
    hooks = []
    for name, op in quant_ops(model):
        if op.role in ("matmul_av", "fc2", "layernorm") and ".blocks." in f".{name}":
            hooks.append(op.register_forward_hook(lambda mod, a, o, name=name: acts.__setitem__(name, a[0].detach())))
    from vitquant import quantization_disabled
    with quantization_disabled(model):
        model(images)
    for h in hooks:
        h.remove()
    heads = next(op.num_heads for _, op in quant_ops(model) if op.role == "matmul_av")
    kinds = {
        "post-softmax": ("matmul_av", {
            "uniform (unsigned, per head)": lambda b, x: UniformQuantizer(b, signed=False, groups=heads, group_dim=1),
            "twin uniform (PTQ4ViT)": lambda b, x: TwinSoftmaxQuantizer(b, groups=heads, group_dim=1),
            "V-2SF": lambda b, x: ValueTwoScaleQuantizer(b, groups=heads, group_dim=1)}),
        "post-GELU": ("fc2", {
            "uniform (signed)": lambda b, x: UniformQuantizer(b),
            "twin uniform (PTQ4ViT)": lambda b, x: TwinGeluQuantizer(b),
            "V-2SF": lambda b, x: ValueTwoScaleQuantizer(b, signed=True)}),
        "LayerNorm input": ("norm", {
            "uniform (per tensor)": lambda b, x: UniformQuantizer(b),
            "O-2SF": lambda b, x: OutlierTwoScaleQuantizer(b, x.shape[-1])}),
    }
    result = {}
    for kind, (role, quantizers) in kinds.items():
        names = [n for n in acts if n.rsplit(".", 1)[-1].startswith(role)]
        for bits in (4, 6, 8):
            for qname, make in quantizers.items():
                errs, outliers = [], []
                for n in names:
                    q = make(bits, acts[n])
                    err, best = _best_error(q, acts[n])
                    errs.append(err)
                    if isinstance(q, OutlierTwoScaleQuantizer):
                        q.set_scale(best)
                        outliers.append(int(q.outlier_flags().sum()))
                row = dict(kind=kind, bits=bits, quantizer=qname, layers=len(names),
                           mean_relative_error=sum(errs) / len(errs), per_layer=errs)
                if outliers:
                    row["outlier_channels_per_layer"] = outliers
                result.setdefault("rows", []).append(row)
    return result


def _best_error(q, x, alpha: float = 0.01, beta: float = 1.2, n: int = 100, chunk: int = 10) -> tuple[float, torch.Tensor]:
    """Lowest ``sum (Q(x) - x)^2 / sum x^2`` over ``q``'s candidate grid (per scale group)."""
    grid = q.candidates(x, alpha, beta, n)
    errs = []
    for c0 in range(0, grid.shape[0], chunk):
        d = (q.fake_quant(x, grid[c0:c0 + chunk]) - x).square_()
        if q.groups > 1:
            d = d.movedim(q.group_dim % x.dim() + 1, 1)
        errs.append(d.reshape(d.shape[0], q.groups, -1).sum(-1))
    err = torch.cat(errs)  # [C, G]
    idx = err.argmin(0)
    best = grid[idx, torch.arange(q.groups)]
    return float(err.min(0).values.sum() / x.square().sum()), best


def markdown_errors(errors) -> str:
    lines = ["Best relative squared error on real DeiT-Tiny activations (mean over blocks; lower is better):", "",
             "| activation | quantizer | W4/A4 | 6 bits | 8 bits |", "|---|---|---|---|---|"]
    rows = errors["rows"]
    for kind, q in dict.fromkeys((r["kind"], r["quantizer"]) for r in rows):
        cells = [f"{r['mean_relative_error']:.2e}" for b in (4, 6, 8) for r in rows
                 if r["kind"] == kind and r["quantizer"] == q and r["bits"] == b]
        lines.append(f"| {kind} | {q} | " + " | ".join(cells) + " |")
    lines[2] = "| activation | quantizer | 4 bits | 6 bits | 8 bits |"
    return "\n".join(lines) + "\n"


def markdown(doc) -> str:
    meta = doc["meta"]
    lines = []
    if doc["errors"]:
        lines += [markdown_errors(doc["errors"]), ""]
    if doc["results"]:
        lines += [f"DeiT-Tiny (shared weights), {meta['num_calib']} calibration / {meta['num_eval']} evaluation images, "
                  f"FP32 top-1 {meta.get('fp32_top1', float('nan')):.2f} %. Cells: top-1 % (drop).", "",
                  "| configuration | setting | W8A8 | W6A6 |", "|---|---|---|---|"]
        res = doc["results"]
        for label in dict.fromkeys(r["row"] for r in res):
            cells = []
            for b in (8, 6):
                r = next((r for r in res if r["row"] == label and r["w_bits"] == b), None)
                cells.append("" if r is None else f"{r['quant_top1']:.2f} ({r['top1_drop']:+.2f})")
            setting = next(r["setting"] for r in res if r["row"] == label)
            lines.append(f"| {label} | {setting} | " + " | ".join(cells) + " |")
        full = next((r for r in res if r["row"] == "tsptq, full" and r["w_bits"] == 8), None)
        if full:
            lo = full["layernorm_outliers"]
            lines += ["", "O-2SF outlier channels per LayerNorm (tsptq, full, W8A8): "
                      + ", ".join(f"{k} {v['outliers']}" for k, v in lo.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
