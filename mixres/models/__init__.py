"""Quadformer models: timm ViTs on mixed-resolution mosaics, registered with timm (``quadformer_vit_*``), the
uniform-grid baseline of the same ViT (:class:`UniformGrid`), and models by name with weights from a file
(:func:`create_model`)."""
from .factory import create_model, load_weights, read_state_dict
from .position import POS_EMBEDS, LearnedXYEmbed, leaf_table_embed, sincos_xy_embed
from .quadformer import Quadformer
from .registry import create_quadformer
from .uniform import UniformGrid, grid_for_budget

__all__ = ["Quadformer", "create_quadformer", "create_model", "load_weights", "read_state_dict", "UniformGrid",
           "grid_for_budget", "POS_EMBEDS", "LearnedXYEmbed", "leaf_table_embed", "sincos_xy_embed"]
