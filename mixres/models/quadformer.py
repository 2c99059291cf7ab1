"""The Quadformer: a standard timm VisionTransformer that reads a mixed-resolution mosaic instead of a patch grid."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_images, check_lengths, check_nan_policy, check_resize_mode
from ..mosaic import Mosaic, check_threshold, tokenize
from ..packed import PackedMosaic, pack
from ..pyramid import QuadtreeGeometry, default_max_patch_size
from ..scorers import Scorer, create_scorer
from .packing import Sequences, check_blocks_for_packing, insert_prefix, packed_block, pool_packed_tokens
from .padding import (attention_mask, check_blocks_for_padding, check_pooling_for_padding,
                      pool_valid_tokens, run_blocks, zero_padding)
from .position import LearnedXYEmbed, PositionEmbedding, pos_embed_class

__all__ = ["Quadformer", "check_vit", "TOKEN_LAYOUTS", "rounded_rows"]

# How Quadformer.forward runs the padded mosaics it makes from images.
TOKEN_LAYOUTS = ("padded", "packed")


class Quadformer(nn.Module):
    """A timm ViT on mixed-resolution tokens (Ronen et al., 2023): scorer -> quadtree -> resized leaves -> ViT.

    Each image is split into ``n_patches`` square leaves of ``min_patch_size`` to ``max_patch_size`` pixels by
    :func:`mixres.tokenize`, greedily by the scorer's priorities; every leaf is resized to the ViT's patch size
    and embedded by the ViT's own patch-embedding weights, used as a linear map. Then the ViT's prefix tokens,
    blocks, norm and head run as usual. With a mosaic of ``min_patch_size`` leaves only (``n_patches`` the whole
    grid) and ``pos_embed="resample"``, it computes exactly what the plain ViT computes.

    Args:
        vit: a timm ``VisionTransformer`` (ViT, DeiT, DeiT-III, ...: absolute position table or none, square
            non-overlapping patch embedding, class/register prefix tokens). The Quadformer owns it from here on.
        n_patches: leaves per image: (H/max)(W/max) + 3k, at most (H/min)(W/min) for the model's image size.
            Change it at any time (``model.n_patches = 52``) or per call (``model(images, n_patches=52)``).
        scorer: a :class:`mixres.scorers.Scorer`, or a name for :func:`mixres.create_scorer` (``"pixel-blur"``,
            ``"feature"``, ``"entropy"``, ``"random"``, ``"uniform"``...) built with ``scorer_kwargs``. It may be
            replaced later (``model.scorer = ...``) by one with the same patch sizes.
        min_patch_size: the smallest leaf side, in pixels. Default: the ViT's patch size.
        max_patch_size: the largest leaf side: min_patch_size times a power of two dividing the image size.
            Default: the largest of 4x, 2x, 1x min_patch_size that divides the model's image size (64 px at 256
            and 384 px, 32 px at 224 px, for 16 px patches).
        pos_embed: how the leaves get positions:

            - ``"resample"``: the ViT's pretrained table, averaged over the min_patch_size cells each leaf covers
              (the table is resampled first, bicubically, when the image's grid differs from the table's). The
              pretrained model works as is.
            - ``"xy"``: the paper's scheme: sin-cos embeddings of the leaf centre's y and x, D/2 channels each,
              concatenated. No parameters; the ViT's table is dropped (its prefix-token entries are kept).
            - ``"xy-learned"``: the same with learned y and x tables (:class:`LearnedXYEmbed`).

            The kind is a module, ``model.pos_embed`` (:class:`mixres.models.position.PositionEmbedding`); its
            name is ``model.pos_embed_kind``.
        resize_mode: how leaves are resized to the token size: ``"area"`` or ``"bilinear"``.
        scorer_kwargs: arguments for a scorer given by name, e.g. ``{"weights": "shufflenet.pth"}``.
        input_mean, input_std: the per-channel normalisation that the model's inputs carry (as for the plain ViT):
            one finite number per input channel, the std positive. The scorer sees ``images * std + mean``, the
            [0, 1] images that scorers expect, computed in float32 (float64 for float64 images) whatever the
            images' or the model's dtype: a model in ``.to(torch.bfloat16)`` keeps these two buffers float32, so
            that it chooses the leaves the float32 model chooses. Default: the ViT's ``pretrained_cfg`` mean and
            std; pass ``(0.0,) * C`` and ``(1.0,) * C`` for unnormalised inputs.
        nan_policy: what NaN and infinite scores do in :func:`mixres.tokenize`: ``"raise"`` (an error on the CPU, a
            device-side assert on CUDA) or ``"lowest"`` (those patches are split last; for a pipeline that must
            keep running). Scorers that read pixels give NaN scores to the patches that hold NaN or Inf pixels.
            Change it at any time (``model.nan_policy = "lowest"``).
        threshold: an adaptive budget (:func:`mixres.tokenize`'s ``threshold``): each image stops splitting when its
            best leaf scores at or below it (one number, or ``{patch size: number}``), with ``n_patches`` as the
            cap N_max. The model then runs on padded mosaics (masked attention and pooling): each image's logits
            are those it gets alone at its own length. None (default): every image gets ``n_patches`` leaves.
            Change it at any time (``model.threshold = 0.01``); :func:`mixres.calibrate_threshold` finds one for a
            mean token count.
        token_layout: how :meth:`forward` runs the padded mosaics of an adaptive budget that it makes from images:
            ``"padded"`` (default: static shapes, no host synchronisation: CUDA graphs, torch.compile) or
            ``"packed"`` (:func:`mixres.pack`, one host synchronisation per call: the token-wise layers run on the
            images' leaves only, about 2x as fast on the CPU when the mean length is half of ``n_patches``; the same
            logits; the rows rounded up by :func:`rounded_rows`). Change it at any time
            (``model.token_layout = "packed"``).

    Inputs: images ``[B, C, H, W]`` with the ViT's C input channels (normalised as for the ViT; H, W multiples of
    max_patch_size; any float dtype: the ViT gets the tokens in its own dtype), or a prepared
    :class:`mixres.Mosaic` whose tokens have the ViT's patch size and channels. A padded mosaic (``lengths`` set,
    each from 1 to N) runs with a key-padding mask and pools its valid tokens only (see
    :mod:`mixres.models.padding`): image b's logits are those it gets alone at its own length. So does a packed
    one (:class:`mixres.PackedMosaic`, :func:`mixres.pack`), whose token-wise layers run on its T rows only and whose
    attention runs per image (see :mod:`mixres.models.packing`): faster than the padded layout where images are
    shorter than N on average.

    Attributes:
        packed_attention: how a packed mosaic's images attend (one of ``"auto"``, ``"loop"``, ``"varlen"``,
            ``"padded"``; see :mod:`mixres.models.packing`). Default ``"auto"``: per image on the CPU, flash
            attention's varlen kernel on CUDA in float16 and bfloat16, through the padded layout otherwise and under
            torch.compile.
    """

    packed_attention: str = "auto"

    def __init__(self, vit: nn.Module, n_patches: int = 100, scorer: str | Scorer = "pixel-blur",
                 min_patch_size: int | None = None, max_patch_size: int | None = None, pos_embed: str = "resample",
                 resize_mode: str = "area", scorer_kwargs: dict | None = None,
                 input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None,
                 nan_policy: str = "raise", threshold=None, token_layout: str = "padded"):
        super().__init__()
        self.patch_size, self.in_chans, image_size = check_vit(vit)
        embedding = pos_embed_class(pos_embed)  # an unknown name fails before anything is built
        check_resize_mode(resize_mode, "resize_mode")
        min_patch_size = self.patch_size if min_patch_size is None else min_patch_size
        if max_patch_size is None:
            max_patch_size = default_max_patch_size(*image_size, min_patch_size)
        self.geometry = QuadtreeGeometry(*image_size, min_patch_size, max_patch_size)  # checks the sizes
        n_patches = self.geometry.check_n_patches(n_patches)

        self.vit = vit
        self.resize_mode = resize_mode
        self.n_patches = n_patches
        self.nan_policy = check_nan_policy(nan_policy)
        if threshold is not None:
            check_threshold(threshold, self.geometry)  # a bad one fails here rather than at the first batch
        self.threshold = threshold
        if token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"token_layout must be one of {', '.join(map(repr, TOKEN_LAYOUTS))}, got "
                             f"{token_layout!r}")
        self.token_layout = token_layout
        # A name is built with its arguments; a built scorer is checked (and arguments for it refused) there too.
        self._scorer = create_scorer(scorer, min_patch_size, max_patch_size, **(scorer_kwargs or {}))

        # After the scorer: a learned table's random initialisation comes after the scorer's.
        self.pos_embed: PositionEmbedding = embedding(vit, self.geometry.grid(min_patch_size))

        cfg = dict(getattr(vit, "pretrained_cfg", None) or {})
        mean = input_mean if input_mean is not None else cfg.get("mean", (0.0,) * self.in_chans)
        std = input_std if input_std is not None else cfg.get("std", (1.0,) * self.in_chans)
        # Kept as numbers too: the buffers are rebuilt from them when the model changes dtype (see _apply).
        self._input_stats = {"input_mean": _channel_values("input_mean", mean, self.in_chans),
                             "input_std": _channel_values("input_std", std, self.in_chans, positive=True)}
        for name, values in self._input_stats.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.pretrained_cfg = cfg
        self.register_load_state_dict_pre_hook(_adapt_checkpoint)
        self.register_state_dict_post_hook(_save_pos_embed_at_the_top)

    # ---------------------------------------------------------------------------------------------- configuration
    @property
    def min_patch_size(self) -> int:
        return self.geometry.min_patch_size

    @property
    def max_patch_size(self) -> int:
        return self.geometry.max_patch_size

    @property
    def scorer(self) -> Scorer:
        return self._scorer

    @scorer.setter
    def scorer(self, scorer: Scorer) -> None:
        self._scorer = create_scorer(scorer, self.min_patch_size, self.max_patch_size)

    @property
    def pos_embed_kind(self) -> str:
        """The ``pos_embed`` name: ``"resample"``, ``"xy"`` or ``"xy-learned"``."""
        return self.pos_embed.kind

    @property
    def xy_embed(self) -> LearnedXYEmbed | None:
        """The learned xy tables (``pos_embed="xy-learned"``), None for the other kinds."""
        return getattr(self.pos_embed, "xy_embed", None)

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.vit.reset_classifier(num_classes, global_pool)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that timm's optimizer factory leaves out of weight decay: position tables and prefix tokens."""
        return ({f"vit.{name}" for name in self.vit.no_weight_decay()}
                | {f"pos_embed.{name}" for name in self.pos_embed.no_weight_decay()})

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        return (f"n_patches={self.n_patches}, patch sizes {self.min_patch_size}-{self.max_patch_size} px, "
                f"pos_embed={self.pos_embed_kind!r}, resize_mode={self.resize_mode!r}, scorer={self.scorer!r}"
                + (f", threshold={self.threshold!r}, token_layout={self.token_layout!r}"
                   if self.threshold is not None else ""))

    def _apply(self, fn, recurse=True):
        # .half(), .bfloat16() and .to(dtype) would round input_mean and input_std to the model's dtype, and the
        # scorer would then see other images than the float32 model's scorer (and choose other leaves). They are
        # rebuilt from the exact numbers, float32 (float64 if the model goes float64), on their new device.
        super()._apply(fn, recurse)
        for name, values in self._input_stats.items():
            buffer = getattr(self, name)
            dtype = torch.float64 if buffer.dtype == torch.float64 else torch.float32
            setattr(self, name, torch.tensor(values, dtype=dtype, device=buffer.device).view(-1, 1, 1))
        return self

    def adapt_state_dict(self, state_dict: dict, prefix: str = "") -> None:
        """Lets this Quadformer load a plain timm ViT checkpoint (keys without ``vit.``), as timm's
        ``checkpoint_path=`` and ``load_checkpoint`` do, or a :class:`mixres.models.UniformGrid`'s (keys under
        ``quadformer.``): keys are moved under ``vit.``; then the position embedding adapts its weights and the
        ViT's table (:meth:`PositionEmbedding.adapt_state_dict`): the table is cut to the prefix entries (``xy``
        kinds) or resampled to the model's grid (``resample``), and learned xy tables are resampled (linearly, as
        the model reads them) to the model's grid. In place, on a state dict whose keys start with ``prefix``; one
        that already fits is left as it is. ``load_state_dict`` calls it."""
        own = f"{prefix}vit."
        if not any(key.startswith(own) for key in state_dict):
            wrapped = f"{prefix}quadformer."  # a UniformGrid's: the Quadformer it wraps
            if any(key.startswith(wrapped + "vit.") for key in state_dict):
                for key in [key for key in state_dict if key.startswith(wrapped)]:
                    state_dict[prefix + key[len(wrapped):]] = state_dict.pop(key)
            elif f"{prefix}patch_embed.proj.weight" in state_dict:
                for key in [key for key in state_dict if key.startswith(prefix)]:
                    state_dict[own + key[len(prefix):]] = state_dict.pop(key)
        self.pos_embed.adapt_state_dict(state_dict, prefix, self.vit, f"{own}pos_embed")

    # ---------------------------------------------------------------------------------------------------- forward
    def check_images(self, images: Tensor) -> None:
        """A clear error for images the ViT cannot take: not ``[B, C, H, W]`` floats, or another channel count."""
        check_images(images)
        if images.shape[1] != self.in_chans:
            raise ValueError(f"images must have the ViT's {self.in_chans} input channels, [B, {self.in_chans}, H, W], "
                             f"got {list(images.shape)}")

    def score(self, images: Tensor):
        """``images [B, C, H, W]`` (normalised as the ViT's inputs) -> the scorer's output on the images as they
        were before normalisation (scorers take images in [0, 1]), without gradients. The normalisation is undone
        in float32 (float64 for float64 images), whatever the images' dtype."""
        self.check_images(images)
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            return self.scorer(images.to(dtype) * self.input_std.to(dtype) + self.input_mean.to(dtype))

    def tokenize(self, images: Tensor, n_patches: int | None = None) -> Mosaic:
        """``images [B, C, H, W]`` (normalised as the ViT's inputs) -> their :class:`mixres.Mosaic`, the leaves
        chosen by the scorer (:meth:`score`) and resized to the ViT's patch size. NaN or infinite scores are
        handled by ``self.nan_policy``. With ``self.threshold`` set, a padded mosaic of at most ``n_patches``
        leaves per image."""
        return tokenize(images, self.score(images), self.n_patches if n_patches is None else n_patches,
                        self.min_patch_size, self.max_patch_size, self.patch_size, self.resize_mode,
                        nan_policy=self.nan_policy, threshold=self.threshold)

    def embed(self, mosaic: Mosaic | PackedMosaic) -> Tensor:
        """A mosaic -> the token sequence entering the blocks, ``[B, prefix + N, D]``: leaves embedded by the
        ViT's patch-embedding weights, position embeddings added, prefix (class, register) tokens in front. A padded
        mosaic's padding rows are 0 (whatever its padding leaves hold). A packed mosaic gives its rows,
        ``[T + B * prefix, D]``: each image's prefix tokens in front of its leaves, the static variant's tail 0."""
        vit = self.vit
        if isinstance(mosaic, PackedMosaic):
            # The rows embed as one padded image whose valid leaves are the packed images' (the tail is padding).
            rows = Mosaic(tokens=mosaic.tokens[None], boxes=mosaic.boxes[None], centers=mosaic.centers[None],
                          min_patch_size=mosaic.min_patch_size, image_size=mosaic.image_size,
                          lengths=mosaic.cu_seqlens[-1:])
            x = insert_prefix(self._embed_leaves(rows)[0], self._prefix_tokens(mosaic.batch_size),
                              mosaic.cu_seqlens)
        else:
            x = self._embed_leaves(mosaic)
            prefix = self._prefix_tokens(x.shape[0])
            if prefix is not None:
                x = torch.cat([prefix.to(x.dtype), x], dim=1)
        return vit.pos_drop(x)

    def _embed_leaves(self, mosaic: Mosaic) -> Tensor:
        """A mosaic's leaves embedded, with their positions: ``[B, N, D]``, padding rows 0."""
        vit = self.vit
        if mosaic.patch_size != self.patch_size or mosaic.tokens.shape[2] != self.in_chans:
            raise ValueError(f"mosaic tokens must be [B, N, {self.in_chans}, {self.patch_size}, {self.patch_size}] "
                             f"(the ViT's channels and patch size), got {list(mosaic.tokens.shape)}")
        if mosaic.min_patch_size != self.min_patch_size:
            raise ValueError(f"mosaic has min_patch_size {mosaic.min_patch_size} but the model uses "
                             f"{self.min_patch_size}")
        if mosaic.is_padded:
            check_lengths(mosaic.lengths, mosaic.tokens)
        proj = vit.patch_embed.proj
        x = F.linear(mosaic.flat_tokens().to(proj.weight.dtype), proj.weight.flatten(1), proj.bias)
        x = vit.patch_embed.norm(x)
        x = x + self.pos_embed(mosaic, vit).to(x.dtype)
        if mosaic.is_padded:
            x = zero_padding(x, mosaic.valid)
        return x

    def _prefix_tokens(self, batch: int) -> Tensor | None:
        """The ViT's prefix tokens (class, then registers) with their positions, ``[B, prefix, D]``; None without."""
        vit = self.vit
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(batch, -1, -1))
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(batch, -1, -1))
        if not prefix:
            return None
        prefix = torch.cat(prefix, dim=1)
        if vit.pos_embed is not None and not vit.no_embed_class:
            prefix = prefix + vit.pos_embed[:, :vit.num_prefix_tokens]
        return prefix

    def _block_inputs(self, mosaic: Mosaic | PackedMosaic) -> tuple[Tensor, dict, bool]:
        """What the blocks take for ``mosaic``: the token sequence entering them (embedded, patch dropout,
        ``norm_pre``); the keywords :func:`mixres.models.padding.run_blocks` passes on besides it (a padded mosaic's
        key-padding mask, built on the device from lengths: no host synchronisation; a packed one's block and
        sequences; none otherwise); and whether grad checkpointing is on. A ViT that cannot take a padded or packed
        mosaic is refused here."""
        vit = self.vit
        packed = isinstance(mosaic, PackedMosaic)
        if packed or mosaic.is_padded:
            check_blocks_for_padding(vit)
        if packed:
            check_blocks_for_packing(vit)
        x = vit.norm_pre(vit.patch_drop(self.embed(mosaic)))
        if packed:
            block_kwargs = {"forward": packed_block,
                            "sequences": Sequences(mosaic, vit.num_prefix_tokens, self.packed_attention)}
        elif mosaic.is_padded:
            block_kwargs = {"attn_mask": attention_mask(mosaic.valid, x.shape[1] - mosaic.n_patches, x.dtype)}
        else:
            block_kwargs = {}
        return x, block_kwargs, getattr(vit, "grad_checkpointing", False) and not torch.jit.is_scripting()

    def forward_features(self, x: Tensor | Mosaic | PackedMosaic, n_patches: int | None = None) -> Tensor:
        """Images or a mosaic -> the normed token features ``[B, prefix + N, D]``.

        A padded mosaic (``mosaic.lengths`` set) runs the blocks with a key-padding mask: no token attends to
        padding, so each valid token's features are those of its image run alone at its own length. The padding
        rows hold finite values that mean nothing; pool with ``forward_head(x, valid=mosaic.valid)``.

        A packed mosaic gives packed features ``[T + B * prefix, D]`` (see :meth:`embed`), each image's tokens
        attending to its own only (``self.packed_attention``); pool with ``forward_head(x, packed=mosaic)``."""
        vit = self.vit
        mosaic = x if isinstance(x, (Mosaic, PackedMosaic)) else self.tokenize(x, n_patches)
        x, block_kwargs, checkpointing = self._block_inputs(mosaic)
        if block_kwargs:
            # timm's checkpoint_seq (and nn.Sequential) pass x alone: the blocks run one by one, each checkpointed on
            # its own.
            x = run_blocks(vit.blocks, x, checkpointing, **block_kwargs)
        elif checkpointing:
            from timm.models import checkpoint_seq

            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def forward_intermediates(self, x: Tensor | Mosaic, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                              n_patches: int | None = None):
        """timm's ``forward_intermediates`` for a Quadformer: the features of chosen blocks, for dense heads.

        Args:
            x: images ``[B, C, H, W]`` (tokenized as :meth:`forward` does) or a :class:`mixres.Mosaic`, padded or not
                (a packed one: ``unpack()`` it first).
            indices: the blocks whose outputs to return: the last n for an int, all for None, those listed for a
                sequence (negative indices count from the end), as timm's ``feature_take_indices``.
            return_prefix_tokens: also return each block's prefix tokens (class, registers) ``[B, prefix, D]``.
            norm: apply the ViT's final norm to each returned block output.
            stop_early: run no block past the last one asked for.
            output_fmt: ``"NCHW"``: each leaf's feature painted over the min_patch_size cells it covers,
                ``[B, D, H / s_min, W / s_min]`` (:meth:`mixres.Mosaic.to_grid`; padding paints nothing; contiguous);
                ``"NLC"``: per leaf, ``[B, N, D]``, in the mosaic's order (``output_dict`` gives the mosaic).
            intermediates_only: return the list of block outputs alone.
            output_dict: return a dict: ``"image_intermediates"``, ``"image_intermediates_prefix"`` (with
                ``return_prefix_tokens``), ``"image_features"`` (the final normed features ``[B, prefix + N, D]``,
                unless ``intermediates_only``) and ``"mosaic"``.
            n_patches: the budget for images (as :meth:`forward`'s).

        Returns:
            As timm's: ``(final features, intermediates)``, the intermediates alone, or the dict; with
            ``return_prefix_tokens`` (and no dict) each intermediate is a pair (leaf features, prefix tokens).

        With ``pos_embed="resample"`` and a mosaic of min_patch_size leaves only, the features are the plain ViT's
        ``forward_intermediates``' (its tokens are in the same raster order).
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if isinstance(x, PackedMosaic):
            raise ValueError("forward_intermediates takes images or a Mosaic, not a PackedMosaic: pass "
                             "packed.unpack() (the grids are per image)")
        vit = self.vit
        mosaic = x if isinstance(x, Mosaic) else self.tokenize(x, n_patches)
        take_indices, max_index = feature_take_indices(len(vit.blocks), indices)
        x, block_kwargs, checkpointing = self._block_inputs(mosaic)
        n_prefix = x.shape[1] - mosaic.n_patches
        intermediates = []
        for index, block in enumerate(vit.blocks[:max_index + 1] if stop_early else vit.blocks):
            x = run_blocks([block], x, checkpointing, **block_kwargs)
            if index in take_indices:
                intermediates.append(vit.norm(x) if norm else x)
        prefix_tokens = [y[:, :n_prefix] for y in intermediates]
        intermediates = [y[:, n_prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [mosaic.to_grid(y).contiguous() for y in intermediates]
        if output_dict:
            result = {"image_intermediates": intermediates, "mosaic": mosaic}
            if return_prefix_tokens and n_prefix:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = vit.norm(x)
            return result
        if return_prefix_tokens and n_prefix:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (vit.norm(x), intermediates)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's: drops the ViT's blocks past the last of ``indices`` (and its final norm, its head), for a model
        that only serves :meth:`forward_intermediates`. Returns the kept indices."""
        return self.vit.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)

    def forward_head(self, x: Tensor, pre_logits: bool = False, valid: Tensor | None = None,
                     packed: PackedMosaic | None = None) -> Tensor:
        """Features ``[B, prefix + N, D]`` -> logits ``[B, num_classes]`` (pooled features ``[B, D]`` with
        ``pre_logits``), by the ViT's own pooling, ``fc_norm`` and head.

        ``valid``: ``[B, N]`` bool, a padded mosaic's ``mosaic.valid``: pooling then reads valid tokens only
        (class token: as is; ``avg``, ``max``, ``avgmax``: over the valid leaves, and the prefix tokens where the
        ViT pools them too; ``map``: attention pooling with padding masked). ``global_pool="prr"`` is refused.

        ``packed``: the :class:`mixres.PackedMosaic` whose packed features ``x [T + B * prefix, D]`` these are: each
        image is pooled the same way over its own tokens. Without pooling (``global_pool=""``) the rows stay
        packed: ``[T + B * prefix, num_classes]``."""
        vit = self.vit
        if valid is not None and packed is not None:
            raise ValueError("forward_head takes valid (padded features) or packed (packed features), not both")
        if valid is None and packed is None:
            return vit.forward_head(x, pre_logits=pre_logits)
        check_pooling_for_padding(vit)
        if packed is not None:
            pooled = pool_packed_tokens(vit, x, Sequences(packed, vit.num_prefix_tokens, self.packed_attention))
        else:
            pooled = pool_valid_tokens(vit, x, valid)
        x = vit.head_drop(vit.fc_norm(pooled))
        return x if pre_logits else vit.head(x)

    def forward(self, x: Tensor | Mosaic | PackedMosaic, n_patches: int | None = None) -> Tensor:
        """Images ``[B, C, H, W]``, a :class:`mixres.Mosaic` or a :class:`mixres.PackedMosaic` -> logits
        ``[B, num_classes]``. ``n_patches`` overrides the model's budget for this call (images only; a mosaic has its
        own). A padded or packed mosaic's image b gets the logits it gets alone at its own length (up to float
        rounding)."""
        if isinstance(x, PackedMosaic):
            if n_patches is not None:
                raise ValueError(f"n_patches={n_patches} was given with a packed mosaic, which has its own leaves")
            return self.forward_head(self.forward_features(x), packed=x)
        if isinstance(x, Mosaic) and n_patches is not None and n_patches != x.n_patches:
            raise ValueError(f"n_patches={n_patches} was given with a mosaic of {x.n_patches} leaves")
        mosaic = x if isinstance(x, Mosaic) else self.tokenize(x, n_patches)
        if mosaic.is_padded and self.token_layout == "packed" and not isinstance(x, Mosaic):
            total = int(mosaic.lengths.sum())  # the one host synchronisation of packing
            return self(pack(mosaic, total_tokens=rounded_rows(total)))
        return self.forward_head(self.forward_features(mosaic), valid=mosaic.valid if mosaic.is_padded else None)


def rounded_rows(total: int) -> int:
    """``total`` rounded up to a multiple of 1/16 to 1/32 of it (at least 8): the rows of a packed batch. The linear
    layers' kernels (oneDNN on the CPU) are built and cached per input shape, so a row count that changes with every
    batch costs a new kernel per batch and memory that grows with each (measured: 1.8 MB per new shape, training
    slowing down epoch after epoch); rounded, a few dozen shapes serve every batch, for at most 1/16 more rows."""
    step = max(8, 1 << max(0, total.bit_length() - 5))
    return -(-total // step) * step


def check_vit(vit: nn.Module) -> tuple[int, int, tuple[int, int]]:
    """(patch size, input channels, image size) of a ViT the Quadformer can drive; a clear error otherwise."""
    needed = ("patch_embed", "blocks", "norm", "forward_head", "cls_token", "pos_embed", "num_prefix_tokens",
              "embed_dim")
    missing = [name for name in needed if not hasattr(vit, name)]
    proj = getattr(getattr(vit, "patch_embed", None), "proj", None)
    if missing or not isinstance(proj, nn.Conv2d):
        raise TypeError(f"vit must be a timm VisionTransformer (e.g. timm.create_model('vit_base_patch16_224')); "
                        f"{type(vit).__name__} lacks {missing or ['patch_embed.proj (a Conv2d)']}")
    kernel, stride = tuple(proj.kernel_size), tuple(proj.stride)
    if kernel[0] != kernel[1] or kernel != stride or proj.padding not in ((0, 0), 0) or proj.groups != 1:
        raise ValueError(f"the ViT's patch embedding must be square non-overlapping patches (kernel = stride, no "
                         f"padding), got kernel {kernel}, stride {stride}, padding {proj.padding}")
    image_size = tuple(getattr(vit.patch_embed, "img_size", None) or ())
    if len(image_size) != 2:
        raise ValueError("the ViT's patch_embed has no fixed img_size: create it with img_size=... (the image size "
                         "the Quadformer will see)")
    return kernel[0], proj.in_channels, image_size


def _channel_values(name: str, values, channels: int, positive: bool = False) -> tuple[float, ...]:
    """``input_mean`` or ``input_std`` as ``channels`` finite floats (positive ones for ``positive``)."""
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError
        numbers = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of {channels} numbers (one per input channel of the ViT), got "
                        f"{values!r}") from None
    if len(numbers) != channels:
        raise ValueError(f"input_mean and input_std need {channels} values (the ViT's channels), got {len(numbers)} "
                         f"for {name}: {values!r}")
    if not all(math.isfinite(number) and (number > 0 or not positive) for number in numbers):
        raise ValueError(f"{name} must be {'positive' if positive else 'finite'} numbers, got {values!r}")
    return numbers


def _adapt_checkpoint(module: Quadformer, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                      *args) -> None:
    """Before a Quadformer loads a state dict: adapts it (:meth:`Quadformer.adapt_state_dict`), then raises a
    RuntimeError that says which configuration differs (the number of classes, the embedding width, the depth, the
    position embedding...: :func:`mixres.checkpoints.explain_mismatch`) where the weights still do not fit, instead
    of torch's list of size mismatches. Nothing is loaded then. Names missing on either side are left to torch when
    ``strict`` is False. The position embedding's weights are taken by their checkpoint names (see
    :func:`_save_pos_embed_at_the_top`) or their parameter names, and go under ``pos_embed.`` to be loaded."""
    from ..checkpoints import explain_mismatch

    _pos_embed_at_the_top(state_dict, prefix)
    module.adapt_state_dict(state_dict, prefix)
    found = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    problem = explain_mismatch(module.state_dict(), found, keys=strict)
    if problem:
        raise RuntimeError(f"these weights do not fit the {type(module).__name__}: {problem}")
    for name in module.pos_embed.state_dict():
        if prefix + name in state_dict:
            state_dict[f"{prefix}pos_embed.{name}"] = state_dict.pop(prefix + name)


def _save_pos_embed_at_the_top(module: Quadformer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """After a Quadformer's ``state_dict``: its position embedding's weights are named as they were before the kinds
    were modules (``xy_embed.y_table``, not ``pos_embed.xy_embed.y_table``), so that checkpoints keep one layout
    whichever version wrote or reads them. The Quadformer's entries are the last ones, so the order is kept."""
    _pos_embed_at_the_top(state_dict, prefix)


def _pos_embed_at_the_top(state_dict: dict, prefix: str) -> None:
    """Renames a Quadformer's ``pos_embed.<name>`` entries ``<name>``, in place, keeping its entries' order."""
    inside = f"{prefix}pos_embed."
    for key in [key for key in state_dict if key.startswith(prefix)]:
        state_dict[prefix + key[len(inside):] if key.startswith(inside) else key] = state_dict.pop(key)
