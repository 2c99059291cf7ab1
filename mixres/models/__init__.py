"""Quadformer models: timm ViTs on mixed-resolution mosaics, registered with timm (``quadformer_vit_*``)."""
from .position import LearnedXYEmbed, leaf_table_embed, sincos_xy_embed
from .quadformer import POS_EMBEDS, Quadformer
from .registry import create_quadformer

__all__ = ["Quadformer", "create_quadformer", "POS_EMBEDS", "LearnedXYEmbed", "leaf_table_embed",
           "sincos_xy_embed"]
