"""A timm ViT on packed mosaics (:class:`mixres.PackedMosaic`): token-wise layers on ``[T, D]``, attention per image.

In the packed layout the blocks see one sequence of rows, ``[T', D]``: image b's prefix tokens (class, registers)
then its leaves, image after image (``cu_seqlens`` of the blocks count the prefix tokens), then the static variant's
tail, which belongs to no image. Patch embedding, norms, MLPs and the attention's linear layers run on the rows, so
they cost what the valid leaves cost, unlike the padded layout's ``[B, N_max, D]``. Attention runs per image:

- ``"loop"``: ``F.scaled_dot_product_attention`` (or timm's explicit softmax) on each image's rows, one call per
  image, the bounds read on the host. The CPU's choice, exact (each image's attention is its attention alone).
  Measured on this project's 2-core CPU VM (one thread, ViT-S/16 attention, 6 heads of 64, B = 16, lengths of
  49 + 3k with mean 106 of N_max 196, one class token; medians of 15 interleaved rounds, benchmarks' timing): the
  loop 10.3 ms (its outputs concatenated); the same loop writing into one output 9.4 ms (not taken: in-place
  writes into a buffer under autograd, for 1 ms in a forward of seconds); masked SDPA on the padded
  ``[16, 6, 197, 64]`` 23.4 ms (2.3x the loop); that plus gathering to and from the padded layout (``"padded"``
  below) 27.4 ms (2.7x); nested jagged tensors (``torch.nested.nested_tensor_from_jagged`` + SDPA) 50.1 ms (4.9x, and no
  ``torch.inference_mode``); flex_attention with a document mask, eager, 659 ms (64x: without torch.compile it
  materialises the T x T scores). ``torch.nn.attention.varlen.varlen_attn`` does not run on the CPU (flash-attn's
  kernels only).
- ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention on ``cu_seqlens``): CUDA, float16 or
  bfloat16, timm's fused attention without attention dropout. No host synchronisation.
- ``"padded"``: the rows gathered into ``[B, max_seqlen', H, d]`` and attended with a key-padding mask, as the padded
  layout does, then gathered back. Any device, dtype or mode, no host synchronisation, static shapes: what
  ``torch.compile(fullgraph=True)`` and CUDA graphs take.
- ``"auto"``: ``"loop"`` on the CPU (eager), ``"varlen"`` where it can run, ``"padded"`` otherwise.

Pooling reads each image's valid tokens by gathering the final features into the padded layout, where
:func:`mixres.models.padding.pool_valid_tokens` pools them (a ``[B, max_seqlen', D]`` gather, once).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..packed import row_images
from .padding import attention_mask, pool_valid_tokens

if TYPE_CHECKING:
    from ..packed import PackedMosaic

__all__ = ["PACKED_ATTENTIONS", "Sequences", "insert_prefix", "packed_attention", "packed_block",
           "check_blocks_for_packing", "pool_packed_tokens"]

PACKED_ATTENTIONS = ("auto", "loop", "varlen", "padded")


class Sequences:
    """The blocks' packed layout of a :class:`mixres.PackedMosaic` with ``n_prefix`` prefix tokens per image: what
    each block needs to attend per image, computed once per forward, on the device (a few index tensors of T' or
    B x max_seqlen' entries).

    Attributes:
        cu_seqlens: ``[B + 1]`` int32, the images' cumulative lengths, prefix tokens included.
        max_seqlen: the longest image, prefix tokens included (a Python int).
        rows: T', the number of rows, ``T + B * n_prefix``.
        attention: the attention's implementation, one of :data:`PACKED_ATTENTIONS`.
        images: ``[T']`` int64, each row's image; B for the tail.
        in_image: ``[T']`` bool, False at the tail.
        slots: ``[B, max_seqlen]`` int64, the row each slot of the padded layout reads (padding slots some row).
        slot_valid: ``[B, max_seqlen]`` bool, the slots that hold a row.
        row_slots: ``[T']`` int64, each row's slot in the flattened padded layout (the tail's: 0).
    """

    def __init__(self, packed: PackedMosaic, n_prefix: int, attention: str = "auto"):
        if attention not in PACKED_ATTENTIONS:
            raise ValueError(f"packed_attention must be one of {', '.join(map(repr, PACKED_ATTENTIONS))}, got "
                             f"{attention!r}")
        self.batch = packed.batch_size
        self.n_prefix = n_prefix
        device = packed.cu_seqlens.device
        self.cu_seqlens = packed.cu_seqlens + n_prefix * torch.arange(self.batch + 1, device=device,
                                                                      dtype=torch.int32)
        self.max_seqlen = packed.max_seqlen + n_prefix
        self.rows = packed.total_tokens + self.batch * n_prefix
        self.attention = attention
        self._bounds = None

        self.images = row_images(self.cu_seqlens, self.rows)
        self.in_image = self.images < self.batch
        starts = self.cu_seqlens.long()
        columns = torch.arange(self.max_seqlen, device=device)
        self.slot_valid = columns < starts.diff()[:, None]
        self.slots = (starts[:-1, None] + columns).clamp(max=self.rows - 1)
        images = self.images.clamp(max=self.batch - 1)
        offsets = torch.arange(self.rows, device=device) - starts[images]
        self.row_slots = torch.where(self.in_image, images * self.max_seqlen + offsets, 0)

    def bounds(self) -> list[int]:
        """``cu_seqlens`` on the host: a copy, made once, which synchronises with a GPU (the ``"loop"`` reads it)."""
        if self._bounds is None:
            self._bounds = self.cu_seqlens.tolist()
        return self._bounds

    def to_padded(self, x: Tensor) -> Tensor:
        """Rows ``[T', ...]`` -> the padded layout ``[B, max_seqlen, ...]`` (padding slots hold copies of rows)."""
        return x[self.slots]

    def from_padded(self, x: Tensor) -> Tensor:
        """The padded layout ``[B, max_seqlen, ...]`` -> rows ``[T', ...]``, the tail 0."""
        rows = x.flatten(0, 1)[self.row_slots]
        return torch.where(self.in_image.view(-1, *(1,) * (rows.dim() - 1)), rows, 0)


def insert_prefix(x: Tensor, prefix: Tensor | None, cu_seqlens: Tensor) -> Tensor:
    """Each image's prefix tokens in front of its leaves.

    Args:
        x: ``[T, D]``, the leaves' rows (image b's at ``cu_seqlens[b]`` to ``cu_seqlens[b + 1]``, then the tail).
        prefix: ``[B, P, D]`` or None (no prefix tokens).
        cu_seqlens: ``[B + 1]`` int32, the leaves' cumulative lengths.

    Returns:
        ``[T + B * P, D]``: image b's P prefix rows then its leaves, image after image, then the tail.
    """
    if prefix is None or prefix.shape[1] == 0:
        return x
    batch, n_prefix = prefix.shape[:2]
    leaves = x.shape[0]
    steps = torch.arange(batch + 1, device=cu_seqlens.device)
    starts = cu_seqlens.long() + n_prefix * steps  # where each image starts in the output; the tail at [B]
    positions = torch.arange(leaves + batch * n_prefix, device=x.device)
    images = row_images(starts, positions.shape[0])  # B for the tail
    offsets = positions - starts[images]
    is_prefix = (offsets < n_prefix) & (images < batch)
    # Rows of cat([x, prefix]): a leaf moves up by the prefix tokens of the images up to its own.
    source = torch.where(is_prefix, leaves + images.clamp(max=batch - 1) * n_prefix + offsets,
                         positions - n_prefix * (images + 1).clamp(max=batch))
    return torch.cat([x, prefix.flatten(0, 1).to(x.dtype)])[source]


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """timm ``Attention``'s core on ``[..., H, L, d]``, as it computes it: fused (SDPA at its default scale) or
    explicit (``attn.scale``, softmax, ``attn.attn_drop``), with its attention dropout while training. ``mask``:
    additive, broadcast to the attention logits."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              dropout_p=attn.attn_drop.p if attn.training else 0.0)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    return attn.attn_drop(scores.softmax(dim=-1)) @ v


def _varlen_runs(attn: nn.Module, q: Tensor) -> bool:
    """Whether ``torch.nn.attention.varlen.varlen_attn`` computes what timm's attention computes here: flash
    attention needs CUDA (compute capability 8 or more), float16 or bfloat16 and a head width of at most 256 in
    multiples of 8; it takes no dropout and scales by the default (timm's fused attention's) scale."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or not attn.fused_attn:
        return False
    if (attn.training and attn.attn_drop.p > 0) or q.shape[-1] > 256 or q.shape[-1] % 8:
        return False
    try:
        from torch.nn.attention import varlen  # PyTorch 2.10 and later
    except ImportError:
        return False
    return hasattr(varlen, "varlen_attn") and torch.cuda.get_device_capability(q.device) >= (8, 0)


def _chosen_attention(attn: nn.Module, q: Tensor, sequences: Sequences) -> str:
    if sequences.attention != "auto":
        return sequences.attention
    if _varlen_runs(attn, q):
        return "varlen"
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return "loop"
    return "padded"


def packed_attention(attn: nn.Module, x: Tensor, sequences: Sequences) -> Tensor:
    """timm's ``Attention.forward`` on packed rows, each image attending to its own rows only: the qkv projection,
    ``q_norm`` and ``k_norm``, attention (``sequences.attention``), the output ``norm``, ``gate``, ``proj`` and
    ``proj_drop`` of ``attn``, with its flags (``fused_attn``, ``scale``, dropout while training).

    Args:
        attn: a ``timm.layers.Attention`` (see :func:`check_blocks_for_packing`).
        x: ``[T', D]`` rows in the layout of ``sequences``.

    Returns:
        ``[T', D]``; the tail's rows attend to nothing and hold ``proj(0)``.
    """
    rows = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).view(rows, 3, attn.num_heads, attn.head_dim).unbind(1)  # [T', H, d] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    how = _chosen_attention(attn, q, sequences)
    if how == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu_seqlens, longest = sequences.cu_seqlens, sequences.max_seqlen
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens, longest, longest)
        # Flash attention leaves the tail's rows unwritten: they must stay finite (0 times NaN is NaN in a gradient).
        out = torch.where(sequences.in_image[:, None, None], out, 0)
    elif how == "loop":
        bounds = sequences.bounds()
        parts = [_attend(attn, *(t[start:end].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                 for start, end in zip(bounds[:-1], bounds[1:])]
        if bounds[-1] < rows:
            parts.append(q.new_zeros(rows - bounds[-1], *q.shape[1:]))
        out = torch.cat(parts)
    else:
        rows_of = sequences.slots
        mask = attention_mask(sequences.slot_valid, 0, q.dtype)  # [B, 1, 1, max_seqlen]
        padded = _attend(attn, *(t[rows_of].transpose(1, 2) for t in (q, k, v)), mask)  # [B, H, L, d]
        out = sequences.from_padded(padded.transpose(1, 2))
    out = attn.norm(out.reshape(rows, attn.num_heads * attn.head_dim))  # timm's attn_dim (not in older timm)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _drop_path(x: Tensor, module: nn.Module, sequences: Sequences) -> Tensor:
    """timm's ``DropPath`` (stochastic depth) per image, as it drops per sample of a batch, not per row: the same
    draws from the same random state as timm's on a batch of B images (the tail is dropped)."""
    if isinstance(module, nn.Identity) or not module.training or module.drop_prob == 0.0:
        return x
    keep_prob = 1 - module.drop_prob
    keep = x.new_empty(sequences.batch).bernoulli_(keep_prob)
    if keep_prob > 0 and module.scale_by_keep:
        keep = keep / keep_prob
    return x * torch.cat([keep, keep.new_zeros(1)])[sequences.images].unsqueeze(-1)


def packed_block(block: nn.Module, x: Tensor, sequences: Sequences) -> Tensor:
    """A timm ``Block`` (pre-norm) or ``ResPostBlock`` (post-norm) on packed rows ``[T', D]`` -> ``[T', D]``: its
    own norms, layer scales and MLP on the rows, :func:`packed_attention`, stochastic depth per image."""
    from timm.models.vision_transformer import ResPostBlock

    if isinstance(block, ResPostBlock):
        x = x + _drop_path(block.norm1(packed_attention(block.attn, x, sequences)), block.drop_path1, sequences)
        return x + _drop_path(block.norm2(block.mlp(x)), block.drop_path2, sequences)
    x = x + _drop_path(block.ls1(packed_attention(block.attn, block.norm1(x), sequences)), block.drop_path1,
                       sequences)
    return x + _drop_path(block.ls2(block.mlp(block.norm2(x))), block.drop_path2, sequences)


def check_blocks_for_packing(vit: nn.Module) -> None:
    """A TypeError for a block that :func:`packed_block` does not know: only timm's ``Block`` and ``ResPostBlock``
    (exactly those classes) with timm's ``Attention``, a token-wise MLP (``Mlp``, ``GluMlp``, ``SwiGLU``, without
    convolutions), ``LayerScale`` or nothing, ``DropPath`` or nothing. Other blocks may mix rows of other images
    (or compute something else on the rows), which packing cannot see."""
    from timm.layers import Attention, DropPath, GluMlp, Mlp, SwiGLU
    from timm.models.vision_transformer import Block, LayerScale, ResPostBlock

    def known(module, *types) -> bool:
        return type(module) in (*types, nn.Identity)

    for index, block in enumerate(vit.blocks):
        problem = None
        if type(block) not in (Block, ResPostBlock):
            problem = f"a {type(block).__name__}"
        elif type(block.attn) is not Attention:
            problem = f"attention {type(block.attn).__name__}"
        elif type(block.mlp) not in (Mlp, GluMlp, SwiGLU) or any(isinstance(m, nn.Conv2d)
                                                                  for m in block.mlp.modules()):
            problem = f"MLP {type(block.mlp).__name__}"
        elif not all(known(getattr(block, name, nn.Identity()), LayerScale) for name in ("ls1", "ls2")):
            problem = "a layer scale other than timm's LayerScale"
        elif not all(known(getattr(block, name), DropPath) for name in ("drop_path1", "drop_path2")):
            problem = "a drop path other than timm's DropPath"
        if problem:
            raise TypeError(f"a packed mosaic runs timm's Block and ResPostBlock (with timm's Attention, Mlp, GluMlp "
                            f"or SwiGLU, LayerScale and DropPath) one image per attention, but block {index} has "
                            f"{problem}: use a padded mosaic (mosaic.unpack())")


def pool_packed_tokens(vit: nn.Module, x: Tensor, sequences: Sequences) -> Tensor:
    """The ViT's pooling (:func:`mixres.models.padding.pool_valid_tokens`) per image of packed features.

    Args:
        vit: a timm ``VisionTransformer`` (see :func:`mixres.models.padding.check_pooling_for_padding`).
        x: ``[T', D]``, the features out of the ViT's final norm, in the layout of ``sequences``.

    Returns:
        ``[B, D]``; for ``global_pool=""`` (no pooling) the rows as they are, ``[T', D]``.
    """
    if not vit.global_pool and getattr(vit, "attn_pool", None) is None:
        return x
    return pool_valid_tokens(vit, sequences.to_padded(x), sequences.slot_valid[:, sequences.n_prefix:])
