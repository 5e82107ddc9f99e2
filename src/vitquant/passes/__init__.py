"""Model passes of a recipe pipeline that act on the model itself (transforms)."""
from .reparam import (channel_factors, fold_channel_factors, minmax_grid, post_layernorm_pairs, reparameterize,
                      reparameterize_calibrated)

__all__ = ["channel_factors", "fold_channel_factors", "minmax_grid", "post_layernorm_pairs", "reparameterize",
           "reparameterize_calibrated"]
