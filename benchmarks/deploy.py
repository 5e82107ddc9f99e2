"""Deployment check (issue 5): saved checkpoint, ONNX QDQ export and ONNX Runtime INT8.

1. Accuracy (``--part accuracy``): DeiT-Tiny with the shared weights, ``--method`` at W8A8 on the
   first ``--num-calib`` calibration images; save -> load (logits must equal the in-memory model's
   bit for bit), export to ONNX, evaluate the simulated (PyTorch) and the ONNX Runtime INT8 model on
   the evaluation split: top-1 of each, their difference and top-1 agreement, on-disk vs computed size.
2. Speed (``--part speed``): ``--speed-model`` (random init, default deit_small_patch16_224)
   quantized with each of ``--speed-methods`` at W8A8 on ``--speed-calib`` sample images, then PyTorch FP32 vs
   ONNX Runtime FP32 vs INT8 throughput side by side (median of ``--repeats``), batch sizes 1 and 32,
   and which quantized ops ONNX Runtime ran as integer kernels.

Writes ``deploy.json`` / ``.md`` into ``--out``.

    python benchmarks/deploy.py
"""
from __future__ import annotations

import tempfile
import time

import torch

from common import base_parser, load_data, log, peak_rss_gb, setup


class _Float64(torch.nn.Module):
    """The simulated model computing in float64 (inputs cast in, logits cast back): the same
    quantizers and codes, different floating-point rounding. Its agreement with the float32
    simulation is the noise floor any other runtime is measured against."""

    def __init__(self, model):
        super().__init__()
        import copy
        self.model = copy.deepcopy(model).double()

    def forward(self, x):
        return self.model(x.double()).float()


def _agreement(a, b) -> float:
    """Top-1 agreement (%) of two predictions on the same images."""
    return 100.0 * (a.top5[:, 0] == b.top5[:, 0]).float().mean().item()


def divergence(model, images: torch.Tensor, tmp: str, threads: int) -> list[dict]:
    """Where ONNX Runtime and the simulation part: the model truncated after each block, exported,
    and its logits compared on ``images``. An image whose largest logit difference exceeds 1e-4
    had at least one activation code flip (float rounding moved a value across a rounding boundary)."""
    from vitquant.export.onnx import OrtModel, export_onnx
    blocks, rows = model.blocks, []
    try:
        for n in range(1, len(blocks) + 1):
            model.blocks = blocks[:n]
            export_onnx(model, f"{tmp}/t{n}.onnx")
            with torch.no_grad():
                diff = (OrtModel(f"{tmp}/t{n}.onnx", threads)(images) - model(images)).abs().amax(1)
            rows.append(dict(blocks=n, images_with_flip=int((diff > 1e-4).sum()), num_images=len(images),
                             median_max_logit_diff=float(diff.median()), max_logit_diff=float(diff.max())))
            log(f"first {n} blocks: {rows[-1]['images_with_flip']} of {len(images)} images differ, "
                f"median largest logit difference {rows[-1]['median_max_logit_diff']:.3g}")
    finally:
        model.blocks = blocks
    return rows


def accuracy(args, doc) -> None:
    from vitquant import get_recipe, load, quantize, save
    from vitquant.evaluate import model_size_mb, predict_top5, topk_accuracy
    from vitquant.export.onnx import OrtModel, export_onnx, integer_kernels
    from vitquant.models import load_model

    model, info = load_model("deit_tiny_patch16_224", args.checkpoint)
    calib, evalset = load_data(model, args.sample, args.num_calib, args.num_eval, progress=True)
    cfg = get_recipe(args.method, 8, 8)
    t = time.perf_counter()
    model, _ = quantize(model, calib, cfg, progress=False)
    calib_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        manifest = save(model, f"{tmp}/q", model_name="deit_tiny_patch16_224", weights=info)
        loaded = load(f"{tmp}/q")
        x = evalset.tensors()[:16]
        with torch.no_grad():
            identical = torch.equal(model(x), loaded(x))
        export = export_onnx(loaded, f"{tmp}/q.onnx")
        kernels = integer_kernels(f"{tmp}/q.onnx", loaded)
        sim = predict_top5(loaded, evalset, progress=True, desc="simulated (PyTorch)")
        ort = predict_top5(OrtModel(f"{tmp}/q.onnx", args.threads), evalset, progress=True, desc="ONNX Runtime INT8")
        ov = None
        from vitquant.export.openvino import OpenVinoModel, openvino_version
        if openvino_version() is not None:  # the second runtime, on the same file
            ov = predict_top5(OpenVinoModel(f"{tmp}/q.onnx", args.threads), evalset, progress=True, desc="OpenVINO INT8")
        sim64 = predict_top5(_Float64(loaded), evalset, progress=True, desc="simulated in float64")
        # the tool a user would pick instead: ONNX Runtime's quantize_static on the FP32 export, same images.
        # FP32 from the in-memory model: a loaded checkpoint holds the dequantized codes, not the FP weights
        from vitquant import quantization_disabled
        from vitquant.export.ort_static import ort_quantize_static
        export_onnx(model, f"{tmp}/fp32.onnx", fp32=True, verify=False)
        static_cfg = ort_quantize_static(f"{tmp}/fp32.onnx", f"{tmp}/static.onnx", calib.tensors())
        static = predict_top5(OrtModel(f"{tmp}/static.onnx", args.threads), evalset, progress=True,
                              desc="ONNX Runtime quantize_static")
        with quantization_disabled(model):
            fp = predict_top5(model, evalset, progress=True, desc="FP32")
        parting = divergence(loaded, evalset.tensors()[:args.divergence_images], tmp, args.threads) \
            if args.divergence_images else []
    sim1, ort1 = topk_accuracy(sim.top5, evalset.labels)[0], topk_accuracy(ort.top5, evalset.labels)[0]
    agree = _agreement(sim, ort)
    doc["accuracy"] = dict(
        model="deit_tiny_patch16_224", weights=info, method=args.method, w_bits=8, a_bits=8, config=cfg.to_dict(),
        num_calib=len(calib), calib_names=calib.names, num_eval=len(evalset), eval_data=evalset.describe(),
        calibration_seconds=round(calib_s, 1), reload_logits_identical=identical,
        simulated_top1=sim1, onnx_int8_top1=ort1, top1_difference=round(ort1 - sim1, 4), top1_agreement=agree,
        computed_size_mb=model_size_mb(model), checkpoint_bytes=manifest["tensors_bytes"],
        onnx_bytes=export["bytes"], onnx_int8_weights=export["int8_weights"], runtime=kernels,
        simulated_seconds=round(sim.seconds, 1), onnx_seconds=round(ort.seconds, 1),
        simulated_float64_top1=topk_accuracy(sim64.top5, evalset.labels)[0],
        agreement_simulated_float32_vs_float64=_agreement(sim, sim64), agreement_onnx_vs_simulated_float64=_agreement(ort, sim64),
        divergence_per_block=parting, fp32_top1=topk_accuracy(fp.top5, evalset.labels)[0],
        simulated_agreement_with_fp32=_agreement(sim, fp), ort_static=static_cfg,
        ort_static_top1=topk_accuracy(static.top5, evalset.labels)[0], ort_static_agreement_with_fp32=_agreement(static, fp))
    if ov is not None:
        ov1 = topk_accuracy(ov.top5, evalset.labels)[0]
        doc["accuracy"] |= dict(openvino_int8_top1=ov1, openvino_top1_difference=round(ov1 - sim1, 4),
                                openvino_top1_agreement=_agreement(sim, ov), openvino_seconds=round(ov.seconds, 1))
    log(f"simulated {sim1:.2f}, ONNX Runtime INT8 {ort1:.2f} (diff {ort1 - sim1:+.2f}), agreement {agree:.2f} %, "
        f"reload identical {identical}")


def speed(args, doc) -> None:
    from vitquant import get_recipe, quantize
    from vitquant.export.bench import benchmark_runtimes
    from vitquant.models import load_model

    doc["speed"] = []
    for method in args.speed_methods:
        model, info = load_model(args.speed_model, pretrained=False)
        calib, _ = load_data(model, args.sample, args.speed_calib, 1)
        model, _ = quantize(model, calib, get_recipe(method, 8, 8), progress=False)
        rows = benchmark_runtimes(model, args.batch_sizes, warmup=args.warmup, repeats=args.repeats,
                                  threads=args.threads, int8_modes=args.int8, calib_images=calib.tensors())
        doc["speed"].append(dict(model=args.speed_model, weights=info, method=method, num_calib=len(calib), rows=rows))
        _log_rows(method, rows, args)
    from vitquant import load
    for d in args.speed_saved:
        model = load(d)
        rows = benchmark_runtimes(model, args.batch_sizes, warmup=args.warmup, repeats=args.repeats,
                                  threads=args.threads, int8_modes=args.int8)
        m = model.vitquant_manifest
        doc["speed"].append(dict(model=m["model"], weights=m.get("weights"), method=m["config"]["method"],
                                 saved=str(d), rows=rows))
        _log_rows(m["config"]["method"], rows, args)


def _log_rows(method, rows, args) -> None:
    for r in rows:
        log(f"{method} batch {r['batch']}: torch FP32 {r['torch_fp32_ips']:.1f}, ONNX FP32 {r['onnx_fp32_ips']:.1f}, "
            + ", ".join(f"ONNX INT8 {m} {r[f'onnx_int8_{m}_ips']:.1f}" for m in args.int8)
            + f", ORT quantize_static {r['ort_static_int8_ips']:.1f}"
            + "".join(f", {k[:-4]} {r[k]:.1f}" for k in r if k.startswith("openvino_") and k.endswith("_ips"))
            + (f", best verified INT8 {r['best_int8']} x{r['best_speedup']:.2f} over {r['best_fp32']}" if "best_int8" in r else "")
            + f" img/s (x{r['int8_speedup']:.2f}), accelerated {r['accelerated']}")


def markdown(doc) -> str:
    lines = []
    a = doc.get("accuracy")
    if a:
        lines += [f"**Accuracy**: {a['model']} (shared weights), {a['method']} W8A8, {a['num_calib']} calibration "
                  f"images, {a['num_eval']} evaluation images.", "",
                  "| runtime | top-1 % | agreement with simulated | size |", "|---|---|---|---|",
                  f"| PyTorch, simulated (fake quant) | {a['simulated_top1']:.2f} | - | "
                  f"{a['computed_size_mb']:.2f} MB computed, {a['checkpoint_bytes'] / 1e6:.2f} MB checkpoint |",
                  f"| ONNX Runtime INT8 (QDQ) | {a['onnx_int8_top1']:.2f} | {a['top1_agreement']:.2f} % | "
                  f"{a['onnx_bytes'] / 1e6:.2f} MB .onnx |"]
        if "openvino_int8_top1" in a:
            lines.append(f"| OpenVINO INT8 (the same .onnx) | {a['openvino_int8_top1']:.2f} | {a['openvino_top1_agreement']:.2f} % | - |")
        if "ort_static_top1" in a:
            lines += [f"| FP32 (PyTorch) | {a['fp32_top1']:.2f} | - | - |",
                      f"| ONNX Runtime quantize_static (QDQ, per-channel, MinMax, same calibration images) | "
                      f"{a['ort_static_top1']:.2f} | agreement with FP32 {a['ort_static_agreement_with_fp32']:.2f} % "
                      f"(vitquant's {a['simulated_agreement_with_fp32']:.2f} %) | - |"]
        lines += ["",
                  f"Reloaded checkpoint gives bit-identical logits: {a['reload_logits_identical']}.", ""]
        if "agreement_simulated_float32_vs_float64" in a:
            lines += ["Noise floor: the same simulated model computed in float64 (same quantizers, other "
                      f"floating-point rounding) has top-1 {a['simulated_float64_top1']:.2f}; its top-1 agreement "
                      f"with the float32 simulation is {a['agreement_simulated_float32_vs_float64']:.2f} %, with "
                      f"ONNX Runtime INT8 {a['agreement_onnx_vs_simulated_float64']:.2f} %.", ""]
        if a.get("divergence_per_block"):
            lines += ["Model truncated after N blocks, ONNX Runtime vs simulated: images with a code flip "
                      "(largest logit difference > 1e-4), median and largest logit difference.", "",
                      "| blocks | images with a flip | median | largest |", "|---|---|---|---|"]
            lines += [f"| {r['blocks']} | {r['images_with_flip']} of {r['num_images']} | "
                      f"{r['median_max_logit_diff']:.3g} | {r['max_logit_diff']:.3g} |" for r in a["divergence_per_block"]]
            lines.append("")
    for s in doc.get("speed") or []:
        modes = [k[len("onnx_int8_"):-len("_ips")] for k in s["rows"][0]
                 if k.startswith("onnx_int8_") and k.endswith("_ips") and k != "onnx_int8_ips"] or ["exact"]
        cpu = (doc.get("environment") or {}).get("processor") or {}
        isa = cpu.get("isa") or {}
        lines += [f"**Speed**: {s['model']} (random init), {s['method']} W8A8, {s['rows'][0]['threads']} threads, "
                  f"median of {s['rows'][0]['repeats']} runs; images/s. CPU: {cpu.get('model')} "
                  f"(AVX2 {isa.get('avx2')}, AVX-512 {isa.get('avx512f')}, VNNI {isa.get('vnni')}).", "",
                  "| batch | PyTorch FP32 | ONNX FP32 | " + " | ".join(f"ONNX INT8 {m} | {m} / ONNX FP32" for m in modes)
                  + " | ORT quantize_static INT8 | static / ONNX FP32 | OpenVINO FP32 | "
                  + " | ".join(f"OpenVINO INT8 {m}" for m in modes)
                  + " | best verified INT8 / best FP32 | accelerated |",
                  "|---|---|---|" + "---|---|" * len(modes) + "---|---|---|" + "---|" * len(modes) + "---|---|"]
        for r in s["rows"]:
            cells = " | ".join(f"{r.get(f'onnx_int8_{m}_ips', r['onnx_int8_ips']):.1f} | "
                               f"x{r.get(f'onnx_int8_{m}_ips', r['onnx_int8_ips']) / r['onnx_fp32_ips']:.2f}" for m in modes)
            static = (f"{r['ort_static_int8_ips']:.1f} | x{r['ort_static_speedup']:.2f}" if "ort_static_int8_ips" in r
                      else "- | -")
            ov = " | ".join(f"{r[k]:.1f}" if k in r else "-" for k in
                            ["openvino_fp32_ips"] + [f"openvino_int8_{m}_ips" for m in modes])
            best = (f"x{r['best_speedup']:.2f} ({r['best_int8']} / {r['best_fp32']})" if "best_int8" in r else "-")
            lines.append(f"| {r['batch']} | {r['torch_fp32_ips']:.1f} | {r['onnx_fp32_ips']:.1f} | {cells} | {static} | "
                         f"{ov} | {best} | {r['accelerated']} |")
        lines += ["", "Quantized ops by kind (op type and input quantizers) and how ONNX Runtime ran them:", ""]
        for kind, c in s["rows"][0]["by_quantizer"].items():
            lines.append(f"- {kind}: {c['integer']} integer, {c['float']} float")
        lines.append("")
    return "\n".join(lines)


def main():
    p = base_parser(__doc__)
    p.add_argument("--part", choices=["accuracy", "speed", "both"], default="both")
    p.add_argument("--method", default="ptq4vit", help="the accuracy part's recipe")
    p.add_argument("--speed-methods", nargs="+", default=["base", "ptq4vit"], help="recipes of the speed part")
    p.add_argument("--speed-model", default="deit_small_patch16_224")
    p.add_argument("--speed-saved", nargs="*", default=[], metavar="DIR",
                   help="saved quantized models (vitquant quantize --save) timed after the speed methods, e.g. a "
                        "recipe whose calibration is too slow to repeat here")
    p.add_argument("--speed-calib", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--int8", nargs="+", choices=["exact", "fast"], default=["exact", "fast"],
                   help="int8 storage modes timed side by side (vitquant export --int8)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--divergence-images", type=int, default=100,
                   help="images for the per-block divergence check of the accuracy part (0 skips it)")
    p.add_argument("--name", default="deploy")
    args = p.parse_args()
    setup(args.threads)
    from vitquant.io import atomic_write_json, atomic_write_text
    from vitquant.report import environment
    doc = dict(environment=environment())
    if args.part in ("accuracy", "both"):
        accuracy(args, doc)
    if args.part in ("speed", "both"):
        speed(args, doc)
    doc["peak_rss_gb"] = peak_rss_gb()
    atomic_write_json(f"{args.out}/{args.name}.json", doc)
    atomic_write_text(f"{args.out}/{args.name}.md", markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
