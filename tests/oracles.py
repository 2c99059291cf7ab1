"""Independent oracles for mixres, written from the design notes (docs/design.md) and the documented contracts, with
plain Python and torch primitives.

Nothing here imports mixres: a bug in the package (its checks, its pyramid helpers, its reference implementation,
its kernels or their shared headers) cannot pass a test by being on both sides of the comparison. Each oracle is
the slow, obvious reading of the contract, image by image and leaf by leaf, on whatever device its inputs are on.
"""
import contextlib
import heapq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# How far a kernel's tokens (pixels in [0, 1]) may be from the oracle's, F.interpolate in resize_dtype(dtype): the
# kernels accumulate in float32 (float64 for float64) and round once, so in half precision the final rounding (at
# most the unit roundoff, 2^-11 or 2^-8) dominates; in float32, the rounding of sums of up to a few thousand pixels.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@contextlib.contextmanager
def one_thread():
    """Runs an oracle (as a context manager or a decorator) on one intra-op thread: its thousands of tiny ops, and
    their backward, gain nothing from more, and on a busy machine each parallel region can wait milliseconds for
    its threads (tens of times slower in all)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def patch_sizes(min_patch_size: int, max_patch_size: int) -> list[int]:
    """Every leaf side, coarse to fine: s_max, s_max / 2, ..., s_min."""
    sizes = [max_patch_size]
    while sizes[-1] > min_patch_size:
        sizes.append(sizes[-1] // 2)
    assert sizes[-1] == min_patch_size, "s_max / s_min must be a power of two"
    return sizes


def as_maps(pyramid, min_patch_size: int, max_patch_size: int) -> list[torch.Tensor]:
    """A pyramid given as a list (coarse to fine) or a dict {patch size: map}, as a list."""
    if isinstance(pyramid, dict):
        return [pyramid[size] for size in patch_sizes(min_patch_size, max_patch_size)[:-1]]
    return list(pyramid)


def pack(pyramid, batch: int) -> torch.Tensor:
    """The packed pyramid [B, P] the ops take: each map [B, H/s, W/s] flattened row-major, coarse to fine, side by
    side; float64 if any map is, else float32."""
    maps = list(pyramid)
    dtype = torch.float64 if any(m.dtype == torch.float64 for m in maps) else torch.float32
    if not maps:
        return torch.zeros(batch, 0, dtype=dtype)
    return torch.cat([m.reshape(batch, m.shape[1] * m.shape[2]).to(dtype) for m in maps], dim=1)


def unpack(packed: torch.Tensor, height: int, width: int, min_patch_size: int, max_patch_size: int):
    """The maps of a packed pyramid, coarse to fine: the inverse of :func:`pack`."""
    grids = [(height // s, width // s) for s in patch_sizes(min_patch_size, max_patch_size)[:-1]]
    chunks = packed.split([rows * cols for rows, cols in grids], dim=1)
    return [chunk.reshape(packed.shape[0], *grid) for chunk, grid in zip(chunks, grids, strict=True)]


def greedy_leaves(score, height: int, width: int, min_patch_size: int, max_patch_size: int, n_splits: int,
                  thresholds=None, picks: list | None = None) -> list[tuple[int, int, int]]:
    """One image's leaves (y, x, size), sorted by (y, x), after docs/design.md's greedy with a heap of Python tuples:
    from the grid of s_max roots, up to ``n_splits`` times, split the splittable leaf (side > s_min) of the highest
    score, ties to the smallest top-left corner (y, x), into its four quadrants. With ``thresholds`` (a list, one
    per splittable size coarse to fine), the loop stops at the first step whose best leaf scores at or below the
    threshold of its size (DESIGN.md's stopping rule). ``score[size][row][col]``: the maps as nested lists. Each
    split appends (score, size) of the leaf it splits to ``picks``, when given: the greedy order.

    Leaves are disjoint, so no two share a corner and (-score, y, x) orders the heap exactly. Scores and thresholds
    are compared as Python floats, which hold float16, bfloat16, float32 and float64 values exactly."""
    sizes = patch_sizes(min_patch_size, max_patch_size)
    heap, final = [], []

    def add(y, x, size):
        if size > min_patch_size:
            heapq.heappush(heap, (-score[size][y // size][x // size], y, x, size))
        else:
            final.append((y, x, size))

    for y in range(0, height, max_patch_size):
        for x in range(0, width, max_patch_size):
            add(y, x, max_patch_size)
    for _ in range(n_splits):
        negated, y, x, size = heap[0]
        if thresholds is not None and -negated <= thresholds[sizes.index(size)]:
            break
        heapq.heappop(heap)
        if picks is not None:
            picks.append((-negated, size))
        half = size // 2
        for dy, dx in ((0, 0), (0, half), (half, 0), (half, half)):
            add(y + dy, x + dx, half)
    return sorted(final + [leaf[1:] for leaf in heap])


def _score_lists(pyramid, min_patch_size: int, max_patch_size: int, b: int) -> dict:
    maps = as_maps(pyramid, min_patch_size, max_patch_size)
    return {size: m[b].tolist() for size, m in zip(patch_sizes(min_patch_size, max_patch_size)[:-1], maps,
                                                   strict=True)}


def quadtree(pyramid, height: int, width: int, min_patch_size: int, max_patch_size: int, n_patches: int,
             batch: int | None = None) -> torch.Tensor:
    """Boxes [B, n_patches, 3] int32 by docs/design.md's greedy (:func:`greedy_leaves`), one image at a time."""
    batch = as_maps(pyramid, min_patch_size, max_patch_size)[0].shape[0] if batch is None else batch
    n_roots = (height // max_patch_size) * (width // max_patch_size)
    assert n_patches >= n_roots and (n_patches - n_roots) % 3 == 0, "unreachable n_patches"
    boxes = [greedy_leaves(_score_lists(pyramid, min_patch_size, max_patch_size, b), height, width, min_patch_size,
                           max_patch_size, (n_patches - n_roots) // 3) for b in range(batch)]
    return torch.tensor(boxes, dtype=torch.int32).reshape(batch, n_patches, 3)


def greedy_order(pyramid, height: int, width: int, min_patch_size: int, max_patch_size: int, n_splits: int,
                 batch: int | None = None) -> list[list[tuple[float, int]]]:
    """Per image, the (score, size) of the leaf that each of :func:`greedy_leaves`' ``n_splits`` splits splits, in
    order. The greedy order does not depend on where it stops (DESIGN.md's prefix property), so under a threshold an
    image stops before the first of them that scores at or below the threshold of its size."""
    batch = as_maps(pyramid, min_patch_size, max_patch_size)[0].shape[0] if batch is None else batch
    orders = []
    for b in range(batch):
        orders.append([])
        greedy_leaves(_score_lists(pyramid, min_patch_size, max_patch_size, b), height, width, min_patch_size,
                      max_patch_size, n_splits, picks=orders[-1])
    return orders


def quadtree_adaptive(pyramid, height: int, width: int, min_patch_size: int, max_patch_size: int, max_patches: int,
                      budgets=None, thresholds=None, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN.md's adaptive budgets: the greedy of :func:`quadtree`, which for image b also stops before a split that
    would take it past ``budgets[b]`` leaves (``max_patches`` without budgets), and at the first step whose best
    leaf scores at or below ``thresholds`` (one number, or one per splittable size coarse to fine).

    Returns boxes [B, max_patches, 3] int32, image b's leaves in raster order then (0, 0, 0) boxes, and lengths [B]
    int32, its number of leaves."""
    maps = as_maps(pyramid, min_patch_size, max_patch_size)
    batch = maps[0].shape[0] if batch is None else batch
    n_levels = len(patch_sizes(min_patch_size, max_patch_size)) - 1
    if thresholds is not None:
        thresholds = thresholds.tolist() if isinstance(thresholds, torch.Tensor) else thresholds
        thresholds = [float(thresholds)] * n_levels if isinstance(thresholds, (int, float)) else \
            [float(t) for t in thresholds]
        assert len(thresholds) == n_levels
    budgets = [max_patches] * batch if budgets is None else [int(b) for b in budgets]
    n_roots = (height // max_patch_size) * (width // max_patch_size)
    boxes = torch.zeros(batch, max_patches, 3, dtype=torch.int32)
    lengths = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        assert n_roots <= budgets[b] <= max_patches and (budgets[b] - n_roots) % 3 == 0, "unreachable budget"
        leaves = greedy_leaves(_score_lists(pyramid, min_patch_size, max_patch_size, b), height, width,
                               min_patch_size, max_patch_size, (budgets[b] - n_roots) // 3, thresholds)
        lengths[b] = len(leaves)
        if leaves:
            boxes[b, :len(leaves)] = torch.tensor(leaves, dtype=torch.int32)
    return boxes, lengths


@one_thread()
def interpolate_each_leaf(images: torch.Tensor, boxes: torch.Tensor, patch_size: int, mode: str) -> torch.Tensor:
    """tokens [B, N, C, p, p] by one F.interpolate per leaf: the definition of extract_patches, as slowly as it gets;
    zeros for the padding box (0, 0, 0). Differentiable with respect to the images, to any order, by F.interpolate's
    own autograd."""
    batch, n_leaves, _ = boxes.shape
    out = images.new_empty(batch, n_leaves, images.shape[1], patch_size, patch_size)
    for b in range(batch):
        for n in range(n_leaves):
            y, x, s = boxes[b, n].tolist()
            if (y, x, s) == (0, 0, 0):  # docs/design.md: a padding box's token is zero (and so is its gradient)
                out[b, n] = 0
                continue
            crop = images[b:b + 1, :, y:y + s, x:x + s]
            out[b, n] = F.interpolate(crop, size=(patch_size, patch_size), mode=mode,
                                      align_corners=False if mode == "bilinear" else None)[0]
    return out


def leaf_centers(boxes: torch.Tensor, min_patch_size: int) -> torch.Tensor:
    """Centres [B, N, 2] (y, x) in units of the s_min grid, exactly (float64): (corner + size / 2) / s_min - 0.5."""
    boxes = boxes.double()
    return (boxes[..., :2] + boxes[..., 2:] / 2) / min_patch_size - 0.5


def assert_centers_close(centers: torch.Tensor, expected: torch.Tensor):
    """float32 centres against the exact ones. The kernels round twice (the division by s_min, then the subtraction
    of 0.5), each time by at most half a float32 ulp (2^-24 relative) of a value at most |centre| + 0.5: 2^-22
    relative plus 2^-22 absolute bounds the error."""
    assert centers.dtype == torch.float32
    torch.testing.assert_close(centers.double(), expected, rtol=2**-22, atol=2**-22)


def saliency_pyramid(saliency: torch.Tensor, height: int, width: int, min_patch_size: int,
                     max_patch_size: int) -> list[torch.Tensor]:
    """The score pyramid of a dense saliency map [B, h, w], as tokenize documents it: the map brought to the s_min
    grid (each cell's average when the grid divides it evenly, bilinear resampling otherwise), then each patch's
    score the sum of the cells it covers. In float32 (float64 for a float64 map)."""
    dtype = torch.float64 if saliency.dtype == torch.float64 else torch.float32
    saliency = saliency.to(dtype)
    batch, h, w = saliency.shape
    rows, cols = height // min_patch_size, width // min_patch_size
    if h % rows == 0 and w % cols == 0:
        cells = saliency.reshape(batch, rows, h // rows, cols, w // cols).mean((2, 4))
    else:
        cells = F.interpolate(saliency[:, None], size=(rows, cols), mode="bilinear", align_corners=False)[:, 0]
    pyramid = []
    for size in patch_sizes(min_patch_size, max_patch_size)[:-1]:
        k = size // min_patch_size
        pyramid.append(cells.reshape(batch, rows // k, k, cols // k, k).sum((2, 4)))
    return pyramid


@one_thread()
def per_patch_pyramid(images: torch.Tensor, min_patch_size: int, max_patch_size: int, score) -> list[torch.Tensor]:
    """A score pyramid the slow, obvious way: for each splittable size s, coarse to fine, every s x s patch crop
    ``images[b, ..., rows, cols]`` cut out one by one, and ``score(crops, s)`` of all of them (one number per crop)
    laid out as a float64 map [B, H/s, W/s]."""
    batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    pyramid = []
    for size in patch_sizes(min_patch_size, max_patch_size)[:-1]:
        rows, cols = height // size, width // size
        crops = [images[b, ..., row * size:(row + 1) * size, col * size:(col + 1) * size]
                 for b in range(batch) for row in range(rows) for col in range(cols)]
        scores = score(torch.stack(crops), size) if crops else torch.zeros(0)
        pyramid.append(scores.double().reshape(batch, rows, cols))
    return pyramid


def pixel_blur_pyramid(images: torch.Tensor, min_patch_size: int, max_patch_size: int) -> list[torch.Tensor]:
    """docs/design.md's pixel-blur scores in float64: blur(p) = bilinear upsampling of p's area downsampling to s_min,
    and the score MSE(p, blur(p)) * s."""
    def score(crops, size):
        small = F.interpolate(crops, size=(min_patch_size, min_patch_size), mode="area")
        blurred = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
        return (crops - blurred).square().mean((1, 2, 3)) * size

    return per_patch_pyramid(images.double(), min_patch_size, max_patch_size, score)


@dataclass
class Mosaic:
    tokens: torch.Tensor  # [B, N, C, p, p], differentiable with respect to the images (see tokenize for the dtype)
    boxes: torch.Tensor  # [B, N, 3] int32
    centers: torch.Tensor  # [B, N, 2] float64, exact
    lengths: torch.Tensor | None = None  # [B] int32, each image's leaves, for an adaptive budget; None otherwise


def resize_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which F.interpolate defines a kernel's tokens: the images' own for float32 and float64 (the
    bilinear weights are computed in it: float64 ones would differ from float32's by up to 2^-24 of the leaf's
    side); float64 for half precision, which the kernels resize in float32 and round once."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float64


def tokenize(images: torch.Tensor, scores, n_patches: int, min_patch_size: int = 16, max_patch_size: int = 64,
             patch_size: int | None = None, mode: str = "area", budgets=None, thresholds=None) -> Mosaic:
    """docs/design.md's tokenize from the oracles above: ``scores`` a pyramid (list or dict) or a dense saliency map
    [B, h, w]; tokens resized in :func:`resize_dtype` of the images'. With ``budgets`` (one per image) or
    ``thresholds`` (as :func:`quadtree_adaptive` takes them), the adaptive mosaic, padded to ``n_patches`` leaves
    (N_max), with its lengths."""
    batch, _, height, width = images.shape
    if isinstance(scores, torch.Tensor):
        scores = saliency_pyramid(scores, height, width, min_patch_size, max_patch_size)
    lengths = None
    if budgets is None and thresholds is None:
        boxes = quadtree(scores, height, width, min_patch_size, max_patch_size, n_patches, batch)
    else:
        boxes, lengths = quadtree_adaptive(scores, height, width, min_patch_size, max_patch_size, n_patches, budgets,
                                           thresholds, batch)
    tokens = interpolate_each_leaf(images.to(resize_dtype(images.dtype)), boxes.to(images.device),
                                   patch_size or min_patch_size, mode)
    return Mosaic(tokens, boxes, leaf_centers(boxes, min_patch_size), lengths)


def assert_matches(mosaic, expected: Mosaic):
    """A mixres Mosaic against the oracle's: the same boxes (and lengths, for an adaptive one), centres to float32
    rounding, tokens to the tolerance of their dtype."""
    if expected.lengths is None:
        assert getattr(mosaic, "lengths", None) is None
    else:
        assert torch.equal(mosaic.lengths.cpu(), expected.lengths)
    assert torch.equal(mosaic.boxes.cpu(), expected.boxes)
    assert_centers_close(mosaic.centers.cpu(), expected.centers)
    tolerance = TOLERANCE[mosaic.tokens.dtype]
    torch.testing.assert_close(mosaic.tokens.cpu().double(), expected.tokens.detach().cpu().double(),
                               rtol=tolerance, atol=tolerance)
