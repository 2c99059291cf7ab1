"""The feature-based scorer of the Quadformer paper: how much a small CNN's features change under a blur."""
from __future__ import annotations

import copy
import itertools
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import read_state_dict
from .base import Scorer, explaining_channel_mismatch, nan_where_pixels_are_not_finite, without_non_finite

__all__ = ["FeatureBased"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
# The layers a classifier ends with, after its last feature map: what truncation drops.
_HEAD_LAYERS = (nn.Linear, nn.Dropout, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


class FeatureBased(Scorer):
    """The paper's feature-based scorer (its best): how much a backbone's features change when the image is blurred.

    For the level of patch size s, the whole image is blurred by the factor f = s / min_patch_size: a bilinear
    downsample to ``H/f x W/f``, then a bilinear upsample back to ``H x W`` (``align_corners=False``, no
    antialiasing). The importance map ``[B, h, w]`` is the channel mean of the squared difference between the
    backbone's feature maps of the blurred and of the original image (h = H / stride: ``H/32`` for the default).
    Each s x s candidate patch then takes the average of the map over its area where the map is finer than the
    level's grid, the map's own cell where it is as fine, and a bilinear sample (``align_corners=False``) at its
    centre where the map is coarser: the authors' code raises an error in that last case, but small patches are
    legitimate requests, so we interpolate.

    The original image and its blurred versions go through the backbone as one batch of ``(L + 1) * B`` images,
    L the number of splittable patch sizes: the fastest way, but the activations are L + 1 times those of the
    batch itself; score a large batch in chunks if that does not fit in memory.

    Args:
        backbone: what computes the feature maps, one of:

            - a torchvision classification model name (``torchvision.models.list_models(torchvision.models)``),
              truncated before its classifier: its ``features`` module if it has one, otherwise every child module
              but the trailing pooling, dropout and linear layers. Tested: shufflenet_v2_*, resnet*, mobilenet_v3_*,
              efficientnet_*. The default, ShuffleNetV2 x0.5, keeps ``conv5``: stride 32, about 0.34 M parameters;
            - a timm model name (``timm.list_models()``), created with ``features_only=True, out_indices=(-1,)``.
              Names known to both libraries mean torchvision's; prefix ``"timm:"`` (``"timm:resnet18"``) for timm's;
            - an ``nn.Module`` mapping images ``[B, C, H, W]`` to a feature map ``[B, K, h, w]``, or to a list,
              tuple or dict of them (the last is used). It is used as given, with its own weights.

            The stride is read off the feature map's shape, so any convolutional backbone serves.
        weights: where a named backbone's weights come from: a local file holding a state dict (possibly wrapped
            as ``{"state_dict": ...}`` or ``{"model": ...}``; the full classifier's state dict is accepted, the keys
            of the dropped classifier being ignored), or ``"DEFAULT"`` for torchvision's or timm's own pretrained
            download (needs internet). A file can also be loaded into an ``nn.Module`` backbone.
        min_patch_size, max_patch_size: the tokenizer's smallest and largest leaf side, in pixels; their ratio is a
            power of two.
        random_init: with ``weights=None``, keep the named backbone's random initialisation. Its scores are not
            meaningful (a ``UserWarning`` says so): for tests and benchmarks only.
        normalize: standardise the images with the ImageNet mean and std first; they must then be RGB in [0, 1].
        autocast_dtype: run the backbone under ``torch.autocast`` with this dtype (``torch.bfloat16`` or
            ``torch.float16``); None runs it in the backbone's own dtype. The squared differences are always
            taken in float32.

    Speed: the images go through a copy of the backbone prepared for inference, with the same function: each
    BatchNorm folded into the convolution before it (``torch.fx.experimental.optimization.fuse``, where torch.fx can
    trace the backbone), weights and activations channels-last. On a 2-core AVX2 CPU that is about 2x faster for
    ShuffleNetV2 (``benchmarks/RESULTS.md``, issue 14). The copy is made at the first call, and again whenever a
    parameter or buffer of the backbone has changed since (in place, or replaced, or moved). The scores then differ
    from the backbone's own by float32 rounding, and are as close to the float64 definition: against it, both are
    within 1e-6 to 1e-5 of each level's largest score for ShuffleNetV2, ResNet-18 and MobileNetV3 with BatchNorm
    statistics of random images (``tests/test_scorer_features.py``). The backbone itself is used where a forward
    hook or pre-hook is registered on it or on one of its modules (the hook then sees every call), and under
    ``torch.compile``.

    The scorer owns its backbone: it puts it in eval mode at every call, and moves it to the images' device at the
    first call on that device. The images are converted to the backbone's dtype (float16 and bfloat16 images to a
    float32 backbone, for example); they must have the channels its first convolution takes (3 for the named
    backbones), else a ``ValueError`` says so.

    Non-finite pixels: the backbone sees NaN and Inf pixels (also those that overflow in the conversion to its
    dtype or in the normalisation) as 0 (after the normalisation: the ImageNet mean), so that they do not spread
    through its receptive fields; every patch that holds one scores NaN, at every level (see :class:`Scorer`).

    Example:
        >>> scorer = FeatureBased(weights="shufflenetv2_x0.5-f707e7126e.pth")  # torchvision's file, saved locally
        >>> images = torch.rand(2, 3, 256, 256)
        >>> [m.shape for m in scorer(images)]      # patch sizes 64, 32
        [torch.Size([2, 4, 4]), torch.Size([2, 8, 8])]
        >>> mosaic = mixres.tokenize(images, scorer, n_patches=100)
    """

    def __init__(self, backbone: str | nn.Module = "shufflenet_v2_x0_5", weights: str | os.PathLike | None = None,
                 min_patch_size: int = 16, max_patch_size: int = 64, random_init: bool = False,
                 normalize: bool = True, autocast_dtype: torch.dtype | None = None):
        super().__init__(min_patch_size, max_patch_size)
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}")
        if weights is not None and random_init:
            raise ValueError(f"random_init=True contradicts weights={weights!r}: pass one or the other")
        pretrained = weights == "DEFAULT"
        if isinstance(backbone, nn.Module):
            if pretrained:
                raise ValueError("weights='DEFAULT' needs a backbone name: an nn.Module backbone keeps its own "
                                 "weights, or loads them from a file passed as weights")
            self.backbone_name = type(backbone).__name__
            self.backbone = backbone
        elif isinstance(backbone, str):
            if weights is None and not random_init:
                raise ValueError(
                    f"backbone {backbone!r} needs weights: pass weights='path/to/state_dict.pt' (a local file), "
                    f"weights='DEFAULT' (torchvision's or timm's pretrained download, needs internet), or "
                    f"random_init=True (random features: for tests only, the scores are not meaningful)")
            self.backbone_name = backbone
            self.backbone = _named_backbone(backbone, pretrained)
        else:
            raise TypeError(f"backbone must be a torchvision or timm model name or an nn.Module, got "
                            f"{type(backbone).__name__}")
        if random_init:
            warnings.warn(f"FeatureBased: backbone {self.backbone_name!r} is randomly initialised, so its scores are "
                          f"not meaningful; pass weights= to score for real", UserWarning, stacklevel=2)
        if weights is not None and not pretrained:
            _load_weights(self.backbone, weights, self.backbone_name)
        self.backbone.eval()
        self.normalize = normalize
        self.autocast_dtype = autocast_dtype
        self._device = None  # where the backbone is; None until the first call
        self._prepared = None  # (the backbone's tensors when it was copied, the copy prepared for inference)
        # (device, dtype) -> (mean, std), made once: a call then copies nothing from the host (CUDA graphs).
        self._normalisation = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backbone={self.backbone_name!r}, min_patch_size={self.min_patch_size}, "
                f"max_patch_size={self.max_patch_size})")

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        """Scores ``images [B, C, H, W]`` (H, W multiples of max_patch_size; RGB in [0, 1] when ``normalize``).

        Returns:
            The score pyramid: one map ``[B, H/s, W/s]`` per s = max_patch_size, ..., 2*min_patch_size (coarse to
            fine), float32, on the images' device. Empty if the two sizes are equal.
        """
        geometry = self.geometry(images)
        sizes = geometry.splittable_sizes
        if not sizes:
            return []
        if self.normalize and images.shape[1] != 3:
            raise ValueError(f"normalize=True standardises RGB images with the ImageNet mean and std, but images "
                             f"have {images.shape[1]} channels: pass normalize=False for other inputs")
        backbone = self._backbone_on(images.device)
        # The backbone's dtype now, not when it was built: its owner may have converted it since.
        images = images.to(next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32))
        if self.normalize:
            # Before the blur: both are linear and the blur's weights sum to 1, so the order does not matter.
            mean, std = self._mean_and_std(images)
            images = (images - mean) / std
        pixels = images
        images = without_non_finite(images)
        versions = [images] + [_blur(images, size // self.min_patch_size) for size in sizes]
        batch = torch.cat(versions).contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None), \
                explaining_channel_mismatch(backbone, images, f"backbone {self.backbone_name!r}"):
            features = self._feature_map(self._for_inference(backbone), batch)
        features = features.float().unflatten(0, (len(versions), images.shape[0]))
        importance = (features[1:] - features[0]).square_().mean(dim=2)  # [L, B, h, w]
        pyramid = [_to_grid(level, geometry.grid(size)) for level, size in zip(importance, sizes)]
        return nan_where_pixels_are_not_finite(pyramid, pixels, geometry)

    def _backbone_on(self, device: torch.device) -> nn.Module:
        if device != self._device:
            self.backbone.to(device)
            self._device = device
        return self.backbone.eval()

    def _mean_and_std(self, images: Tensor) -> tuple[Tensor, Tensor]:
        key = (images.device, images.dtype)
        if key not in self._normalisation:
            self._normalisation[key] = (images.new_tensor(IMAGENET_MEAN).view(3, 1, 1),
                                        images.new_tensor(IMAGENET_STD).view(3, 1, 1))
        return self._normalisation[key]

    def _for_inference(self, backbone: nn.Module) -> nn.Module:
        """The module the images go through: the copy of ``backbone`` prepared for inference, made again if the
        backbone's tensors have changed since; the backbone itself under torch.compile (which fuses on its own),
        where a hook watches it, or where its tensors' versions cannot be read (inference tensors)."""
        if torch.compiler.is_compiling() or _has_hooks(backbone):
            return backbone
        tensors = list(itertools.chain(backbone.parameters(), backbone.buffers()))
        if any(tensor.is_inference() for tensor in tensors):
            return backbone
        # In-place changes bump a tensor's version; a replaced or moved tensor has another address.
        state = [(tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device) for tensor in tensors]
        if self._prepared is None or self._prepared[0] != state:
            self._prepared = (state, _prepared_for_inference(backbone))
        return self._prepared[1]

    def _feature_map(self, backbone: nn.Module, images: Tensor) -> Tensor:
        output = backbone(images)
        if isinstance(output, Mapping):
            output = list(output.values())
        if isinstance(output, (list, tuple)) and output:
            output = output[-1]
        if not isinstance(output, Tensor) or output.dim() != 4 or output.shape[0] != images.shape[0]:
            got = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"backbone {self.backbone_name!r} must map images {list(images.shape)} to a feature "
                             f"map [B, K, h, w] (or a list of them), got {got}")
        return output


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _prepared_for_inference(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` (in eval mode) that computes the same function faster: BatchNorm folded into the
    convolution before it where torch.fx can trace the backbone (one convolution instead of a convolution and a
    pass over its output), and channels-last weights, which oneDNN and cuDNN run faster than NCHW for these
    small-channel networks (benchmarks/profile_feature_scorer.py shows where the time goes). The backbone itself
    where it cannot be copied."""
    try:
        prepared = copy.deepcopy(backbone).eval()
    except Exception:  # noqa: BLE001 (a user's module may hold anything)
        return backbone
    from torch.fx.experimental.optimization import fuse  # here: it imports sympy, slow for `import mixres`

    try:
        prepared = fuse(prepared, inplace=True)
    except Exception:  # noqa: BLE001 (tracing runs the module's Python on proxies, which raises whatever it raises)
        pass  # not traceable: the BatchNorms stay
    return prepared.to(memory_format=torch.channels_last)


def _blur(images: Tensor, factor: int) -> Tensor:
    """A bilinear downsample by ``factor``, then a bilinear upsample back (``align_corners=False``, no antialias)."""
    height, width = images.shape[-2:]
    small = F.interpolate(images, size=(height // factor, width // factor), mode="bilinear", align_corners=False)
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def _to_grid(importance: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, h, w]`` -> ``[B, rows, cols]``: cell averages where the map is at least as fine as the grid (the map
    itself where equal), a bilinear resampling where it is coarser."""
    (rows, cols), (height, width) = grid, importance.shape[-2:]
    if height >= rows and width >= cols:
        return F.adaptive_avg_pool2d(importance.unsqueeze(1), grid).squeeze(1)
    return F.interpolate(importance.unsqueeze(1), size=grid, mode="bilinear", align_corners=False).squeeze(1)


def _named_backbone(name: str, pretrained: bool) -> nn.Module:
    import timm  # here, not at the top: `import mixres` should not pay for importing both model zoos
    import torchvision

    if not name.startswith(TIMM_PREFIX) and name in torchvision.models.list_models(module=torchvision.models):
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
        return _truncate_classifier(model)
    timm_name = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(timm_name):
        raise ValueError(f"backbone {name!r} is neither a torchvision classification model "
                         f"(torchvision.models.list_models(torchvision.models)) nor a timm model (timm.list_models()); "
                         f"or pass an nn.Module that maps images to a feature map")
    return timm.create_model(timm_name, pretrained=pretrained, features_only=True, out_indices=(-1,))


def _truncate_classifier(model: nn.Module) -> nn.Module:
    """A torchvision classifier without its head, the last feature map out. Child names are kept, so that the
    state dict keys are the full model's (less the head's) and its checkpoints load."""
    if isinstance(getattr(model, "features", None), nn.Module):
        return nn.Sequential(OrderedDict(features=model.features))
    children = list(model.named_children())
    while children and _is_head(children[-1][1]):
        children.pop()
    return nn.Sequential(OrderedDict(children))


def _is_head(module: nn.Module) -> bool:
    if isinstance(module, nn.Sequential):
        return all(_is_head(child) for child in module)
    return isinstance(module, _HEAD_LAYERS)


def _load_weights(backbone: nn.Module, path: str | os.PathLike, name: str) -> None:
    state = read_state_dict(path)
    own = backbone.state_dict()
    where = f"weights file {os.fspath(path)!r} does not fit backbone {name!r}"
    # BatchNorm's batch counter is absent from old checkpoints and unused in eval mode.
    missing = [key for key in own if key not in state and not key.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{where}: it lacks {len(missing)} of the backbone's {len(own)} keys, such as {missing[:5]}; "
                         f"keys of the file that the backbone does not have: {[k for k in state if k not in own][:5]}")
    mismatched = [f"{key}: {list(state[key].shape)} in the file, {list(value.shape)} in the backbone"
                  for key, value in own.items() if key in state and state[key].shape != value.shape]
    if mismatched:
        raise ValueError(f"{where}: {len(mismatched)} tensors differ in shape (another variant of the model?), "
                         f"such as {mismatched[:3]}")
    # Checked first so that a failure leaves the backbone as it was. Not strict: the keys of the classifier's
    # head, which the truncated backbone lacks, are ignored.
    backbone.load_state_dict(state, strict=False)
