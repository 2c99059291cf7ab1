"""Grad-CAM (Selvaraju et al., 2017) as a scorer: the Quadformer paper's label-aware oracle, from any classifier.

Why our own hooks rather than pytorch-grad-cam (jacobgil), the well-kept library for this: a scorer runs on every
batch before tokenization, and there that library costs more than the few hooks here. It copies the activations and
gradients to the host (``.cpu()``) and computes the maps in NumPy, resizing and min-max normalising each image with
OpenCV; its ``loss.backward()`` zeroes the model's ``.grad`` and then fills it; it leaves the model in eval mode; it
needs a hand-written ``reshape_transform`` for ViTs; and it is not a dependency of mixres. Here one forward and one
backward score the whole batch on the images' device, with nothing copied to the host and no synchronisation (the
default target layer costs one more forward, of one image, per image size); the backward reaches only the target layer's
activations (no parameter ``.grad``); the layers before the target record no autograd graph, so scoring takes about
an inference pass's memory; and the model's flags come back as they were.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..pyramid import saliency_to_pyramid
from .base import Scorer, explaining_channel_mismatch, nan_where_pixels_are_not_finite, without_non_finite

__all__ = ["GradCAM"]

# Where ViTs keep their transformer blocks: timm's VisionTransformer (and its relatives), torchvision's.
_BLOCK_LISTS = ("blocks", "encoder.layers")
# Pooling to a fixed size (VGG's 7x7) resamples the last feature map rather than computing a new one.
_FIXED_SIZE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class _Target(NamedTuple):
    name: str  # for messages
    module: nn.Module
    reads_input: bool  # the activations are the module's input, not its output


class GradCAM(Scorer):
    """Label-aware Grad-CAM saliency of a classifier, summed over each candidate patch.

    For activations A ``[B, K, h, w]`` of a target layer and the logit y_c of class c, each channel's weight is the
    spatial mean of dy_c/dA_k and the map is ``cam = ReLU(sum_k w_k A_k)`` ``[B, h, w]``. A patch's score is the sum
    of the map over its area (:func:`mixres.saliency_to_pyramid`, which resamples the map bilinearly to the
    min_patch_size grid where it is coarser): the tokenizer splits where the evidence for class c lies.

    One forward and one backward score the whole batch: the backward starts from the sum over the batch of each
    image's chosen logit, and in eval mode images do not interact, so each image gets its own gradients. The model
    runs in eval mode, its modules' training flags are restored afterwards, the gradients are taken with respect to
    the activations only (the parameters' ``.grad`` and ``requires_grad`` are left alone), and the hooks are
    removed even when the forward fails. It works under ``torch.no_grad()``.

    Args:
        model: a classifier ``images [B, C, H, W] -> logits [B, classes]``, on the images' device, such as a timm
            or torchvision model.
        target_layer: the module whose output gives A, or its dotted name in ``model`` (``"layer4"``,
            ``"blocks.10"``). Outputs may be feature maps ``[B, K, h, w]`` (``[B, h, w, K]`` when the model
            declares ``output_fmt == "NHWC"``, as timm's Swin does) or tokens ``[B, N, K]``; tokens lose the
            model's prefix tokens (timm's ``num_prefix_tokens``: class and register tokens; one class token for
            torchvision's ViT) and the rest are laid out on the patch grid, whose shape follows from the images'
            aspect ratio. A module called several times in one forward gives its last call's output.
            None finds one, on a probe forward of one image per image size:

            - ViTs, whose blocks (``model.blocks`` in timm, ``model.encoder.layers`` in torchvision) output tokens
              ``[B, N, K]``: the tokens *entering* the last block. The last block's own output would not do for
              a class-token head: the head reads only the class token, which no other token reaches after the
              last block, so every patch token's gradient, and the map, would be zero. Entering the last block,
              the patch tokens still reach the class token through its attention.
            - Otherwise (CNNs): the last module, in the order their forwards return, whose output is a feature
              map with h > 1 and w > 1, i.e. the last stage before the global pooling (``layer4`` in a ResNet).
              Adaptive pooling layers do not count: VGG's pooling to 7x7 only resamples ``features``.
        min_patch_size, max_patch_size: the tokenizer's smallest and largest leaf side, in pixels; their ratio is a
            power of two.
        labels: the classes to explain when a call passes none (as :func:`mixres.tokenize` does): an int for every
            image, or an integer Tensor ``[B]``. None explains each image's top-1 prediction.

    The images are converted to the model's dtype (float16 and bfloat16 images to a float32 model, float32 images
    to a model in ``.to(torch.bfloat16)``); they must have the channels its first convolution takes, else a
    ``ValueError`` says so. Non-finite pixels: the model sees NaN and Inf pixels as 0 (the dataset mean, for
    normalised inputs), so that they do not reach the logits and spoil the whole image's map, and every patch that
    holds one scores NaN, at every level (see :class:`Scorer`).

    Example:
        >>> model = torchvision.models.resnet50(weights="DEFAULT")
        >>> mosaic = mixres.tokenize(images, GradCAM(model, labels=targets), n_patches=100)
        >>> pyramid = GradCAM(model)(images)        # each image's predicted class
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module | str | None = None, min_patch_size: int = 16,
                 max_patch_size: int = 64, labels: Tensor | int | None = None):
        super().__init__(min_patch_size, max_patch_size)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_label_type(labels)
        self.model = model
        self.labels = labels
        self._target = None if target_layer is None else _named_target(model, target_layer)
        self._default_targets: dict[tuple[int, int], _Target] = {}  # by image size (H, W)

    def __repr__(self) -> str:
        target = "None" if self._target is None else repr(self._target.name)
        return (f"GradCAM({type(self.model).__name__}, target_layer={target}, "
                f"min_patch_size={self.min_patch_size}, max_patch_size={self.max_patch_size})")

    def __call__(self, images: Tensor, labels: Tensor | int | None = None) -> list[Tensor]:
        """Scores ``images [B, C, H, W]`` (H, W multiples of max_patch_size) for ``labels``: an int for every
        image, an integer Tensor ``[B]``, or None for the constructor's ``labels`` (if None too, each image's top-1
        prediction). Labels on the CPU are checked against the number of classes; labels on a GPU are not, since
        that would wait for the device.

        Returns:
            The score pyramid: one map ``[B, H/s, W/s]`` per s = max_patch_size, ..., 2*min_patch_size (coarse to
            fine), float32 (float64 for a float64 model), on the images' device, not requiring grad.
        """
        geometry = self.geometry(images)
        parameter = next(self.model.parameters(), None)
        if parameter is not None and parameter.device != images.device:
            # The model is the caller's: moving it here would surprise them, and would copy it at every call.
            raise ValueError(f"model is on {parameter.device} but images are on {images.device}: move the model "
                             f"(model.to(images.device)) before scoring")
        labels = _check_labels(self.labels if labels is None else labels, images.shape[0])
        if parameter is not None and parameter.is_floating_point():
            images = images.to(parameter.dtype)
        pixels = images
        images = without_non_finite(images)
        training_flags = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            with explaining_channel_mismatch(self.model, images, f"model {type(self.model).__name__}"):
                target = self._target or self._default_target(images)
                activations, gradients = self._activations_and_gradients(images, labels, target)
        finally:
            for module, training in training_flags:
                module.training = training
        activations = self._feature_map(activations, target, images)
        gradients = self._feature_map(gradients, target, images)
        dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            channel_weights = gradients.to(dtype).mean(dim=(2, 3))
            cam = torch.einsum("bk,bkhw->bhw", channel_weights, activations.to(dtype)).relu_()
        return nan_where_pixels_are_not_finite(saliency_to_pyramid(cam, geometry), pixels, geometry)

    def _activations_and_gradients(self, images: Tensor, labels: Tensor | None,
                                   target: _Target) -> tuple[Tensor, Tensor]:
        """The target's activations (as the model produced them) and the gradients of the chosen logits."""
        captured = []

        def capture(value):
            if not isinstance(value, Tensor):
                raise TypeError(f"target_layer {target.name!r} must give a Tensor, got {type(value).__name__}")
            # From here on the forward records a graph, which reaches back to the activation and no further.
            torch.set_grad_enabled(True)
            activation = value.detach().requires_grad_()
            captured.append(activation)
            # A copy goes on, so that in-place ops further on (ReLU(inplace=True)) leave the activation intact.
            return activation.clone()

        if target.reads_input:
            handle = target.module.register_forward_pre_hook(lambda module, args: (capture(args[0]), *args[1:]))
        else:
            handle = target.module.register_forward_hook(lambda module, args, output: capture(output))
        try:
            # No graph for the layers before the target: the hook turns gradients on when it is reached.
            with torch.no_grad():
                logits = self.model(images)
        finally:
            handle.remove()
        if not captured:
            raise ValueError(f"target_layer {target.name!r} is not called by the model's forward: pass a module "
                             f"that computes the prediction")
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError(f"model must return logits [B, classes], got "
                             f"{list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        if labels is None:
            labels = logits.argmax(dim=1)
        elif labels.device.type == "cpu":
            if ((labels < 0) | (labels >= logits.shape[1])).any():
                raise ValueError(f"labels must be class indices in [0, {logits.shape[1]}), got {labels.tolist()}")
            # Non-blocking: a blocking copy would wait for the device. It is safe from pageable memory too, which
            # the copy stages before it returns.
            labels = labels.to(logits.device, non_blocking=True)
        with torch.enable_grad():
            chosen = logits.gather(1, labels[:, None]).sum()
        (gradient,) = torch.autograd.grad(chosen, captured[-1], allow_unused=True)
        if gradient is None:
            raise ValueError(f"the logits do not depend on target_layer {target.name!r}: pass a module that "
                             f"computes the prediction")
        return captured[-1].detach(), gradient

    def _default_target(self, images: Tensor) -> _Target:
        size = tuple(images.shape[-2:])
        if size not in self._default_targets:
            self._default_targets[size] = _find_default_target(self.model, images[:1])
        return self._default_targets[size]

    def _feature_map(self, value: Tensor, target: _Target, images: Tensor) -> Tensor:
        """The target's activations or gradients as ``[B, K, h, w]`` (see ``target_layer``)."""
        height, width = images.shape[-2:]
        if value.dim() == 3:
            prefix = _prefix_tokens(self.model)
            rows, cols = _token_grid(value.shape[1] - prefix, height, width, target.name)
            return value[:, prefix:].unflatten(1, (rows, cols)).permute(0, 3, 1, 2)
        if value.dim() != 4:
            raise ValueError(f"target_layer {target.name!r} must give a feature map [B, K, h, w] or tokens "
                             f"[B, N, K], got shape {list(value.shape)}")
        if getattr(self.model, "output_fmt", None) == "NHWC":
            value = value.permute(0, 3, 1, 2)
        rows, cols = value.shape[-2:]
        if rows * width != cols * height:
            raise ValueError(f"target_layer {target.name!r} gives a {rows}x{cols} map, which lacks the images' "
                             f"{height}x{width} aspect ratio: pass a layer that outputs a spatial feature map")
        return value


def _named_target(model: nn.Module, target_layer) -> _Target:
    if isinstance(target_layer, str):
        try:
            return _Target(target_layer, model.get_submodule(target_layer), reads_input=False)
        except AttributeError:
            raise ValueError(f"target_layer {target_layer!r} is not a submodule of {type(model).__name__}; "
                             f"valid names are those of model.named_modules(), e.g. "
                             f"{[name for name, _ in model.named_children()]}") from None
    if isinstance(target_layer, nn.Module):
        for name, module in model.named_modules():
            if module is target_layer:
                return _Target(name, module, reads_input=False)
        raise ValueError(f"target_layer {type(target_layer).__name__} is not a submodule of "
                         f"{type(model).__name__}")
    raise TypeError(f"target_layer must be a module of the model, its dotted name, or None (found automatically), "
                    f"got {type(target_layer).__name__}")


def _find_default_target(model: nn.Module, image: Tensor) -> _Target:
    """The default ``target_layer`` (see :class:`GradCAM`), from a probe forward of ``image [1, C, H, W]``."""
    returned = []  # (name, output shape), in the order the modules' forwards return

    def record(name):
        def hook(module, args, output):
            if isinstance(output, Tensor) and not isinstance(module, _FIXED_SIZE_POOLS):
                returned.append((name, output.shape))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    last_shapes = dict(returned)
    for blocks_name in _BLOCK_LISTS:
        try:
            blocks = model.get_submodule(blocks_name)
        except AttributeError:
            continue
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
            block_name, block = list(blocks.named_children())[-1]
            name = f"{blocks_name}.{block_name}"
            if len(last_shapes.get(name, ())) == 3:
                return _Target(f"input of {name}", block, reads_input=True)
    spatial_dims = slice(1, 3) if getattr(model, "output_fmt", None) == "NHWC" else slice(2, 4)
    for name, shape in reversed(returned):
        if len(shape) == 4 and min(shape[spatial_dims]) > 1:
            return _Target(name, model.get_submodule(name), reads_input=False)
    raise ValueError(f"found no target layer in {type(model).__name__}: no module outputs a feature map larger "
                     f"than 1x1 and there are no ViT blocks ({' or '.join(_BLOCK_LISTS)}); pass target_layer")


def _prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens: timm counts its class and register tokens; torchvision's ViT has one."""
    if hasattr(model, "num_prefix_tokens"):
        return model.num_prefix_tokens
    return 1 if hasattr(model, "class_token") else 0


def _token_grid(n_tokens: int, height: int, width: int, target_name: str) -> tuple[int, int]:
    """The rows x cols patch grid of ``n_tokens`` tokens with the image's aspect ratio."""
    rows = round(math.sqrt(n_tokens * height / width)) if n_tokens > 0 else 0
    cols = n_tokens // rows if rows else 0
    if rows == 0 or rows * cols != n_tokens or rows * width != cols * height:
        raise ValueError(f"target_layer {target_name!r} gives {n_tokens} patch tokens, which do not form a grid "
                         f"with the images' {height}x{width} aspect ratio")
    return rows, cols


def _check_label_type(labels) -> None:
    if labels is None or (isinstance(labels, int) and not isinstance(labels, bool)):
        return
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or \
            labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an int, an integer Tensor [B] of class indices, or None (the model's top-1 "
                        f"prediction), got {got}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape [B], got {list(labels.shape)}")


def _check_labels(labels, batch: int) -> Tensor | None:
    """``labels`` as int64 ``[B]`` (on their own device), or None for the top-1 prediction."""
    _check_label_type(labels)
    if labels is None:
        return None
    if isinstance(labels, int):
        labels = torch.tensor(labels)
    if labels.dim() == 1 and labels.shape[0] != batch:
        raise ValueError(f"labels must have shape [B] = [{batch}], got {list(labels.shape)}")
    return labels.long().expand(batch)
