"""The Quadformer: a standard timm VisionTransformer that reads a mixed-resolution mosaic instead of a patch grid."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_images as _check_images, check_nan_policy
from ..grid import block_sides
from ..mosaic import Mosaic, tokenize
from ..pyramid import QuadtreeGeometry, default_max_patch_size
from ..scorers import Scorer, create_scorer
from .position import LearnedXYEmbed, leaf_table_embed, sincos_xy_embed

__all__ = ["Quadformer", "POS_EMBEDS"]

POS_EMBEDS = ("resample", "xy", "xy-learned")


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

    Inputs: images ``[B, C, H, W]`` with the ViT's C input channels (normalised as for the ViT; H, W multiples of
    max_patch_size; any float dtype: the ViT gets the tokens in its own dtype), or a prepared
    :class:`mixres.Mosaic` whose tokens have the ViT's patch size and channels.
    """

    def __init__(self, vit: nn.Module, n_patches: int = 100, scorer: str | Scorer = "pixel-blur",
                 min_patch_size: int | None = None, max_patch_size: int | None = None, pos_embed: str = "resample",
                 resize_mode: str = "area", scorer_kwargs: dict | None = None,
                 input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None,
                 nan_policy: str = "raise"):
        super().__init__()
        self.patch_size, self.in_chans, image_size = _check_vit(vit)
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {', '.join(POS_EMBEDS)}, got {pos_embed!r}")
        if pos_embed == "resample" and vit.pos_embed is None:
            raise ValueError("pos_embed='resample' needs the ViT's absolute position table, and this ViT has none "
                             "(pos_embed is None): use pos_embed='xy' or 'xy-learned'")
        if resize_mode not in ("area", "bilinear"):
            raise ValueError(f"resize_mode must be 'area' or 'bilinear', got {resize_mode!r}")
        min_patch_size = self.patch_size if min_patch_size is None else min_patch_size
        if max_patch_size is None:
            max_patch_size = default_max_patch_size(*image_size, min_patch_size)
        self.geometry = QuadtreeGeometry(*image_size, min_patch_size, max_patch_size)  # checks the sizes
        n_patches = self.geometry.check_n_patches(n_patches)

        self.vit = vit
        self.pos_embed_kind = pos_embed
        self.resize_mode = resize_mode
        self.n_patches = n_patches
        self.nan_policy = check_nan_policy(nan_policy)
        # A name is built with its arguments; a built scorer is checked (and arguments for it refused) there too.
        self._scorer = create_scorer(scorer, min_patch_size, max_patch_size, **(scorer_kwargs or {}))

        self.xy_embed = None
        if pos_embed != "resample":
            # The table of patch positions is not used: keep the prefix tokens' entries only (or nothing), so that
            # no parameter goes without a gradient. Contiguous strides, not the slice's: DDP's gradient buckets
            # take the parameter's strides, and autograd gives the gradient contiguous ones.
            if vit.pos_embed is not None:
                prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
                table = vit.pos_embed.data[:, :prefix].clone(memory_format=torch.contiguous_format)
                vit.pos_embed = nn.Parameter(table) if prefix else None
            if pos_embed == "xy-learned":
                self.xy_embed = LearnedXYEmbed(self.geometry.grid(min_patch_size), vit.embed_dim)
            elif vit.embed_dim % 4:
                raise ValueError(f"pos_embed='xy' needs an embedding width divisible by 4, got {vit.embed_dim}")

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
        names = {f"vit.{name}" for name in self.vit.no_weight_decay()}
        if self.xy_embed is not None:
            names |= {"xy_embed.y_table", "xy_embed.x_table"}
        return names

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def extra_repr(self) -> str:
        return (f"n_patches={self.n_patches}, patch sizes {self.min_patch_size}-{self.max_patch_size} px, "
                f"pos_embed={self.pos_embed_kind!r}, resize_mode={self.resize_mode!r}, scorer={self.scorer!r}")

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

    # ---------------------------------------------------------------------------------------------------- forward
    def check_images(self, images: Tensor) -> None:
        """A clear error for images the ViT cannot take: not ``[B, C, H, W]`` floats, or another channel count."""
        _check_images(images)
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
        handled by ``self.nan_policy``."""
        return tokenize(images, self.score(images), self.n_patches if n_patches is None else n_patches,
                        self.min_patch_size, self.max_patch_size, self.patch_size, self.resize_mode,
                        nan_policy=self.nan_policy)

    def embed(self, mosaic: Mosaic) -> Tensor:
        """A mosaic -> the token sequence entering the blocks, ``[B, prefix + N, D]``: leaves embedded by the
        ViT's patch-embedding weights, position embeddings added, prefix (class, register) tokens in front."""
        vit = self.vit
        if mosaic.patch_size != self.patch_size or mosaic.tokens.shape[2] != self.in_chans:
            raise ValueError(f"mosaic tokens must be [B, N, {self.in_chans}, {self.patch_size}, {self.patch_size}] "
                             f"(the ViT's channels and patch size), got {list(mosaic.tokens.shape)}")
        if mosaic.min_patch_size != self.min_patch_size:
            raise ValueError(f"mosaic has min_patch_size {mosaic.min_patch_size} but the model uses "
                             f"{self.min_patch_size}")
        proj = vit.patch_embed.proj
        x = F.linear(mosaic.flat_tokens().to(proj.weight.dtype), proj.weight.flatten(1), proj.bias)
        x = vit.patch_embed.norm(x)
        x = x + self._leaf_positions(mosaic).to(x.dtype)

        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(x.shape[0], -1, -1))
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            prefix = torch.cat(prefix, dim=1)
            if vit.pos_embed is not None and not vit.no_embed_class:
                prefix = prefix + vit.pos_embed[:, :vit.num_prefix_tokens]
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        return vit.pos_drop(x)

    def _leaf_positions(self, mosaic: Mosaic) -> Tensor:
        grid = (mosaic.image_size[0] // self.min_patch_size, mosaic.image_size[1] // self.min_patch_size)
        if self.pos_embed_kind == "xy":
            return sincos_xy_embed(mosaic.centers, self.vit.embed_dim)
        if self.pos_embed_kind == "xy-learned":
            return self.xy_embed(mosaic.centers, grid)
        vit = self.vit
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        table = vit.pos_embed[:, prefix:]
        table_grid = tuple(vit.patch_embed.grid_size)
        if table_grid != grid:
            from timm.layers import resample_abs_pos_embed

            table = resample_abs_pos_embed(table, new_size=list(grid), old_size=list(table_grid),
                                           num_prefix_tokens=0)
        table = table.reshape(grid[0], grid[1], -1)
        # Every leaf side the mosaic's grid can hold, not only up to the model's max_patch_size: a prepared mosaic
        # may have larger leaves, and checking its boxes would need a host synchronisation.
        largest = self.min_patch_size * block_sides(*grid)[-1]
        return leaf_table_embed(table, mosaic.boxes, self.min_patch_size, largest)

    def forward_features(self, x: Tensor | Mosaic, n_patches: int | None = None) -> Tensor:
        """Images or a mosaic -> the normed token features ``[B, prefix + N, D]``."""
        vit = self.vit
        mosaic = x if isinstance(x, Mosaic) else self.tokenize(x, n_patches)
        x = self.embed(mosaic)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        if getattr(vit, "grad_checkpointing", False) and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor | Mosaic, n_patches: int | None = None) -> Tensor:
        """Images ``[B, C, H, W]`` or a :class:`mixres.Mosaic` -> logits ``[B, num_classes]``. ``n_patches``
        overrides the model's budget for this call (images only; a mosaic has its own)."""
        if isinstance(x, Mosaic) and n_patches is not None and n_patches != x.n_patches:
            raise ValueError(f"n_patches={n_patches} was given with a mosaic of {x.n_patches} leaves")
        return self.forward_head(self.forward_features(x, n_patches))


def _check_vit(vit: nn.Module) -> tuple[int, int, tuple[int, int]]:
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
    """Before a Quadformer loads a state dict: adapts it (:func:`_adapt_weights`), then raises a RuntimeError that
    says which configuration differs (the number of classes, the embedding width, the depth, the position
    embedding...: :func:`mixres.checkpoints.explain_mismatch`) where the weights still do not fit, instead of
    torch's list of size mismatches. Nothing is loaded then. Names missing on either side are left to torch when
    ``strict`` is False."""
    from ..checkpoints import explain_mismatch

    _adapt_weights(module, state_dict, prefix)
    found = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    problem = explain_mismatch(module.state_dict(), found, keys=strict)
    if problem:
        raise RuntimeError(f"these weights do not fit the {type(module).__name__}: {problem}")


def _adapt_weights(module: Quadformer, state_dict: dict, prefix: str = "") -> None:
    """Lets a Quadformer load a plain timm ViT checkpoint (keys without ``vit.``), as timm's ``checkpoint_path=``
    and ``load_checkpoint`` do, or a :class:`mixres.models.UniformGrid`'s (keys under ``quadformer.``): keys are
    moved under ``vit.``; the position table is cut to the prefix entries (``xy`` embeddings) or resampled to the
    model's grid (``resample``), and learned xy tables are resampled (linearly, as the model reads them) to the
    model's grid. In place; a state dict that already fits is left as it is."""
    own = f"{prefix}vit."
    if not any(key.startswith(own) for key in state_dict):
        wrapped = f"{prefix}quadformer."  # a UniformGrid's: the Quadformer it wraps
        if any(key.startswith(wrapped + "vit.") for key in state_dict):
            for key in [key for key in state_dict if key.startswith(wrapped)]:
                state_dict[prefix + key[len(wrapped):]] = state_dict.pop(key)
        elif f"{prefix}patch_embed.proj.weight" in state_dict:
            for key in [key for key in state_dict if key.startswith(prefix)]:
                state_dict[own + key[len(prefix):]] = state_dict.pop(key)
    if module.xy_embed is not None:
        for name, table in module.xy_embed.named_parameters():
            key = f"{prefix}xy_embed.{name}"
            loaded = state_dict.get(key)
            if loaded is not None and loaded.dim() == 2 and loaded.shape[1] == table.shape[1] \
                    and loaded.shape[0] != table.shape[0]:
                # Another image size or min_patch_size: the table's rows span the leaf centres' range whatever
                # its length, so its values are resampled along it.
                state_dict[key] = F.interpolate(loaded.T[None].float(), size=table.shape[0], mode="linear",
                                                align_corners=True)[0].T.to(loaded.dtype).contiguous()
    key = f"{own}pos_embed"
    if key not in state_dict:
        return
    vit, table = module.vit, state_dict[key]
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    if vit.pos_embed is None:
        del state_dict[key]
    elif module.pos_embed_kind != "resample":
        state_dict[key] = table[:, :n_prefix]
    elif table.shape != vit.pos_embed.shape and table.dim() == 3 and table.shape[-1] == vit.pos_embed.shape[-1]:
        from timm.layers import resample_abs_pos_embed

        cells = table.shape[1] - n_prefix
        side = round(cells ** 0.5)
        if cells <= 0:
            raise RuntimeError(f"these weights have no position table for the patches (only its {table.shape[1]} "
                               f"prefix-token entries: a Quadformer's trained with pos_embed 'xy' or 'xy-learned'), "
                               f"which this model's pos_embed='resample' needs: build it with pos_embed='xy' or "
                               f"'xy-learned' (--pos-embed)")
        if side * side != cells:
            raise RuntimeError(f"these weights' position table has {cells} patch entries, not a square grid, and "
                               f"the model's {tuple(vit.patch_embed.grid_size)} grid differs: it cannot be "
                               f"resampled; build the model at the weights' image size (img_size)")
        state_dict[key] = resample_abs_pos_embed(table, new_size=list(vit.patch_embed.grid_size),
                                                 old_size=[side, side], num_prefix_tokens=n_prefix)
