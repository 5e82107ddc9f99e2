"""Model passes of a recipe pipeline that act on the model itself (transforms)."""
from .reparam import channel_factors, fold_channel_factors, post_layernorm_pairs, reparameterize

__all__ = ["channel_factors", "fold_channel_factors", "post_layernorm_pairs", "reparameterize"]
