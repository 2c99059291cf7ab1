"""The entropy scorer of APT (Choudhury et al., 2025, arXiv 2510.18091): no network, only the spread of a patch's
grey levels."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import check_int
from .base import Scorer, nan_where_pixels_are_not_finite

__all__ = ["Entropy"]

# ITU-R BT.601 luma weights of R, G, B.
_BT601_LUMA = (0.299, 0.587, 0.114)
# The most grey levels: a 16-bit image's. The histograms take bins float32 counts per patch of 2 * min_patch_size.
MAX_BINS = 2 ** 16


class Entropy(Scorer):
    """APT's criterion: the Shannon entropy, in **bits**, of the grey-level histogram of each patch.

    Grey is the ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` for 3 channels, the channel mean otherwise. It is
    clamped to ``value_range`` and quantised to ``bins`` equal levels (the top value falls in the last level). A
    patch of side s scores ``-sum_i p_i log2 p_i``, p_i being the fraction of its s*s pixels at level i: 0 for a
    flat patch, at most ``log2(bins)`` (all levels equally common). Higher entropy splits first.

    Bits, as in APT, so that its per-scale thresholds read the same; the unit does not change the split order. APT
    keeps every patch below a threshold whole, and so lets the token count vary; here the entropy only ranks the
    splits, and ``n_patches`` fixes the count. The score is not weighted by the patch's size: a patch's histogram
    is the average of its four quadrants', and entropy is concave, so a patch already scores at least the mean of
    its quadrants.

    Args:
        min_patch_size, max_patch_size: the tokenizer's smallest and largest leaf side, in pixels; their ratio is a
            power of two.
        bins: the number of grey levels, an int from 2 to 65536 (2**16, a 16-bit image's levels). The histograms
            take ``B * H * W / (2 * min_patch_size)**2 * bins`` float32 counts.
        value_range: ``(lo, hi)``, the grey values the levels span: (0, 1) for images in [0, 1], (0, 255) for
            8-bit values. Values outside are clamped into the first or last level, so normalised images (e.g. by
            ImageNet mean and std) need their own range. The levels are computed in float32 (float64 for float64
            images), so lo and hi must be finite and ordered in float32, and hi - lo at most its largest value.

    A patch that holds a NaN or Inf pixel (in any channel) scores NaN, at every level (see :class:`Scorer`).

    Example:
        >>> scorer = Entropy(16, 64, bins=32)
        >>> images = torch.rand(2, 3, 256, 256)
        >>> [m.shape for m in scorer(images)]      # patch sizes 64, 32
        [torch.Size([2, 4, 4]), torch.Size([2, 8, 8])]
        >>> mosaic = mixres.tokenize(images, scorer, n_patches=100)
    """

    def __init__(self, min_patch_size: int = 16, max_patch_size: int = 64, bins: int = 32,
                 value_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__(min_patch_size, max_patch_size)
        bins = check_int("bins", bins, 2, MAX_BINS, valid=f"an int >= 2 and at most {MAX_BINS} (2**16)")
        try:
            lo, hi = (float(bound) for bound in value_range)
        except (TypeError, ValueError):
            raise TypeError(f"value_range must be a pair of numbers (lo, hi), got {value_range!r}") from None
        lo32, hi32 = torch.tensor([lo, hi], dtype=torch.float32).tolist()
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"value_range must be finite with lo < hi, got {value_range!r}")
        if not (math.isfinite(lo32) and math.isfinite(hi32) and lo32 < hi32
                and math.isfinite(torch.tensor(hi32 - lo32, dtype=torch.float32).item())):
            raise ValueError(f"value_range must be finite with lo < hi in float32, where the grey levels are "
                             f"computed (|lo|, |hi| and hi - lo at most {torch.finfo(torch.float32).max:.4g}, and "
                             f"lo < hi after rounding to float32), got {value_range!r}")
        self.bins = bins
        self.value_range = (lo, hi)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, bins={self.bins}, value_range={self.value_range})"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Tensor]:
        """Scores ``images [B, C, H, W]`` (H, W multiples of max_patch_size).

        Memory is O(B*H*W): one histogram of ``bins`` counts per patch of side 2*min_patch_size, built with one
        scatter, and every coarser level summed from its quadrants.

        Returns:
            The score pyramid: one float32 map ``[B, H/s, W/s]`` per s = max_patch_size, ..., 2*min_patch_size
            (coarse to fine), on the images' device. Empty if the two sizes are equal.
        """
        geometry = self.geometry(images)
        if not geometry.splittable_sizes:
            return []
        if images.dtype in (torch.float16, torch.bfloat16):
            # Half precision would move grey values across level boundaries.
            images = images.float()
        finest = geometry.splittable_sizes[-1]
        counts = self._histograms(self._grey_levels(images), finest)
        pyramid = []
        for size in reversed(geometry.splittable_sizes):
            if size != finest:
                batch, rows, cols, bins = counts.shape
                counts = counts.view(batch, rows // 2, 2, cols // 2, 2, bins).sum(dim=(2, 4))
            # entr(p) = -p ln p, and 0 at p = 0; dividing by ln 2 gives bits.
            pyramid.append(torch.special.entr(counts / (size * size)).sum(dim=-1) / math.log(2))
        return nan_where_pixels_are_not_finite(pyramid[::-1], images, geometry)

    def _grey_levels(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, H, W]`` int64, each pixel's grey level in [0, bins)."""
        if images.shape[1] == 3:
            # Python-number weights: a weight tensor would be copied from the host, which synchronises on CUDA.
            red, green, blue = images.unbind(dim=1)
            grey = _BT601_LUMA[0] * red + _BT601_LUMA[1] * green + _BT601_LUMA[2] * blue
        else:
            grey = images.mean(dim=1)
        lo, hi = self.value_range
        # NaN would become a wild index; its patches are set to NaN afterwards, so any level does here.
        grey = grey.nan_to_num_(nan=lo).clamp_(lo, hi)
        return grey.sub_(lo).mul_(self.bins / (hi - lo)).long().clamp_(0, self.bins - 1)

    def _histograms(self, levels: Tensor, size: int) -> Tensor:
        """Grey levels ``[B, H, W]`` -> float32 counts ``[B, H/s, W/s, bins]``, one histogram per s x s patch."""
        batch, height, width = levels.shape
        rows, cols = height // size, width // size
        device = levels.device
        patch = ((torch.arange(batch, device=device).view(-1, 1, 1) * rows
                  + torch.arange(height, device=device).div(size, rounding_mode="floor").view(-1, 1)) * cols
                 + torch.arange(width, device=device).div(size, rounding_mode="floor"))
        index = patch.mul_(self.bins).add_(levels).flatten()
        # A scatter into a buffer of known size, not bincount, which reads the largest index back to the host.
        # float32 counts are exact integers up to 2**24, the pixels of a 4096 x 4096 patch.
        counts = torch.zeros(batch * rows * cols * self.bins, device=device)
        counts.scatter_add_(0, index, counts.new_ones(()).expand(index.numel()))
        return counts.view(batch, rows, cols, self.bins)
