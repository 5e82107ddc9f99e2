"""Methods as recipes: typed, frozen configs that choose quantizers, objective and search.

A recipe never owns a calibration loop; :func:`calibrate_op` is the one per-op step the engine
calls, and everything in it is driven by the config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from .calibration.bias_correction import correct_bias
from .calibration.fpcs import FPCSConfig, calibrate_op_fpcs
from .calibration.objectives import NEEDS_GRAD, OBJECTIVES, RankingPearson
from .calibration.search import OpData, alternating_search
from .calibration.reconstruction import ReconstructionConfig
from .calibration.weight_rounding import RoundingConfig
from .nn.modules import QuantOp, _WeightOp
from .nn.wrap import quant_ops
from .quantizers import Quantizer
from .quantizers.adalog import GELU_SHIFT
from .quantizers.base import percentile_tuple
from .sites import QuantizerSpec, build_from_table, spec


@dataclass(frozen=True)
class SearchConfig:
    """Candidate grid ``D0 * (alpha + i (beta - alpha) / n)``, i < n, searched per operand for
    ``rounds`` alternating rounds with ``objective``."""
    objective: Literal["mse", "cosine", "pearson", "hessian"] = "hessian"
    alpha: float = 0.01
    beta: float = 1.2
    num_candidates: int = 100
    rounds: int = 3
    memory_budget_mb: float = 256.0
    screen_images: int = 8      # two-stage search: score all candidates on this many images ...
    screen_top_k: int = 8       # ... then re-score the k best on all images (0: exhaustive)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if not 0 < self.alpha < self.beta:
            raise ValueError(f"search range needs 0 < alpha < beta, got alpha={self.alpha}, beta={self.beta}")
        if self.num_candidates < 1 or self.rounds < 1:
            raise ValueError("num_candidates and rounds must be >= 1")
        if self.screen_images < 0 or self.screen_top_k < 0:
            raise ValueError("screen_images and screen_top_k must be >= 0")
        if self.memory_budget_mb <= 0:
            raise ValueError("memory budget must be positive")


OMEGA_FORMS = ("paper", "module_output", "output_kl")


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """One bit-width per MSA / MLP module under a model-size budget (Liu et al. 2021, Sec. 3.3).
    Weights and inputs of a module share its bit-width."""
    choices: Optional[tuple[int, ...]] = None  # default: target-2 .. target+2 ({4..8} for 6, {6..10} for 8)
    target_bits: Optional[int] = None          # budget: the model size at this uniform bit-width (default w_bits)
    target_size_mb: Optional[float] = None     # or an explicit budget in MB (1e6 bytes)
    sensitivity: Literal["nuclear", "hessian"] = "nuclear"
    hutchinson_samples: int = 8                # Hessian-trace sensitivity only
    # where the nuclear-norm Omega measures a module's error: "paper" (Eq. 17: attention map of
    # MSA, output feature of MLP) or "module_output" (each module's output into the residual
    # stream, proj / fc2, with the nuclear norm relative to its kind's mean: comparable units) or
    # "output_kl" (KL divergence of the class probabilities with only that module quantized)
    omega: Literal["paper", "module_output", "output_kl"] = "paper"
    # after the allocation, measure the bias correction (Eqs. 13-15) again in the mixed model (each
    # layer's inputs now come from neighbours at other bit-widths); only with bias_correction on
    remeasure_bias: bool = True

    def __post_init__(self):
        if self.sensitivity not in ("nuclear", "hessian"):
            raise ValueError(f"unknown sensitivity {self.sensitivity!r}; choose nuclear or hessian")
        if self.omega not in OMEGA_FORMS:
            raise ValueError(f"unknown omega {self.omega!r}; choose one of {', '.join(OMEGA_FORMS)}")
        if self.choices is not None:
            if not self.choices or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16
                                       for b in self.choices):
                raise ValueError(f"mixed-precision bit choices must be integers in 2..16, got {self.choices!r}")
            object.__setattr__(self, "choices", tuple(sorted(set(self.choices))))
        if self.target_size_mb is not None and self.target_size_mb <= 0:
            raise ValueError("target size must be positive")
        if self.target_bits is not None and not 2 <= self.target_bits <= 16:
            raise ValueError(f"target bits must be in 2..16, got {self.target_bits}")

    def bit_choices(self, target: int) -> tuple[int, ...]:
        if self.choices is not None:
            return self.choices
        return tuple(b for b in range(target - 2, target + 3) if 2 <= b <= 16)

    def calibration_bits(self, w_bits: int) -> list[int]:
        """Every bit-width the model must be calibrated at: the choices, the budget's target
        bit-width and ``w_bits`` (the ops outside the modules)."""
        target = self.target_bits or w_bits
        return sorted(set(self.bit_choices(target)) | {w_bits, target})


@dataclass(frozen=True)
class QuantConfig:
    """Everything that defines a quantization run (recorded verbatim in result files)."""
    method: str = "ptq4vit"
    w_bits: int = 8
    a_bits: int = 8
    search: Optional[SearchConfig] = field(default_factory=SearchConfig)  # None: statistics only
    percentile: Optional[float] = None      # activation interval from this percentile of |x|
    softmax_twin: bool = True               # twin uniform for post-softmax (attn @ v input)
    gelu_twin: bool = True                  # twin uniform for post-GELU (fc2 input)
    per_head_matmul: bool = True            # matmul operands: one scale per head
    per_channel_weights: bool = False       # Linear weights: one scale per output channel
    signed_activations: bool = True         # symmetric signed codes for activations
    unsigned_softmax: bool = False          # plain-uniform post-softmax operand on [0, 2^b - 1]
    softmax_v2sf: bool = False              # TSPTQ-ViT V-2SF for post-softmax (attn @ v input)
    gelu_v2sf: bool = False                 # TSPTQ-ViT V-2SF for post-GELU (fc2 input)
    quantize_layernorm: bool = False        # fully quantized setting: every LayerNorm input too
    layernorm_quantizer: Literal["o2sf", "uniform"] = "o2sf"  # its quantizer (TSPTQ-ViT O-2SF)
    ranking: Optional[RankingPearson] = None  # q @ k^T objective: gamma * ranking loss - Pearson
    bias_correction: bool = False           # fold the mean output error into the bias (Liu et al.)
    mixed_precision: Optional[MixedPrecisionConfig] = None
    sequential: bool = False                # calibrate on quantized inputs instead of FP inputs
    batch_size: int = 4                     # images per forward pass while collecting data
    # -- low-bit building blocks (RepQ-ViT, AdaLog) ----------------------------------------------
    asymmetric: bool = False                # uniform quantizers with a zero point, weights and activations
    mse_percentiles: Optional[tuple[float, ...]] = None  # each range: the percentile among these whose
                                            # quantized operand has the least MSE (RepQ-ViT's initialisation)
    softmax_log: Optional[Literal["log2", "log_sqrt2", "adalog"]] = None  # log-domain post-softmax quantizer
    gelu_log: Optional[Literal["adalog"]] = None  # AdaLog's shifted adaptive-base log quantizer for post-GELU
    fpcs: Optional[FPCSConfig] = None       # AdaLog's search (FPCS) instead of ``search``
    log_zero: Literal["code", "extra"] = "code"  # log quantizer's zero: one of the 2^b codes, or an extra
                                            # state (2^b levels + 0, RepQ-ViT's code; does not fit b bits)
    reparameterize: bool = False            # post-LayerNorm inputs per channel, folded into the LayerNorm
                                            # and the next Linear, deployed per tensor (RepQ-ViT, Sec. 4.1)
    patch_embed_input_bits: Optional[int] = None  # quantize the image itself at this bit-width
    calibration_unit: Literal["block", "op"] = "block"  # "op" with sequential: every op calibrated on
                                            # the outputs of all earlier ops, quantized
    rounding: Optional[RoundingConfig] = None  # a last pass choosing the weight codes (GPTQ / ERQ ridge;
                                            # None: round to nearest)
    reconstruction: Optional[ReconstructionConfig] = None  # block reconstruction after everything else
                                            # (AdaRound, LSQ steps, QDrop; None: off)

    def __post_init__(self):
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 16:
                raise ValueError(f"{name.replace('_', '-')} must be an integer in 2..16, got {v!r}")
        if self.percentile is not None and not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        if self.softmax_v2sf and self.softmax_twin or self.gelu_v2sf and self.gelu_twin:
            raise ValueError("an activation gets either twin uniform or V-2SF quantization, not both; "
                             "turn one off (--softmax-twin off / --gelu-twin off)")
        if self.layernorm_quantizer not in ("o2sf", "uniform"):
            raise ValueError(f"unknown LayerNorm quantizer {self.layernorm_quantizer!r}; choose o2sf or uniform")
        if (self.softmax_v2sf or self.gelu_v2sf) and self.a_bits < 3:
            raise ValueError("V-2SF needs at least 3 activation bits")
        if self.softmax_log is not None:
            if self.softmax_log not in ("log2", "log_sqrt2", "adalog"):
                raise ValueError(f"unknown post-softmax log quantizer {self.softmax_log!r}; choose log2, log_sqrt2 "
                                 "or adalog")
            if self.softmax_twin or self.softmax_v2sf:
                raise ValueError("post-softmax gets one quantizer: turn twin uniform / V-2SF off for a log quantizer")
        if self.gelu_log is not None:
            if self.gelu_log != "adalog":
                raise ValueError(f"unknown post-GELU log quantizer {self.gelu_log!r}; choose adalog")
            if self.gelu_twin or self.gelu_v2sf:
                raise ValueError("post-GELU gets one quantizer: turn twin uniform / V-2SF off for a log quantizer")
        if self.fpcs is not None:
            if self.search is not None:
                raise ValueError("a recipe searches with either the candidate search or FPCS, not both")
            if not self.asymmetric:
                raise ValueError("the FPCS search needs asymmetric uniform quantizers")
            if self.bias_correction or self.mixed_precision is not None or self.quantize_layernorm:
                raise ValueError("the FPCS search cannot be combined with bias correction, mixed precision or "
                                 "quantized LayerNorm inputs")
        if self.log_zero not in ("code", "extra"):
            raise ValueError(f"log_zero must be 'code' or 'extra', got {self.log_zero!r}")
        if self.mse_percentiles is not None:
            object.__setattr__(self, "mse_percentiles", percentile_tuple(self.mse_percentiles, 50))
        if self.patch_embed_input_bits is not None and not (
                isinstance(self.patch_embed_input_bits, int) and 2 <= self.patch_embed_input_bits <= 16):
            raise ValueError(f"patch-embedding input bits must be an integer in 2..16, got {self.patch_embed_input_bits!r}")
        if self.calibration_unit not in ("block", "op"):
            raise ValueError(f"calibration unit must be 'block' or 'op', got {self.calibration_unit!r}")
        if self.reparameterize and self.quantize_layernorm:
            raise ValueError("scale reparameterisation changes the LayerNorm affine; it cannot be combined with "
                             "quantized LayerNorm inputs")
        if self.mixed_precision is not None and (self.reparameterize or self.calibration_unit == "op"):
            raise ValueError("mixed precision cannot be combined with scale reparameterisation or per-op "
                             "sequential calibration")
        if self.mixed_precision is not None and self.w_bits != self.a_bits:
            raise ValueError("mixed precision gives weights and inputs of a module one bit-width; "
                             "use equal --w-bits and --a-bits")

    @property
    def setting(self) -> str:
        """``full`` when LayerNorm inputs are quantized too (TSPTQ-ViT), else ``partial`` (PTQ4ViT)."""
        return "full" if self.quantize_layernorm else "partial"

    @property
    def hessian(self) -> bool:
        return self.search is not None and self.search.objective in NEEDS_GRAD

    def replace(self, **changes) -> "QuantConfig":
        """A copy with fields changed; fields of the search (or FPCS), the ranking objective and mixed
        precision may be given directly (``rounds=5``, ``theta=0.1``, ``sensitivity="hessian"``); a
        field two of them share goes to the one the config has."""
        parts: dict[str, dict] = {f: {} for f in NESTED}
        for k in [k for k in changes if k not in QuantConfig.__dataclass_fields__]:
            owners = [f for f, cls in NESTED.items() if k in cls.__dataclass_fields__]
            if owners:
                present = [f for f in owners if getattr(self, f) is not None]
                parts[(present or owners)[0]][k] = changes.pop(k)
        cfg = dataclasses.replace(self, **changes)
        for f, sub in parts.items():
            if not sub:
                continue
            if getattr(cfg, f) is None:
                what = {"search": "does not search", "ranking": "has no ranking loss",
                        "mixed_precision": "is not mixed-precision", "fpcs": "does not use FPCS",
                        "rounding": "has no weight-rounding pass",
                        "reconstruction": "has no reconstruction pass"}[f]
                raise ValueError(f"method {cfg.method!r} {what}; cannot set {', '.join(sub)}")
            cfg = dataclasses.replace(cfg, **{f: dataclasses.replace(getattr(cfg, f), **sub)})
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"setting": self.setting}


NESTED = {"search": SearchConfig, "ranking": RankingPearson, "mixed_precision": MixedPrecisionConfig,
          "fpcs": FPCSConfig, "rounding": RoundingConfig, "reconstruction": ReconstructionConfig}


def config_from_dict(d: dict) -> QuantConfig:
    """The :class:`QuantConfig` of :meth:`QuantConfig.to_dict` (saved checkpoints, result files)."""
    d = {k: v for k, v in d.items() if k != "setting"}
    for k, cls in NESTED.items():
        if d.get(k) is not None:
            sub = dict(d[k])
            for tuple_field, value in list(sub.items()):  # JSON gives lists for the tuple fields
                if isinstance(value, list):
                    sub[tuple_field] = tuple(value)
            d[k] = cls(**sub)
    if d.get("mse_percentiles") is not None:
        d["mse_percentiles"] = tuple(d["mse_percentiles"])
    return QuantConfig(**d)


# --------------------------------------------------------------------------------------------
# Recipes


def minmax(w_bits: int = 8, a_bits: int = 8) -> QuantConfig:
    """Interval from the maximum of |x| on the calibration set; no search."""
    return QuantConfig("minmax", w_bits, a_bits, search=None, softmax_twin=False, gelu_twin=False,
                       per_head_matmul=False)


def percentile(w_bits: int = 8, a_bits: int = 8, q: float = 99.99) -> QuantConfig:
    """Activation interval from the ``q``-th percentile of |x|, weights from their maximum."""
    return QuantConfig("percentile", w_bits, a_bits, search=None, percentile=q, softmax_twin=False,
                       gelu_twin=False, per_head_matmul=False)


def base(w_bits: int = 8, a_bits: int = 8) -> QuantConfig:
    """BasePTQ: PTQ4ViT's search with plain uniform quantizers, cosine distance, alpha 0.5,
    beta 1.2, one round."""
    return QuantConfig("base", w_bits, a_bits,
                       search=SearchConfig(objective="cosine", alpha=0.5, beta=1.2, rounds=1),
                       softmax_twin=False, gelu_twin=False)


def ptq4vit(w_bits: int = 8, a_bits: int = 8) -> QuantConfig:
    """PTQ4ViT: twin uniform (softmax, GELU) and Hessian-guided search, alpha 0.01, beta 1.2,
    100 candidates, 3 rounds."""
    return QuantConfig("ptq4vit", w_bits, a_bits, search=SearchConfig(objective="hessian"))


def liu2021(w_bits: int = 8, a_bits: int = 8) -> QuantConfig:
    """Liu et al. 2021: Pearson similarity (Eq. 12), ranking loss on q @ k^T (Eqs. 10-11),
    alternating search over [0.5 D, 1.2 D] with 100 candidates until no interval changes or 20
    iterations, bias correction after each iteration (Eqs. 13-15); plain uniform quantizers, one
    interval per tensor (W^Q, W^K, W^V separately). Mixed precision is added with
    ``mixed_precision=MixedPrecisionConfig()`` (CLI ``--mixed-precision``)."""
    return QuantConfig("liu2021", w_bits, a_bits,
                       search=SearchConfig(objective="pearson", alpha=0.5, beta=1.2, rounds=20),
                       softmax_twin=False, gelu_twin=False, per_head_matmul=False, unsigned_softmax=True,
                       ranking=RankingPearson(), bias_correction=True)


def repq(w_bits: int = 4, a_bits: int = 4) -> QuantConfig:
    """RepQ-ViT (Li et al. 2023), as its reference code: asymmetric uniform quantizers whose ranges
    are the 99.9 / 99.99 / 99.999th percentile of least MSE; weights per output channel (head and
    patch embedding included, at ``w_bits``); the image at 8 bits; post-LayerNorm activations per
    channel, reparameterised to per tensor (Sec. 4.1); post-softmax log-sqrt2 (Sec. 4.2); every other
    activation per tensor; each op calibrated once, in order, on the outputs of the quantized model
    before it, on one batch of the calibration images; no search."""
    return QuantConfig("repq", w_bits, a_bits, search=None, softmax_twin=False, gelu_twin=False,
                       per_head_matmul=False, per_channel_weights=True, asymmetric=True,
                       mse_percentiles=(99.9, 99.99, 99.999), softmax_log="log_sqrt2", log_zero="extra",
                       reparameterize=True, patch_embed_input_bits=8, sequential=True, calibration_unit="op",
                       batch_size=32)


def adalog(w_bits: int = 4, a_bits: int = 4) -> QuantConfig:
    """AdaLog (Wu et al., ECCV 2024), calibration only, as its reference code: asymmetric uniform
    quantizers searched by FPCS (``calibration.fpcs``) on the layer-output error, weights per output
    channel (head and patch embedding included), per-head q / k / v; AdaLog's adaptive-base log
    quantizer for post-softmax (range 1) and its shifted version for post-GELU; post-LayerNorm inputs
    per channel, reparameterised to per tensor and searched again (with ``w_bits == a_bits``, as its
    code); the image not quantized (its code leaves an 8-bit conv input in FP32); every op calibrated
    on the FP model's inputs and outputs, 32 images."""
    return QuantConfig("adalog", w_bits, a_bits, search=None, fpcs=FPCSConfig(), softmax_twin=False,
                       gelu_twin=False, per_head_matmul=True, per_channel_weights=True, asymmetric=True,
                       softmax_log="adalog", gelu_log="adalog", reparameterize=w_bits == a_bits,
                       sequential=False, batch_size=32)


def vitq(w_bits: int = 4, a_bits: int = 4) -> QuantConfig:
    """vitquant's flagship, calibration only. Today its defaults, chosen on calibration-split images
    33-128 (README, "Flagship recipe"), are AdaLog's pipeline (:func:`adalog`): the GPTQ weight
    rounding pass (``rounding=RoundingConfig()``, CLI ``--rounding gptq``) lowered W4A4 there and is
    opt-in; the recipe is where parts that help on held-out images are added."""
    return dataclasses.replace(adalog(w_bits, a_bits), method="vitq")


def tsptq(w_bits: int = 8, a_bits: int = 8) -> QuantConfig:
    """TSPTQ-ViT: PTQ4ViT's Hessian-guided search with two-scaled factors, V-2SF for post-softmax
    and post-GELU, and the fully quantized setting: every LayerNorm input quantized with O-2SF."""
    return QuantConfig("tsptq", w_bits, a_bits, search=SearchConfig(objective="hessian"), softmax_twin=False,
                       gelu_twin=False, softmax_v2sf=True, gelu_v2sf=True, quantize_layernorm=True)


RECIPES = {"minmax": minmax, "percentile": percentile, "base": base, "ptq4vit": ptq4vit, "liu2021": liu2021,
           "tsptq": tsptq, "repq": repq, "adalog": adalog, "vitq": vitq}


# One name per post-softmax / post-GELU quantizer family and the config fields that select it
# (CLI ``--softmax-quantizer`` / ``--gelu-quantizer``; :func:`activation_quantizer`).
ACTIVATION_QUANTIZERS = {
    "softmax": {"uniform": {}, "twin": {"softmax_twin": True}, "v2sf": {"softmax_v2sf": True},
                "log2": {"softmax_log": "log2"}, "log_sqrt2": {"softmax_log": "log_sqrt2"},
                "adalog": {"softmax_log": "adalog"}},
    "gelu": {"uniform": {}, "twin": {"gelu_twin": True}, "v2sf": {"gelu_v2sf": True},
             "adalog": {"gelu_log": "adalog"}},
}


def activation_quantizer(site: str, name: str) -> dict:
    """The config overrides that give ``site`` ("softmax" or "gelu") the quantizer family ``name``
    and switch the other families of that site off."""
    if site not in ACTIVATION_QUANTIZERS:
        raise ValueError(f"unknown activation site {site!r}; choose softmax or gelu")
    families = ACTIVATION_QUANTIZERS[site]
    if name not in families:
        raise ValueError(f"unknown post-{site} quantizer {name!r}; choose {', '.join(families)}")
    off = {f"{site}_twin": False, f"{site}_v2sf": False, f"{site}_log": None}
    return off | families[name]


def get_recipe(method: str, w_bits: int = 8, a_bits: int = 8, **overrides) -> QuantConfig:
    """The config of ``method`` at the given bit-widths, with field overrides (ablations)."""
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(RECIPES)}")
    cfg = RECIPES[method](w_bits, a_bits)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------
# Quantizer choice per site (what is quantized: the PTQ4ViT setting, see README and vitquant.sites)


def quantizer_table(cfg: QuantConfig) -> dict[str, Optional[QuantizerSpec]]:
    """The config's table "site -> quantizer spec" (None: the site stays FP32)."""
    if cfg.asymmetric:
        act = dict(symmetric=False, percentile=cfg.percentile)
        weight = dict(symmetric=False)
    else:
        act = dict(signed=cfg.signed_activations, percentile=cfg.percentile)
        weight = {}
    if cfg.mse_percentiles is not None:
        act["mse_percentiles"] = weight["mse_percentiles"] = cfg.mse_percentiles
    per_head = "head" if cfg.per_head_matmul else "tensor"
    if cfg.gelu_log == "adalog":
        post_gelu = spec("adalog", shift=GELU_SHIFT)
    elif cfg.gelu_twin:
        post_gelu = spec("twin_gelu")
    elif cfg.gelu_v2sf:
        post_gelu = spec("v2sf", signed=True)
    else:
        post_gelu = spec("uniform", **act)
    if cfg.softmax_twin:
        post_softmax = spec("twin_softmax")
    elif cfg.softmax_v2sf:
        post_softmax = spec("v2sf", "a", per_head)
    elif cfg.softmax_log == "adalog":
        post_softmax = spec("adalog", "a", "tensor", fixed_range=True)
    elif cfg.softmax_log is not None:
        log = dict(per_octave=1 if cfg.softmax_log == "log2" else 2, zero=cfg.log_zero)
        if cfg.mse_percentiles is not None:
            log["mse_percentiles"] = cfg.mse_percentiles
        post_softmax = spec("log", "a", per_head, **log)
    elif cfg.unsigned_softmax:
        post_softmax = spec("uniform", "a", per_head, signed=False, percentile=cfg.percentile)
    else:
        post_softmax = spec("uniform", "a", per_head, **act)
    layernorm = None
    if cfg.quantize_layernorm:
        layernorm = spec("o2sf") if cfg.layernorm_quantizer == "o2sf" else spec("uniform", **act)
    linear_input = spec("uniform", **act)
    channel = "channel" if cfg.per_channel_weights else "tensor"
    return {
        "patch_embed.weight": spec("uniform", "w", "channel", **weight),
        "patch_embed.input": (None if cfg.patch_embed_input_bits is None
                              else spec("uniform", cfg.patch_embed_input_bits, **act)),
        "qkv.weight": spec("uniform", "w", "channel" if cfg.per_channel_weights else "qkv", **weight),
        "linear.weight": spec("uniform", "w", channel, **weight),
        # reparameterisation: calibrated per channel, folded to per tensor afterwards (passes.reparam)
        "post_layernorm": spec("uniform", "a", "in_channel", **act) if cfg.reparameterize else linear_input,
        "linear.input": linear_input, "post_gelu": post_gelu,
        "q": spec("uniform", "a", per_head, **act), "k": spec("uniform", "a", per_head, **act),
        "post_softmax": post_softmax, "v": spec("uniform", "a", per_head, **act),
        "layernorm.input": layernorm,
    }


def build_quantizers(op: QuantOp, cfg: QuantConfig) -> dict[str, Optional[Quantizer]]:
    """The quantizers ``cfg`` gives ``op``'s operands (through :func:`quantizer_table`)."""
    return build_from_table(op, quantizer_table(cfg), cfg.w_bits, cfg.a_bits)


def attach_quantizers(model, cfg: QuantConfig) -> None:
    """Give every quantized op of a wrapped model the quantizers ``cfg`` chooses."""
    for _, op in quant_ops(model):
        for operand, q in build_quantizers(op, cfg).items():
            op.set_quantizer(operand, q)
        if isinstance(op, _WeightOp):
            op.bias_correction = None  # belongs to the quantizers it was measured with
            op.set_rounded_weight(None)


def calibrate_op(cfg: QuantConfig):
    """The per-op calibration step of this config: initialise every quantizer from its data,
    then (if the recipe searches) run the alternating candidate search."""
    if cfg.fpcs is not None:
        return calibrate_op_fpcs(cfg.fpcs)

    def step(name: str, op: QuantOp, data: OpData) -> dict:
        for operand, q in op.quantizers().items():
            q.set_scale(q.initial_scale(data.operand(op, operand)))
        op.refresh()
        info: dict = {}
        correct = None
        if cfg.bias_correction and isinstance(op, _WeightOp) and op.weight_quantizer is not None:
            def correct():  # report the error before the first and after the last correction
                r = correct_bias(op, data)
                bc = info.setdefault("bias_correction", {"error_before": r["error_before"], "corrections": 0})
                bc["error_after"] = r["error_after"]
                bc["corrections"] += 1
        if cfg.search is not None:
            s = cfg.search
            objective = cfg.ranking if (cfg.ranking is not None and op.role == "matmul_qk") else s.objective
            r = alternating_search(op, data, objective, s.alpha, s.beta, s.num_candidates, s.rounds,
                                   s.memory_budget_mb, s.screen_images, s.screen_top_k, after_round=correct)
            info.update(rounds=r.rounds_run, searches=r.searches_run, skipped=r.searches_skipped,
                        distance=r.best_distance)
        elif correct is not None:
            correct()
        return info
    return step
