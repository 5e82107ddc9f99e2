"""vitquant: post-training quantization of vision transformers (PTQ4ViT, Liu et al. 2021, TSPTQ-ViT, baselines)."""
__version__ = "0.1.0"

from .api import quantize  # noqa: E402
from .errors import VitquantError  # noqa: E402
from .export import load, save  # noqa: E402
from .nn import quant_ops, quantization_disabled, wrap_model  # noqa: E402
from .recipes import RECIPES, QuantConfig, SearchConfig, get_recipe  # noqa: E402

__all__ = ["quantize", "QuantConfig", "SearchConfig", "RECIPES", "get_recipe", "wrap_model", "quant_ops",
           "quantization_disabled", "VitquantError", "save", "load", "__version__"]
