"""The command line's options: one parser for ``vitquant`` and its subcommands, and the option
types that validate values (one error line each). ``vitquant.cli`` runs the commands; sweeps
(``vitquant.sweep``) read the ``quantize`` options from here to check a spec's options before
anything runs."""
from __future__ import annotations

import argparse


def _bits(v: str) -> int:
    try:
        b = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bit-width must be an integer in 2..16, got {v!r}") from None
    if not 2 <= b <= 16:
        raise argparse.ArgumentTypeError(f"bit-width must be in 2..16, got {b}")
    return b


def _positive(kind):
    """argparse type: a positive ``kind`` (int or float) with a one-line error otherwise."""
    def parse(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {v!r}") from None
        if not x > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {x}")
        return x
    parse.__name__ = f"positive {kind.__name__}"
    return parse


_positive_int, _positive_float = _positive(int), _positive(float)


def _on_off(v: str) -> bool:
    v = v.lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {v!r}")


def _add_activation_families(group) -> None:
    """``--softmax-quantizer`` / ``--gelu-quantizer`` (``recipes.ACTIVATION_QUANTIZERS``), for quantize and bench."""
    from .recipes import ACTIVATION_QUANTIZERS
    for site, name in (("softmax", "softmax"), ("gelu", "GELU")):
        group.add_argument(f"--{site}-quantizer", choices=list(ACTIVATION_QUANTIZERS[site]),
                           help=f"post-{name} quantizer family instead of the recipe's (uniform: integer kernels)")


def _bit_list(v: str) -> tuple[int, ...]:
    try:
        bits = tuple(_bits(b.strip()) for b in v.split(",") if b.strip())
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"bit choices: {e}") from None
    if not bits:
        raise argparse.ArgumentTypeError(f"bit choices: expected comma-separated bit-widths, got {v!r}")
    return bits


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too; keep it short)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .recipes import RECIPES
    p = _Parser(prog="vitquant", description="Post-training quantization of vision transformers.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    q = sub.add_parser("quantize", help="quantize a timm model and evaluate it against FP32",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224")
    q.add_argument("--method", default="ptq4vit", choices=sorted(RECIPES), help="quantization recipe")
    q.add_argument("--w-bits", type=_bits, default=8, help="weight bit-width (2..16)")
    q.add_argument("--a-bits", type=_bits, default=8, help="activation bit-width (2..16)")
    g = q.add_argument_group("model")
    g.add_argument("--checkpoint", help="local state dict (.safetensors or torch) instead of the hub")
    g.add_argument("--random-init", action="store_true", help="random weights (functional tests, timing)")
    g.add_argument("--img-size", type=_positive_int, help="input resolution (timm img_size)")
    d = q.add_argument_group("data (default: the public ImageNet sample, see README)")
    d.add_argument("--calib-data", help="calibration image folder (labels not needed)")
    d.add_argument("--calib-list", help="file naming the calibration images to use, in order")
    d.add_argument("--num-calib", type=_positive_int, default=32, help="number of calibration images")
    d.add_argument("--eval-data", help="evaluation image folder")
    d.add_argument("--eval-list", help="file naming the evaluation images")
    d.add_argument("--labels", help="labels file for a flat evaluation folder: '<file> <index or wnid>' lines")
    d.add_argument("--num-eval", type=_positive_int, help="evaluate on the first N evaluation images only")
    d.add_argument("--no-eval", action="store_true",
                   help="calibrate only (e.g. with --save): no evaluation data is read, no accuracy reported")
    d.add_argument("--no-cache", action="store_true", help="do not cache decoded images")
    a = q.add_argument_group("method switches (ablations; default: the recipe's own)")
    a.add_argument("--hessian", type=_on_off, metavar="on|off",
                   help="Hessian-guided objective (off: cosine distance)")
    a.add_argument("--softmax-twin", type=_on_off, metavar="on|off", help="twin uniform for post-softmax")
    a.add_argument("--gelu-twin", type=_on_off, metavar="on|off", help="twin uniform for post-GELU")
    _add_activation_families(a)
    a.add_argument("--objective", choices=["mse", "cosine", "pearson", "hessian"], help="search objective")
    a.add_argument("--search-rounds", type=_positive_int, help="alternating search rounds")
    a.add_argument("--num-candidates", type=_positive_int, help="candidates per search")
    a.add_argument("--alpha", type=_positive_float, help="candidate range start (x D0)")
    a.add_argument("--beta", type=_positive_float, help="candidate range end (x D0)")
    a.add_argument("--screen-images", type=int, metavar="N",
                   help="two-stage search: score all candidates on N images first (0: exhaustive search)")
    a.add_argument("--screen-top-k", type=_positive_int, metavar="K", help="candidates re-scored on all images")
    a.add_argument("--percentile", type=_positive_float, help="activation percentile (percentile method)")
    a.add_argument("--per-channel-weights", action="store_true", help="one weight scale per output channel")
    a.add_argument("--sequential", action="store_true", help="calibrate on quantized inputs (default: FP inputs)")
    lq = q.add_argument_group("Liu et al. 2021 (liu2021; the switches apply to any recipe)")
    lq.add_argument("--ranking", type=_on_off, metavar="on|off", help="ranking loss on q@k^T (Eqs. 10-11)")
    lq.add_argument("--no-ranking", dest="ranking", action="store_false", help="same as --ranking off")
    lq.add_argument("--ranking-theta", type=float, metavar="THETA", help="hinge margin theta of the ranking loss")
    lq.add_argument("--ranking-gamma", type=_positive_float, metavar="GAMMA", help="weight gamma of the ranking loss")
    lq.add_argument("--ranking-pairs", type=_positive_int, metavar="P",
                    help="key pairs per attention row (all pairs when fewer; else a fixed seeded sample)")
    lq.add_argument("--bias-correction", type=_on_off, metavar="on|off", help="bias correction (Eqs. 13-15)")
    lq.add_argument("--no-bias-correction", dest="bias_correction", action="store_false",
                    help="same as --bias-correction off")
    lq.add_argument("--mixed-precision", action="store_true",
                    help="one bit-width per MSA / MLP module under the size budget (Sec. 3.3)")
    lq.add_argument("--bit-choices", type=_bit_list, metavar="B,B,...",
                    help="mixed-precision candidates (default: target-2..target+2)")
    lq.add_argument("--target-bits", type=_bits, help="size budget: the model at this uniform bit-width (default --w-bits)")
    lq.add_argument("--target-size-mb", type=_positive_float, help="size budget in MB (1e6 bytes)")
    lq.add_argument("--sensitivity", choices=["nuclear", "hessian"],
                    help="mixed-precision sensitivity: nuclear norm (paper) or Hessian trace (HAWQ-v2)")
    lq.add_argument("--omega", choices=["paper", "module_output", "output_kl"],
                    help="mixed-precision Omega: attention map / MLP feature as Eq. 17 (paper), every module's "
                         "output into the residual stream with the nuclear norm relative to its kind "
                         "(module_output), or the KL divergence of the class probabilities (output_kl). Default "
                         "paper (faithful); output_kl measured better on DeiT-Tiny W6A6 (README, Results)")
    lq.add_argument("--remeasure-bias", type=_on_off, metavar="on|off",
                    help="after the mixed-precision allocation, measure the bias correction again in the mixed "
                         "model (default on; needs bias correction)")
    lq.add_argument("--plots", action="store_true",
                    help="write PNG plots next to the --json file: nuclear norms and bit allocation; with "
                         "two-scaled quantizers also activation histograms with both scales' ranges")
    tq = q.add_argument_group("TSPTQ-ViT (tsptq; the switches apply to any recipe)")
    tq.add_argument("--quantize-layernorm", type=_on_off, nargs="?", const=True, metavar="on|off",
                    help="fully quantized setting: quantize every LayerNorm input too (tsptq: on)")
    tq.add_argument("--layernorm-quantizer", choices=["o2sf", "uniform"],
                    help="quantizer of the LayerNorm inputs: O-2SF two-scaled (default) or per-tensor uniform")
    tq.add_argument("--softmax-v2sf", type=_on_off, metavar="on|off", help="V-2SF for post-softmax (tsptq: on)")
    tq.add_argument("--gelu-v2sf", type=_on_off, metavar="on|off", help="V-2SF for post-GELU (tsptq: on)")
    tq.add_argument("--plot-block", metavar="NAME",
                    help="block shown in the --plots activation histograms, e.g. blocks.6 (default: the middle one)")
    wr = q.add_argument_group("weight rounding (GPTQ / ERQ ridge; the switches apply to any recipe)")
    wr.add_argument("--rounding", choices=["gptq", "nearest", "off"],
                    help="weight-rounding pass after calibration: GPTQ column-wise rounding, nearest with the "
                         "ridge step / bias refit only, or off (default: the recipe's own)")
    wr.add_argument("--ridge", type=_positive_float, metavar="LAMBDA",
                    help="ERQ ridge step before rounding, relative strength (x mean input variance)")
    wr.add_argument("--gptq-damp", type=_positive_float, metavar="D", help="GPTQ damping (x mean Hessian diagonal)")
    wr.add_argument("--act-order", type=_on_off, metavar="on|off", help="GPTQ columns in decreasing input energy")
    rc = q.add_argument_group("block reconstruction (AdaRound weights, LSQ steps, QDrop; after any recipe)")
    rc.add_argument("--reconstruct", action="store_true",
                    help="learn each block's weight rounding and activation steps on the calibration images "
                         "after calibration")
    rc.add_argument("--recon-iters", type=_positive_int, metavar="N",
                    help="iterations per block; unset: 200 on CPU, 2000 on CUDA")
    rc.add_argument("--recon-batch-size", type=_positive_int, metavar="N", help="images per iteration; unset: 16 on CPU, 32 on CUDA")
    rc.add_argument("--recon-images", type=_positive_int, metavar="N",
                    help="reconstruct on N images of the calibration pool (unset: the --num-calib calibration "
                         "images; with --calib-seed a superset of them)")
    rc.add_argument("--recon-loss", choices=["mse", "fisher"],
                    help="block output error, or weighted by the squared FP output gradients; unset: mse")
    rc.add_argument("--qdrop", type=float, metavar="P",
                    help="QDrop: leave each activation in FP with probability P while learning; unset: 0.5; 0: off")
    rc.add_argument("--recon-lr-round", type=_positive_float, metavar="LR", help="AdaRound learning rate; unset: 1e-2")
    rc.add_argument("--recon-lr-step", type=_positive_float, metavar="LR", help="LSQ step learning rate (on log step); unset: 1e-3")
    rc.add_argument("--recon-round-weight", type=float, metavar="L",
                    help="AdaRound regulariser weight lambda; unset: 0.01")
    rc.add_argument("--recon-learn-steps", type=_on_off, metavar="on|off", help="learn the uniform activation steps; unset: on")
    rc.add_argument("--recon-keep-better", type=_on_off, metavar="on|off",
                    help="a unit that learning made worse keeps its calibrated rounding and steps; unset: on")
    r = q.add_argument_group("run")
    r.add_argument("--search-memory-mb", type=_positive_float, help="memory budget of one candidate chunk (MB)")
    r.add_argument("--batch-size", type=_positive_int, default=64, help="evaluation batch size")
    r.add_argument("--seed", type=int, default=0, help="random seed")
    r.add_argument("--calib-seed", type=int, metavar="S",
                   help="draw the --num-calib calibration images at random (seeded) from the calibration pool "
                        "instead of taking the first ones")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    r.add_argument("--threads", type=_positive_int, help="CPU threads (torch.set_num_threads)")
    r.add_argument("--no-fused-kernels", action="store_true",
                   help="simulate quantization with eager PyTorch ops instead of torch.compile-fused kernels")
    r.add_argument("--json", help="write the result as one JSON object to this file")
    r.add_argument("--save", metavar="DIR", help="save the quantized model (integer weights, all quantizer "
                                                  "parameters, manifest) to this new directory; load with vitquant.load")
    r.add_argument("--max-memory", type=_positive_float, metavar="GB",
                   help="RAM budget of calibration: collected activations go to disk-backed memory maps when "
                        "they would not fit, and candidate chunks shrink to an eighth of it")
    r.add_argument("--work-dir", metavar="DIR",
                   help="save calibration progress here after every block; rerunning the same command resumes "
                        "from the last finished block (a changed model, config or data refuses the directory)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    e = sub.add_parser("export", help="export a saved quantized model to ONNX (QDQ, int8 integer kernels)")
    e.add_argument("saved", help="directory written by quantize --save")
    e.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx file")
    e.add_argument("--fp32", action="store_true",
                   help="export the FP32 graph instead (quantization off, dequantized weights)")
    e.add_argument("--int8", choices=["exact", "fast"], default="exact",
                   help="how 8-bit codes are stored: exact (default) = uint8, u8 x u8 integer kernels, exact on every "
                        "x86 CPU; fast = signed codes int8, u8 x s8 kernels, faster with VNNI but wrong on AVX2-only "
                        "CPUs (saturating 16-bit sums)")
    e.add_argument("--no-verify", action="store_true",
                   help="skip the export check (by default the graph runs in ONNX Runtime on the checkpoint's "
                        "calibration sample, or seeded random inputs, and must match the simulated model within "
                        "the measured rounding-noise floor; otherwise nothing is written)")
    e.add_argument("--verify-tolerance", type=float, default=None, metavar="X",
                   help="allowed max |logit difference| as a multiple of the noise floor (default 4)")
    e.add_argument("--threads", type=_positive_int, help="CPU threads")
    e.add_argument("--json", help="write the export summary as JSON")
    v = sub.add_parser("eval", help="evaluate a saved model (PyTorch) or an exported .onnx (ONNX Runtime, CPU)")
    v.add_argument("model", help="directory written by quantize --save, or a .onnx file from vitquant export")
    v.add_argument("--eval-data", required=True, help="evaluation image folder")
    v.add_argument("--eval-list", help="file naming the evaluation images")
    v.add_argument("--labels", help="labels file for a flat evaluation folder")
    v.add_argument("--num-eval", type=_positive_int, help="first N evaluation images only")
    v.add_argument("--batch-size", type=_positive_int, default=64)
    v.add_argument("--threads", type=_positive_int, help="CPU threads")
    v.add_argument("--no-cache", action="store_true", help="do not cache decoded images")
    v.add_argument("--json", help="write the result as JSON")
    v.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="runtime of a .onnx file (default onnxruntime; openvino needs pip install 'vitquant[openvino]')")
    v.add_argument("--quiet", action="store_true")
    b = sub.add_parser("bench", help="throughput (images/s): PyTorch FP32 vs ONNX Runtime and OpenVINO, FP32 vs INT8")
    b.add_argument("saved", metavar="MODEL|DIR",
                   help="directory written by quantize --save, or a timm model name, quantized here with "
                        "--method / --w-bits / --a-bits on --calib-data (default: synthetic images, for timing only)")
    bq = b.add_argument_group("quantize a model by name first (ignored for a saved directory)")
    bq.add_argument("--method", default="ptq4vit", choices=sorted(RECIPES), help="recipe (default ptq4vit)")
    bq.add_argument("--w-bits", type=_bits, default=8, help="weight bit-width (default 8)")
    bq.add_argument("--a-bits", type=_bits, default=8, help="activation bit-width (default 8)")
    bq.add_argument("--checkpoint", help="local state dict instead of the hub")
    bq.add_argument("--random-init", action="store_true", help="random weights")
    bq.add_argument("--img-size", type=_positive_int, help="input resolution (timm img_size)")
    bq.add_argument("--calib-data", help="calibration image folder (default: seeded Gaussian images)")
    bq.add_argument("--calib-list", help="file naming the calibration images")
    bq.add_argument("--num-calib", type=_positive_int, default=8, help="calibration images (default 8)")
    _add_activation_families(bq)
    bq.add_argument("--quiet", action="store_true")
    b.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 32])
    b.add_argument("--warmup", type=_positive_int, default=3, help="untimed runs per batch size and runtime")
    b.add_argument("--repeats", type=_positive_int, default=10, help="timed runs (the median is reported)")
    b.add_argument("--threads", type=_positive_int, help="CPU threads for every runtime")
    b.add_argument("--int8", choices=["exact", "fast"], nargs="+", default=["exact"],
                   help="int8 storage modes to time side by side (see export --int8); the first is onnx_int8")
    b.add_argument("--runtime", choices=["all", "onnxruntime", "openvino"], default="all",
                   help="runtimes besides PyTorch: all (default: ONNX Runtime, and OpenVINO when installed), "
                        "onnxruntime only, or openvino (an error when it is not installed; ONNX Runtime still runs)")
    b.add_argument("--json", help="write one object per batch size as a JSON list")
    sw = sub.add_parser("sweep", help="run a grid of models x methods x bit-widths x calibration sizes x seeds "
                                      "(resumable; one process per cell)")
    sw.add_argument("spec", help="sweep spec (YAML); examples in specs/")
    sw.add_argument("--out", help="output directory (default: the spec's 'out', relative to the spec file)")
    sw.add_argument("--devices", nargs="+", default=["cpu"],
                    help="where cells run, one process per entry at a time: cpu, cuda:0, cuda:1, ..., or "
                         "cuda for every visible GPU (repeat cpu to run CPU cells in parallel)")
    sw.add_argument("--cell-timeout", type=_positive_float, help="seconds before a cell is stopped and failed")
    sw.add_argument("--only", nargs="+", metavar="GLOB",
                    help="run only the cells whose id matches one of these globs, e.g. 'deit_tiny__vitq__w4a4__*'")
    sw.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    sw.add_argument("--report", action="store_true", help="render the report when the sweep is done")
    sw.add_argument("--json", help="write the run's counts as JSON")
    sw.add_argument("--quiet", action="store_true")
    rp = sub.add_parser("report", help="Markdown / CSV tables and PNG plots of a sweep's results")
    rp.add_argument("out", help="sweep output directory")
    rp.add_argument("--json", help="write what was written (files, counts) as JSON")
    rp.add_argument("--quiet", action="store_true", help="do not print the Markdown")
    return p
