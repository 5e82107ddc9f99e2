"""Command line: ``vitquant quantize MODEL --method ...``.

User errors (bad paths, unknown model, impossible bit-width, ...) print one line
``vitquant: error: ...`` and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
import time
from typing import Optional

from .errors import VitquantError
from .options import build_parser  # noqa: F401  (also vitquant.cli.build_parser)


def _activation_families(args) -> dict:
    """The config overrides of ``--softmax-quantizer`` / ``--gelu-quantizer`` (``recipes.activation_quantizer``)."""
    from .recipes import activation_quantizer
    out = {}
    for act in ("softmax", "gelu"):
        if (family := getattr(args, f"{act}_quantizer")) is not None:
            out |= activation_quantizer(act, family)
    return out


def _config_from_args(args):
    from .calibration.engine import MemoryBudget
    from .calibration.objectives import RankingPearson
    from .recipes import MixedPrecisionConfig, get_recipe
    # V-2SF and twin uniform exclude each other: asking for one turns the other off unless both are given;
    # --softmax-quantizer / --gelu-quantizer name the family outright
    twin_v2sf, families = {}, _activation_families(args)  # applied after the recipe (they set fields to None)
    for act in ("softmax", "gelu"):
        twin, v2sf, family = (getattr(args, f"{act}_{k}") for k in ("twin", "v2sf", "quantizer"))
        if family is not None:
            if twin is not None or v2sf is not None:
                raise VitquantError(f"--{act}-quantizer names the post-{act} quantizer; drop --{act}-twin / "
                                    f"--{act}-v2sf")
            continue
        if twin and v2sf:
            raise VitquantError(f"--{act}-twin on and --{act}-v2sf on exclude each other; give one")
        twin_v2sf[f"{act}_twin"] = False if v2sf and twin is None else twin
        twin_v2sf[f"{act}_v2sf"] = False if twin and v2sf is None else v2sf
    overrides = dict(**twin_v2sf, quantize_layernorm=args.quantize_layernorm,
                     layernorm_quantizer=args.layernorm_quantizer, rounds=args.search_rounds,
                     num_candidates=args.num_candidates, alpha=args.alpha, beta=args.beta,
                     memory_budget_mb=args.search_memory_mb or (
                         MemoryBudget.search_chunk_mb(args.max_memory) if args.max_memory else None),
                     percentile=args.percentile,
                     objective=args.objective, screen_images=args.screen_images,
                     screen_top_k=args.screen_top_k)
    if args.hessian is not None:
        if args.objective is not None:
            raise VitquantError("--hessian and --objective both set the objective; give only one")
        overrides["objective"] = "hessian" if args.hessian else "cosine"
    if args.per_channel_weights:
        overrides["per_channel_weights"] = True
    if args.sequential:
        overrides["sequential"] = True
    overrides["bias_correction"] = args.bias_correction
    try:
        cfg = get_recipe(args.method, args.w_bits, args.a_bits, **overrides)
        if families:
            cfg = cfg.replace(**families)
        ranking = dict(theta=args.ranking_theta, gamma=args.ranking_gamma, max_pairs=args.ranking_pairs)
        ranking = {k: v for k, v in ranking.items() if v is not None}
        if args.ranking is False:
            if ranking:
                raise VitquantError("--ranking-* options need the ranking loss; drop --no-ranking")
            cfg = cfg.replace(ranking=None)
        elif args.ranking or ranking:
            if cfg.ranking is None:
                cfg = cfg.replace(ranking=RankingPearson())
            cfg = cfg.replace(**ranking)
        if args.layernorm_quantizer and not cfg.quantize_layernorm:
            raise VitquantError("--layernorm-quantizer needs the fully quantized setting; add --quantize-layernorm")
        cfg = _rounding_from_args(cfg, args)
        cfg = _reconstruction_from_args(cfg, args)
        mp = dict(choices=args.bit_choices, target_bits=args.target_bits, target_size_mb=args.target_size_mb,
                  sensitivity=args.sensitivity, omega=args.omega, remeasure_bias=args.remeasure_bias)
        mp = {k: v for k, v in mp.items() if v is not None}
        if args.mixed_precision:
            cfg = cfg.replace(mixed_precision=MixedPrecisionConfig(**mp))
        elif mp:
            flags = {"choices": "--bit-choices", "target_bits": "--target-bits", "target_size_mb": "--target-size-mb",
                     "sensitivity": "--sensitivity", "omega": "--omega", "remeasure_bias": "--remeasure-bias"}
            raise VitquantError(f"{', '.join(flags[k] for k in mp)} need --mixed-precision")
        return cfg
    except ValueError as e:
        raise VitquantError(str(e)) from None


def _rounding_from_args(cfg, args):
    """``--rounding`` / ``--ridge`` / ``--gptq-damp`` / ``--act-order`` on top of the recipe's own pass."""
    from dataclasses import replace as dc_replace

    from .calibration.weight_rounding import RoundingConfig
    knobs = {k: v for k, v in dict(ridge=args.ridge, damp=args.gptq_damp, act_order=args.act_order).items()
             if v is not None}
    if args.rounding == "off":
        if knobs:
            raise VitquantError("--ridge, --gptq-damp and --act-order need a rounding pass; drop --rounding off")
        return cfg.replace(rounding=None)
    base = cfg.rounding
    if args.rounding is not None:
        base = dc_replace(base or RoundingConfig(), method=args.rounding)
    elif knobs and base is None:
        raise VitquantError(f"{args.method} has no weight-rounding pass; add --rounding gptq or --rounding nearest")
    if base is None:
        return cfg
    if base.method != "gptq" and ("damp" in knobs or "act_order" in knobs):
        raise VitquantError("--gptq-damp and --act-order need --rounding gptq")
    return cfg.replace(rounding=dc_replace(base, **knobs))


_RECON_FLAGS = {"iters": "--recon-iters", "batch_size": "--recon-batch-size", "loss": "--recon-loss",
                "drop_prob": "--qdrop", "lr_round": "--recon-lr-round", "lr_step": "--recon-lr-step",
                "round_weight": "--recon-round-weight", "learn_steps": "--recon-learn-steps",
                "keep_better": "--recon-keep-better"}


def _reconstruction_from_args(cfg, args):
    """``--reconstruct`` and its knobs: a reconstruction pass seeded with ``--seed``."""
    from .calibration.reconstruction import ReconstructionConfig
    knobs = {k: getattr(args, flag[2:].replace("-", "_")) for k, flag in _RECON_FLAGS.items()}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if not args.reconstruct:
        if knobs or args.recon_images:
            used = [_RECON_FLAGS[k] for k in knobs] + (["--recon-images"] if args.recon_images else [])
            raise VitquantError(f"{', '.join(used)} need --reconstruct")
        return cfg
    return cfg.replace(reconstruction=ReconstructionConfig(seed=args.seed, **knobs))


def run_quantize(args) -> dict:
    import torch

    from . import __version__
    from .api import quantize
    from .data import default_sample, load_images
    from .evaluate import check_labels, compare, model_size_mb
    from .io import atomic_write_json
    from .models import data_config_for, load_model
    from .quantizers.kernels import fused_kernels_enabled, set_fused_kernels
    from .report import environment, layernorm_outliers, print_summary
    from .runtime import init_distributed, tune_runtime

    cfg = _config_from_args(args)
    if args.no_eval and (args.eval_data or args.eval_list or args.labels or args.num_eval):
        raise VitquantError("--no-eval excludes --eval-data, --eval-list, --labels and --num-eval")
    if args.plots and not args.json:
        raise VitquantError("--plots writes the PNG files next to the --json file; give --json")
    if args.json:
        _check_writable(args.json)
    if args.save:  # before calibrating, not after
        from .export import check_new_dir
        _check_writable(args.save)
        check_new_dir(args.save)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise VitquantError(f"--device {args.device} requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_runtime()
    if args.no_fused_kernels:
        set_fused_kernels(False)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rank, world = init_distributed(args.device)
    if world > 1 and args.device == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    progress = not args.quiet and rank == 0

    if args.checkpoint and args.random_init:
        raise VitquantError("--checkpoint and --random-init exclude each other")
    model, model_info = load_model(args.model, args.checkpoint, pretrained=not args.random_init,
                                   img_size=args.img_size)
    data_config = data_config_for(model)

    calib_dir, calib_list, eval_dir, eval_list = args.calib_data, args.calib_list, args.eval_data, args.eval_list
    sample = None
    if calib_dir is None or (eval_dir is None and not args.no_eval):
        sample = default_sample(seed=args.seed)
    if calib_dir is None:
        calib_dir = sample.image_dir
    if eval_dir is None and not args.no_eval:
        eval_dir = sample.image_dir
    use_cache = not args.no_cache
    calib = load_images(calib_dir, data_config, list_file=calib_list, use_cache=use_cache, progress=progress,
                        names=None if args.calib_data else sample.calib_names)
    if len(calib) < args.num_calib:
        raise VitquantError(f"--num-calib {args.num_calib} but only {len(calib)} readable calibration images "
                            f"in {calib_dir}")
    recon = None
    if args.recon_images:
        if args.recon_images > len(calib):
            raise VitquantError(f"--recon-images {args.recon_images} but only {len(calib)} readable calibration "
                                f"images in {calib_dir}")
        recon = calib.subset(args.recon_images, seed=args.calib_seed)
    calib = calib.subset(args.num_calib, seed=args.calib_seed)
    evalset = None
    if not args.no_eval:
        evalset = load_images(eval_dir, data_config, list_file=eval_list, labels_file=args.labels,
                              use_cache=use_cache, progress=progress, require_labels=True,
                              names=None if args.eval_data else sample.eval_names)
        if args.num_eval:
            if args.num_eval > len(evalset):
                raise VitquantError(f"--num-eval {args.num_eval} but only {len(evalset)} evaluation images")
            evalset = evalset.subset(args.num_eval)
        check_labels(evalset.labels, getattr(model, "num_classes", None))
    for s, what in ((calib, "calibration"), (evalset, "evaluation")):
        if s is None:
            continue
        if s.skipped:
            print(f"vitquant: warning: skipped {len(s.skipped)} unreadable {what} images "
                  f"(e.g. {s.skipped[0][0]}: {s.skipped[0][1]})", file=sys.stderr)

    model.to(args.device)
    t0 = time.perf_counter()
    try:
        model, report = quantize(model, calib, cfg, progress=progress, work_dir=args.work_dir,
                                 max_memory_gb=args.max_memory, recon_data=recon)
    except ValueError as e:
        raise VitquantError(str(e)) from None
    calib_seconds = time.perf_counter() - t0
    cmp = None
    if evalset is not None:
        try:
            cmp = compare(model, evalset, args.batch_size, args.device, progress)
        except FloatingPointError as e:
            raise VitquantError(str(e)) from None
    result = {
        "model": args.model, "method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
        "num_calib": len(calib), "num_eval": len(evalset) if evalset is not None else 0}
    if cmp is not None:
        result |= {
            "fp32_top1": round(cmp.fp32_top1, 4), "fp32_top5": round(cmp.fp32_top5, 4),
            "quant_top1": round(cmp.quant_top1, 4), "quant_top5": round(cmp.quant_top5, 4),
            "top1_drop": round(cmp.top1_drop, 4), "top1_agreement": round(cmp.top1_agreement, 4),
            "eval_seconds": round(cmp.quant_seconds, 3), "fp32_eval_seconds": round(cmp.fp32_seconds, 3),
            "eval_warmup_seconds": round(cmp.quant_warmup_seconds, 3)}
    result |= {
        "model_size_mb": round(model_size_mb(model), 4),
        "fp32_model_size_mb": round(sum(p.numel() for p in model.parameters()) * 4 / 1e6, 4),
        "calib_seconds": round(calib_seconds, 3), "gradient_seconds": round(report.gradient_seconds, 3),
        "fused_kernels": fused_kernels_enabled(),
        "config": cfg.to_dict(), "quantizers_by_site": _site_table(cfg),
        "pipeline": getattr(report, "pipeline", None), "pass_info": getattr(report, "pass_info", None), "seed": args.seed, "calib_seed": args.calib_seed, "device": args.device,
        "weights": model_info, "data_config": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in data_config.items()},
        "calib_data": calib.describe() | {"list": calib_list, "names": calib.names},
        "recon_data": recon.describe() | {"list": calib_list, "names": recon.names} if recon is not None else None,
        "eval_data": evalset.describe() | {"list": eval_list} if evalset is not None else None,
        "default_data_source": sample.source if sample else None,
        "environment": environment(), "vitquant_version": __version__,
        "layers": report.ops,
    }
    if args.max_memory:
        result["memory"] = {"max_memory_gb": args.max_memory, "offloaded_gb": round(report.offloaded_bytes / 1e9, 3)}
    if args.work_dir:
        result["work_dir"] = {"dir": args.work_dir, "resumed_units": report.resumed_units}
        if report.resumed_units and not args.quiet:
            print(f"resumed {report.resumed_units} calibrated blocks from {args.work_dir}", file=sys.stderr)
    if report.mixed_precision is not None:
        result["mixed_precision"] = report.mixed_precision
    result["setting"] = cfg.setting
    if cfg.quantize_layernorm:
        result["layernorm_outliers"] = layernorm_outliers(model)
    if world > 1:  # every rank calibrated identically; evaluation was sharded; one rank writes
        result["distributed"] = {"world_size": world, "backend": torch.distributed.get_backend(),
                                 "eval_images_per_rank": list(cmp.images_per_rank) if cmp else [],
                                 "calibration_collection_ranks": report.collection_ranks}
        if rank != 0:
            return result
    if args.plots:
        result["plots"] = _write_plots(args.json, model, calib, cfg, report, args.plot_block)
    if args.save:
        from .export import save
        manifest = save(model, args.save, model_name=args.model,
                        model_args={"img_size": args.img_size} if args.img_size else None, weights=model_info,
                        extra={"calib_data": calib.describe() | {"names": calib.names}, "seed": args.seed},
                        calibration_sample=calib.subset(8))
        on_disk = sum(f.stat().st_size for f in Path(args.save).iterdir())
        result["saved"] = {"dir": args.save, "bytes_on_disk": on_disk, "mb_on_disk": round(on_disk / 1e6, 4),
                           "tensors_sha256": manifest["tensors_sha256"], "model_size_mb": result["model_size_mb"]}
    print_summary(result)
    if args.json:
        atomic_write_json(args.json, result)
    return result


def _site_table(cfg) -> dict:
    """Which quantizer each site got (``vitquant.sites``), for the result file."""
    from .recipes import quantizer_table
    return {site: None if q is None else q.to_dict() for site, q in quantizer_table(cfg).items()}


def _write_plots(json_path: str, model, calib, cfg, report, block: Optional[str]) -> list[str]:
    """Nuclear norm per module and bit allocation per module, and (with two-scaled quantizers)
    the activation histograms of one block, as PNG next to the JSON file."""
    from .mixed_precision import nuclear_norms
    from .nn.wrap import quant_modules
    from .plots import plot_bit_allocation, plot_nuclear_norms, plot_two_scale_histograms
    stem = os.path.splitext(json_path)[0]
    mp = report.mixed_precision
    if mp is not None:
        modules = mp["modules"]
        note = f"size {mp['size_mb']:.2f} MB <= budget {mp['budget_mb']:.2f} MB"
    else:
        mods = quant_modules(model)
        nuc = nuclear_norms(model, calib.tensors(), mods, cfg.batch_size)
        modules = [dict(name=m.name, kind=m.kind, nuclear_norm=nuc[m.name], bits=cfg.w_bits) for m in mods]
        note = "single precision"
    title = f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}"
    paths = [plot_nuclear_norms(modules, f"{stem}_nuclear_norm.png", f"{title}: module sensitivity"),
             plot_bit_allocation(modules, f"{stem}_bits.png", f"{title}: bits per module", note)]
    try:
        paths += plot_two_scale_histograms(model, calib.tensors(0, 8), stem, title, block)
    except ValueError as e:
        raise VitquantError(str(e)) from None
    return [str(p) for p in paths]


def _load_saved(path: str):
    from .export import load
    try:
        return load(path)
    except FileNotFoundError as e:
        raise VitquantError(str(e)) from None


def _metadata(model) -> dict:
    """What ``vitquant eval`` needs to preprocess images for an exported model."""
    import json
    return {"vitquant.model": model.vitquant_manifest["model"],
            "vitquant.model_args": json.dumps(model.vitquant_manifest["model_args"])}


def run_export(args) -> dict:
    from .export.onnx import export_onnx, integer_kernels
    from .io import atomic_write_json
    if args.json:
        _check_writable(args.json)
    _check_writable(args.onnx)
    import torch

    from .export.verify import describe
    from .report import environment
    if args.verify_tolerance is not None and not (args.verify_tolerance > 0):
        raise VitquantError(f"--verify-tolerance must be positive, got {args.verify_tolerance}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_saved(args.saved)
    try:
        info = export_onnx(model, args.onnx, fp32=args.fp32, metadata=_metadata(model), verify=not args.no_verify,
                           tolerance=args.verify_tolerance, threads=args.threads, int8=args.int8)
    except (ValueError, NotImplementedError) as e:
        raise VitquantError(f"cannot export: {e}") from None
    info["runtime"] = integer_kernels(args.onnx, None if args.fp32 else model)
    info["environment"] = environment()
    kinds = ", ".join(f"{k} {v}" for k, v in info["runtime"]["integer_ops"].items()) or "none"
    print(f"wrote {args.onnx} ({info['bytes'] / 1e6:.2f} MB, {info['int8_weights']} 8-bit weights, {args.int8} "
          f"int8 storage); "
          f"ONNX Runtime integer kernels: {kinds}; float MatMul/Gemm left: {info['runtime']['float_matmuls']}")
    print(describe(info["check"]) if info["check"] else "export check skipped (--no-verify)")
    _print_fusion(info["runtime"].get("by_quantizer", {}))
    if args.json:
        atomic_write_json(args.json, info)
    return info


def _model_data_config(model_name: str, model_args: dict) -> dict:
    import timm
    from .models import data_config_for
    return data_config_for(timm.create_model(model_name, pretrained=False, **model_args))


def run_eval(args) -> dict:
    import hashlib
    import json

    import torch

    from .data import load_images
    from .evaluate import check_labels, predict_top5, topk_accuracy
    from .io import atomic_write_json
    if args.json:
        _check_writable(args.json)
    from .runtime import init_distributed
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, _ = init_distributed()
    if str(args.model).endswith(".onnx"):
        from .export.onnx import runtime_model
        model = runtime_model(args.model, args.runtime, args.threads)
        if "vitquant.model" not in model.metadata:
            raise VitquantError(f"{args.model} was not exported by vitquant (no model metadata)")
        runtime = args.runtime
        data_config = _model_data_config(model.metadata["vitquant.model"], json.loads(model.metadata["vitquant.model_args"]))
    else:
        if args.runtime != "onnxruntime":
            raise VitquantError(f"--runtime {args.runtime} runs .onnx files; {args.model} is a saved directory "
                                "(PyTorch): export it first")
        from .models import data_config_for
        model = _load_saved(args.model)
        runtime = "pytorch"
        data_config = data_config_for(model)
    evalset = load_images(args.eval_data, data_config, list_file=args.eval_list, labels_file=args.labels,
                          use_cache=not args.no_cache, progress=not args.quiet, require_labels=True,
                          limit=args.num_eval)
    check_labels(evalset.labels, getattr(model, "num_classes", None))
    with torch.no_grad():
        pred = predict_top5(model, evalset, args.batch_size, progress=not args.quiet)
    top1, top5 = topk_accuracy(pred.top5, evalset.labels, pred.num_classes)
    result = {"model": str(args.model), "runtime": runtime, "num_eval": len(evalset), "top1": round(top1, 4),
              "top5": round(top5, 4), "eval_seconds": round(pred.seconds, 3), "eval_data": evalset.describe(),
              "top5_indices_sha256": hashlib.sha256(pred.top5.numpy().tobytes()).hexdigest()}
    if rank != 0:
        return result
    print(f"{args.model} ({runtime}): top-1 {top1:.2f} %, top-5 {top5:.2f} % on {len(evalset)} images "
          f"({pred.seconds:.1f} s)")
    if args.json:
        atomic_write_json(args.json, result | {"top5_indices": pred.top5.tolist()})
    return result


def _bench_model(args):
    """``vitquant bench``'s model: a saved directory as it is, or a timm model name quantized here
    (``--method`` on ``--calib-data``, or seeded Gaussian images: the speed does not depend on them)."""
    if os.path.isdir(args.saved):
        return _load_saved(args.saved), None, None
    if os.path.exists(args.saved):
        raise VitquantError(f"{args.saved} is a file; bench takes a saved directory or a timm model name")
    import torch

    from .api import quantize
    from .models import data_config_for, load_model
    from .recipes import get_recipe
    if args.checkpoint and args.random_init:
        raise VitquantError("--checkpoint and --random-init exclude each other")
    model, info = load_model(args.saved, args.checkpoint, pretrained=not args.random_init, img_size=args.img_size)
    data_config = data_config_for(model)
    if args.calib_data:
        from .data import load_images
        calib = load_images(args.calib_data, data_config, list_file=args.calib_list, progress=not args.quiet)
        if len(calib) < args.num_calib:
            raise VitquantError(f"--num-calib {args.num_calib} but only {len(calib)} readable images in {args.calib_data}")
        calib = calib.subset(args.num_calib)
        source = calib.describe() | {"list": args.calib_list}
        images = calib.tensors()
    else:
        size = data_config["input_size"][1:]
        images = torch.randn(args.num_calib, 3, *size, generator=torch.Generator().manual_seed(0))
        source = {"synthetic": f"{args.num_calib} seeded Gaussian images (timing only)"}
    try:
        cfg = get_recipe(args.method, args.w_bits, args.a_bits)
        if families := _activation_families(args):
            cfg = cfg.replace(**families)
        model, _ = quantize(model, images, cfg, progress=not args.quiet)
    except ValueError as e:
        raise VitquantError(str(e)) from None
    from .export.checkpoint import _model_args
    model.vitquant_manifest = {"model": args.saved, "model_args": _model_args(model)}
    return model, {"method": args.method, "w_bits": args.w_bits, "a_bits": args.a_bits, "weights": info,
                   "calib_data": source, "config": cfg.to_dict()}, images


def run_bench(args) -> list:
    from .export.bench import benchmark_runtimes
    from .io import atomic_write_json
    from .report import environment
    if args.json:
        _check_writable(args.json)
    model, quantized_here, images = _bench_model(args)
    try:
        if args.runtime == "openvino":
            from .export.openvino import require_openvino
            require_openvino()
        rows = benchmark_runtimes(model, args.batch_sizes, warmup=args.warmup, repeats=args.repeats,
                                  threads=args.threads, int8_modes=args.int8, calib_images=images,
                                  openvino={"all": None, "onnxruntime": False, "openvino": True}[args.runtime])
    except (ValueError, NotImplementedError) as e:
        raise VitquantError(f"cannot export: {e}") from None
    env = environment()
    for row in rows:
        row |= {"model": model.vitquant_manifest["model"],
                "saved": None if quantized_here is not None else str(args.saved), "quantized_here": quantized_here,
                "environment": env}
        print(f"batch {row['batch']:3d}: torch FP32 {row['torch_fp32_ips']:.1f} img/s, ONNX FP32 "
              f"{row['onnx_fp32_ips']:.1f}, ONNX INT8 ({row['int8']}) {row['onnx_int8_ips']:.1f} (x{row['int8_speedup']:.2f}"
              f"{'' if row['accelerated'] else ', NOT accelerated: some quantized matmuls run in float'})"
              + "".join(f", INT8 ({m}) {row[f'onnx_int8_{m}_ips']:.1f}" for m in args.int8[1:])
              + f"; ONNX Runtime quantize_static INT8 {row['ort_static_int8_ips']:.1f} (x{row['ort_static_speedup']:.2f})"
              + ("".join(f"; OpenVINO FP32 {row['openvino_fp32_ips']:.1f}" if "openvino_fp32_ips" in row else "")
                 + "".join(f", OpenVINO INT8 ({m}) {row[f'openvino_int8_{m}_ips']:.1f}" for m in args.int8
                           if f"openvino_int8_{m}_ips" in row))
              + (f"; best verified INT8 path: {row['best_int8']} x{row['best_speedup']:.2f} over the best FP32 "
                 f"({row['best_fp32']})" if "best_int8" in row else ""))
    _print_fusion(rows[0]["by_quantizer"] if rows else {})
    if args.json:
        atomic_write_json(args.json, rows)
    return rows


def run_sweep_command(args) -> dict:
    from .io import atomic_write_json
    from .sweep import cell_status, load_spec, resolve_devices, run_sweep, select_cells
    if args.json:
        _check_writable(args.json)
    spec = load_spec(args.spec)
    out = args.out or (str((Path(args.spec).parent / spec.out).resolve()) if spec.out else None)
    if out is None:
        raise VitquantError("no output directory: give --out or 'out:' in the spec")
    devices = resolve_devices(args.devices)
    if args.dry_run:
        chosen = select_cells(spec.cells, args.only)
        for c in chosen:
            print(f"{cell_status(Path(out), c):6s} {c.id}")
        return {"cells": len(chosen)}
    counts = run_sweep(spec, out, devices, timeout=args.cell_timeout, progress=not args.quiet, only=args.only)
    print(f"sweep {spec.name}: {counts['cells']} cells, {counts['skipped_done']} already done, "
          f"{counts['ok']} ran now, {counts['failed']} failed ({counts['retried']} were retries of failed cells); "
          f"results in {out}/cells")
    if args.json:
        atomic_write_json(args.json, counts | {"out": out})
    if args.report and counts["ok"] + counts["skipped_done"]:
        run_report(argparse.Namespace(out=out, quiet=True, json=None))
    if counts["failed"]:
        raise VitquantError(f"{counts['failed']} cells failed (errors in {out}/cells/*.failed.json); "
                            f"rerun the same command to retry them")
    return counts


def run_report(args) -> dict:
    from .io import atomic_write_json
    from .sweep_report import render_report
    if args.json:
        _check_writable(args.json)
    r = render_report(args.out)
    if args.json:
        atomic_write_json(args.json, {k: v for k, v in r.items() if k != "text"})
    if not args.quiet:
        print(r["text"])
    failed = f", {r['failed']} failed cells" if r["failed"] else ""
    print(f"wrote {r['markdown']}, {r['csv']}, {', '.join(r['plots'])} ({r['groups']} result groups{failed})",
          file=sys.stderr)
    return r


def _print_fusion(by_quantizer: dict) -> None:
    """One line per kind of quantized op (op type and input quantizers): how many run as integer kernels."""
    for kind, counts in by_quantizer.items():
        total = counts["integer"] + counts["float"]
        state = "integer kernels" if not counts["float"] else f"{counts['float']} of {total} left in FLOAT"
        print(f"  {kind}: {total} ops, {state}")


def _check_writable(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise VitquantError(f"output directory does not exist: {d}")
    if not os.access(d, os.W_OK):
        raise VitquantError(f"output directory is not writable: {d}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "quantize":
            run_quantize(args)
        elif args.command == "export":
            run_export(args)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "bench":
            run_bench(args)
        elif args.command == "sweep":
            run_sweep_command(args)
        elif args.command == "report":
            run_report(args)
        return 0
    except VitquantError as e:
        print(f"vitquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitquant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. head, which exited
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
