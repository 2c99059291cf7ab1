"""A timm ViT on padded mosaics: the pieces that keep padding from changing any real token's output.

A padded :class:`mixres.Mosaic` holds ``lengths[b] <= N`` valid leaves per image, first, then padding
(``mosaic.valid [B, N]``). In the ViT, padding tokens enter the blocks as zeros, no token attends to them (a
key-padding mask; prefix tokens, class and register, are always valid), and pooling reads valid tokens only. Their
own outputs are finite and meaningless. So image b's logits are those it has when it runs alone at its own length.

Each function is small and separate so that other layouts (packed sequences) can take what they share.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..mosaic import Mosaic

__all__ = ["neutral_padding", "zero_padding", "with_prefix", "attention_mask", "masked_pool",
           "run_blocks", "pool_valid_tokens", "check_pooling_for_padding", "check_blocks_for_padding", "MASKED_POOLS"]

# The reductions over tokens that masked_pool computes (timm's global_pool names).
MASKED_POOLS = ("avg", "max", "avgmax")


def neutral_padding(mosaic: Mosaic) -> Mosaic:
    """The mosaic with each padding leaf replaced by the first s_min cell's leaf: box (0, 0, min_patch_size), centre
    (0, 0). Position embeddings read boxes and centres as leaves (a box of size 0 would divide by zero); these
    stand-ins give finite positions whatever the padding holds, and their tokens are zeroed after embedding
    (:func:`zero_padding`). Tokens are left as they are. An unpadded mosaic is returned as it is.

    Boxes ``[B, N, 3]`` and centres ``[B, N, 2]`` keep their dtypes; no host synchronisation.
    """
    if not mosaic.is_padded:
        return mosaic
    padding = ~mosaic.valid.unsqueeze(-1)
    boxes = mosaic.boxes
    # Made on the device rather than copied from a Python list: a copy from the host would synchronise with a GPU.
    stand_in = (torch.arange(3, device=boxes.device) == 2).to(boxes.dtype) * mosaic.min_patch_size  # (0, 0, s)
    return dataclasses.replace(mosaic, boxes=torch.where(padding, stand_in, boxes),
                               centers=mosaic.centers.masked_fill(padding, 0))


def zero_padding(x: Tensor, valid: Tensor) -> Tensor:
    """``x [B, N, D]`` with the rows where ``valid [B, N]`` (bool) is False set to 0 (NaN and Inf too), so that
    padding enters the blocks finite and the same whatever it held; their gradient is 0."""
    return x.masked_fill(~valid.unsqueeze(-1), 0)


def with_prefix(valid: Tensor, n_prefix: int) -> Tensor:
    """``valid [B, N]`` bool over the leaves -> ``[B, n_prefix + N]`` bool over the ViT's sequence: the prefix
    tokens (class, registers) in front are always valid."""
    if n_prefix == 0:
        return valid
    return torch.cat([valid.new_ones(valid.shape[0], n_prefix), valid], dim=1)


def attention_mask(valid: Tensor, n_prefix: int, dtype: torch.dtype) -> Tensor:
    """The key-padding mask of timm's attention (``attn_mask`` of its blocks and of ``AttentionPoolLatent``, as
    ``F.scaled_dot_product_attention`` takes it): ``[B, 1, 1, n_prefix + N]`` of ``dtype``, added to the attention
    logits of every head and query: 0 where a key may be attended to, -inf at padding. Additive rather than bool:
    timm's explicit (not fused) attention pooling adds the mask as it is.

    ``valid [B, N]`` bool over the leaves; each row needs one valid key (a prefix token or a leaf), or its softmax
    has nothing to normalise."""
    keys = with_prefix(valid, n_prefix)[:, None, None, :]
    return torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(~keys, float("-inf"))


def masked_pool(x: Tensor, valid: Tensor, pool_type: str) -> Tensor:
    """timm's ``global_pool_nlc`` reductions over the valid tokens only.

    Args:
        x: ``[B, L, D]`` token features.
        valid: ``[B, L]`` bool, at least one True per row (else ``avg`` is NaN and ``max`` is -inf).
        pool_type: ``"avg"`` (the mean over valid tokens, summed in float32 or wider, rounded once to x's dtype, as
            ``mean`` does), ``"max"``, or ``"avgmax"`` (half their sum, as timm).

    Returns:
        ``[B, D]`` in x's dtype.
    """
    keep = valid.unsqueeze(-1)
    if pool_type == "max":
        return x.masked_fill(~keep, float("-inf")).amax(dim=1)
    if pool_type == "avg":
        wide = torch.promote_types(x.dtype, torch.float32)
        count = valid.sum(dim=1, keepdim=True)
        return (x.masked_fill(~keep, 0).sum(dim=1, dtype=wide) / count).to(x.dtype)
    if pool_type == "avgmax":
        return 0.5 * (masked_pool(x, valid, "max") + masked_pool(x, valid, "avg"))
    raise ValueError(f"pool_type must be one of {', '.join(MASKED_POOLS)}, got {pool_type!r}")


def run_blocks(blocks: nn.Sequential, x: Tensor, checkpointing: bool = False, forward=None, **kwargs) -> Tensor:
    """timm's blocks one by one, each given ``kwargs`` (``nn.Sequential`` and timm's ``checkpoint_seq`` pass only x).
    With ``checkpointing``, each block is recomputed in the backward pass (``torch.utils.checkpoint``,
    non-reentrant), which is what timm's grad checkpointing does.

    Args:
        blocks: timm blocks.
        x: ``[B, L, D]`` (or the packed rows ``[T', D]``).
        forward: how a block runs, ``forward(block, x, **kwargs)``; default ``block(x, **kwargs)``, e.g. with
            ``attn_mask`` as :func:`attention_mask` makes it, ``[B, 1, 1, L]``.

    Returns:
        x's shape.
    """
    forward = _call_block if forward is None else forward
    for block in blocks:
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(forward, block, x, use_reentrant=False, **kwargs)
        else:
            x = forward(block, x, **kwargs)
    return x


def _call_block(block: nn.Module, x: Tensor, **kwargs) -> Tensor:
    return block(x, **kwargs)


def check_pooling_for_padding(vit: nn.Module) -> None:
    """A ValueError where :func:`pool_valid_tokens` cannot pool the ViT's padded (or packed) features: a pooling that
    mixes tokens without a mask (``global_pool="prr"``), or a ``forward_head``/``pool`` of the ViT's own (a subclass
    such as DeiT's distilled ViT)."""
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import VisionTransformer

    attn_pool = getattr(vit, "attn_pool", None)
    if attn_pool is not None and not isinstance(attn_pool, AttentionPoolLatent):
        raise ValueError(f"a padded or packed mosaic needs a pooling that can skip padding: global_pool 'token', "
                         f"'avg', 'max', 'avgmax', 'map' or '', but this ViT pools with {type(attn_pool).__name__} "
                         f"(global_pool={vit.global_pool!r}), which takes no mask: use a fixed budget (lengths None), "
                         f"unpacked")
    for method in ("forward_head", "pool"):
        if getattr(type(vit), method, None) is not getattr(VisionTransformer, method):
            raise ValueError(f"a padded or packed mosaic needs timm VisionTransformer's own {method}, which "
                             f"{type(vit).__name__} overrides: pooling over valid tokens only is written for it; use "
                             f"a fixed budget (lengths None)")


def check_blocks_for_padding(vit: nn.Module) -> None:
    """A ValueError where the ViT's token pipeline cannot run on a padded or packed mosaic: patch dropout while
    training, which drops and reorders tokens (padding among them) whatever ``lengths`` says."""
    patch_drop = getattr(vit, "patch_drop", None)
    if patch_drop is not None and not isinstance(patch_drop, nn.Identity) and patch_drop.training:
        raise ValueError("patch dropout (the ViT's patch_drop_rate > 0) cannot run on a packed or padded mosaic while "
                         "training: it would drop valid tokens and keep padding. Build the ViT with patch_drop_rate=0, "
                         "or use a fixed budget")


def pool_valid_tokens(vit: nn.Module, x: Tensor, valid: Tensor) -> Tensor:
    """The ViT's ``pool`` (its ``global_pool``, ``num_prefix_tokens``, ``pool_include_prefix`` and ``attn_pool``)
    over the valid tokens only.

    Args:
        vit: a timm ``VisionTransformer`` (see :func:`check_pooling_for_padding`).
        x: ``[B, n_prefix + N, D]``, the features out of the ViT's final norm.
        valid: ``[B, N]`` bool over the leaves.

    Returns:
        ``[B, D]`` (``[B, n_prefix + N, D]`` for ``global_pool=""``: no pooling, padding rows left as they are).
    """
    n_prefix = x.shape[1] - valid.shape[1]
    pooled_prefix = n_prefix if getattr(vit, "pool_include_prefix", False) else 0
    reduced = x[:, n_prefix - pooled_prefix:]
    attn_pool = getattr(vit, "attn_pool", None)
    if attn_pool is not None:
        return attn_pool(reduced, attn_mask=attention_mask(valid, pooled_prefix, x.dtype))
    if vit.global_pool == "token":
        return x[:, 0]  # the class token, always valid
    if not vit.global_pool:
        return x
    return masked_pool(reduced, with_prefix(valid, pooled_prefix), vit.global_pool)
