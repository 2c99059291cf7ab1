"""Fuzzing every public op with hostile input: random shapes (0-sized dimensions and empty batches included),
dtypes, memory layouts, boxes, patch sizes, modes, image sizes and scores (NaN and Inf included).

Only two outcomes are allowed:
- a correct result, checked against an independent oracle (tests/oracles.py: F.interpolate leaf by leaf and its
  autograd, the greedy quadtree image by image, per-patch scores, loops, float64 formulas), and the reference too;
- a ValueError or a TypeError. A RuntimeError is allowed in one case only: the allocator's, for an output too
  large to allocate (an explicit request for it; its message says so). Anything else fails: another exception
  (IndexError, AttributeError, a RuntimeError of a kernel), a wrong result, a crash, a hang.
The test knows which inputs are valid, from its own statement of each op's contract or by breaking valid inputs
on purpose, so an error where a result is due fails too, and so does a result where an error is due.

Each fuzzer runs in a subprocess (helpers.run_script) with a timeout and a cap on the memory it may map, so that a
segfault, a hang or a runaway allocation fails its test instead of killing pytest or the machine. The examples are
derandomized, as in the whole suite (tests/hypothesis_seed.py; MIXRES_HYPOTHESIS_SEED draws others, and the
subprocesses draw from the same seed): a failure reproduces by running the test again, and hypothesis prints the
falsifying example (and a blob for @reproduce_failure). MIXRES_FUZZ_EXAMPLES=n runs n examples per fuzzer.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mixres
from mixres import reference

import oracles
from helpers import run_script
from hypothesis_seed import seeded
from oracles import interpolate_each_leaf

EXAMPLES = int(os.environ.get("MIXRES_FUZZ_EXAMPLES", "60"))
INT32_MAX = 2**31 - 1
MAX_PATCH_SIDE = 1 << 15

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NOT_FLOATS = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided", "expanded", "offset"]
# Tolerance of a result in each dtype against an oracle on the same (rounded) inputs, all in [0, 1): see there.
TOLERANCE = oracles.TOLERANCE


def fuzz_settings(function):
    # Run by a script, not by pytest: conftest.py does not see them, so they take the suite's seed here.
    return seeded(settings(max_examples=EXAMPLES, suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])(function))


# ------------------------------------------------------------------------------------------------------- inputs


def make_tensor(shape, dtype, layout, generator_seed, specials=0):
    """A tensor of ``shape`` and ``dtype`` in the memory ``layout``: random values in [0, 1) (small integers for
    integer dtypes), with ``specials`` NaN/+Inf/-Inf written at random places of a floating-point one."""
    generator = torch.Generator().manual_seed(generator_seed)
    shape = tuple(shape)

    def values(base_shape):
        base = torch.rand(base_shape, generator=generator, dtype=torch.float64)
        if base.numel() and dtype.is_floating_point:
            flat = base.view(-1)
            for k in range(specials):
                position = torch.randint(flat.numel(), (1,), generator=generator).item()
                flat[position] = (math.nan, math.inf, -math.inf)[k % 3]
        if dtype == torch.bool:
            return base > 0.5
        if not (dtype.is_floating_point or dtype.is_complex):
            return (base * 100).to(dtype)
        return base.to(dtype)

    if layout == "channels_last" and len(shape) == 4:
        return values(shape).to(memory_format=torch.channels_last)
    if layout == "transposed" and len(shape) >= 2:
        return values(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "strided" and shape:
        doubled = values(tuple(2 * size for size in shape))
        return doubled[tuple(slice(None, None, 2) for _ in shape)]
    if layout == "expanded" and shape:
        return values((1,) + shape[1:]).expand(shape)
    if layout == "offset" and shape:
        return values((shape[0] + 1,) + shape[1:])[1:]
    return values(shape)


def make_int_tensor(rows, shape, dtype, layout):
    """``rows`` (a list of int32 values, in row-major order of ``shape``) as a tensor of ``dtype`` and ``layout``."""
    flat = torch.tensor(rows, dtype=torch.int64).reshape(shape)
    tensor = flat.to(dtype) if dtype != torch.bool else flat != 0
    if layout == "transposed" and tensor.dim() >= 2:
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and tensor.dim() >= 1:
        doubled = torch.zeros(tuple(2 * s for s in tensor.shape), dtype=tensor.dtype)
        doubled[tuple(slice(None, None, 2) for _ in tensor.shape)] = tensor
        return doubled[tuple(slice(None, None, 2) for _ in tensor.shape)]
    return tensor


def broken_parts(parts):
    """Which ``parts`` of an input are drawn free of their constraints: none for about half the examples (a valid
    input, whose result is checked), else one or two (an input that is mostly invalid)."""
    return st.sampled_from([1, 0, 2]).flatmap(lambda count: st.frozensets(st.sampled_from(parts), min_size=count,
                                                                         max_size=count))


EXTREME_INTS = [-2**31, -2**31 + 1, -1, 0, 1, 2**30, 2**31 - 8, 2**31 - 1]


@st.composite
def box_values(draw, height, width, inside):
    """One box (y, x, size): inside the image, or (sometimes) anything an int32 holds."""
    if inside or (height > 0 and width > 0 and draw(st.booleans())):
        size = draw(st.integers(1, min(height, width)))
        return [draw(st.integers(0, height - size)), draw(st.integers(0, width - size)), size]
    coordinate = st.sampled_from(EXTREME_INTS) | st.integers(-5, 45) | st.integers(-2**31, 2**31 - 1)
    return [draw(coordinate), draw(coordinate), draw(coordinate)]


@st.composite
def boxes_for(draw, batch, height, width, any_kind=True, inside=True):
    """Boxes [B, N, 3] for images of ``batch`` x ``height`` x ``width``, in any memory layout. Unless ``any_kind``:
    int32, of that shape, and (if ``inside``) inside the image. With ``any_kind``: sometimes of another shape or
    dtype, with any values."""
    n_leaves = draw(st.integers(0, 5)) if height > 0 and width > 0 or not inside or any_kind else 0
    shape = [batch, n_leaves, 3]
    deformation = draw(st.sampled_from(["none"] * 4 + ["batch", "last", "rank2", "rank4"])) if any_kind else "none"
    if deformation == "batch":
        shape[0] = batch + draw(st.sampled_from([-1, 1])) if batch > 0 else 1
    elif deformation == "last":
        shape[2] = draw(st.sampled_from([2, 4]))
    elif deformation == "rank2":
        shape = [n_leaves, 3]
    elif deformation == "rank4":
        shape = [batch, n_leaves, 1, 3]
    count = math.prod(shape)
    if shape[-1] == 3:
        box = box_values(height, width, inside=inside and not any_kind)
        rows = [value for _ in range(count // 3) for value in draw(box)]
    else:
        rows = draw(st.lists(st.integers(-5, 45), min_size=count, max_size=count))
    dtypes = [torch.int32] * 2 + [torch.int64, torch.int16, torch.float32, torch.bool] if any_kind else [torch.int32]
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    return make_int_tensor(rows, shape, draw(st.sampled_from(dtypes)), layout)


def valid_boxes(boxes, batch, height, width):
    """Whether ``boxes`` is what extract_patches takes for these images: the ops' contract, restated."""
    if boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[2] != 3 or boxes.dtype != torch.int32:
        return False
    y, x, size = boxes.long().unbind(-1)
    return bool(((size >= 1) & (y >= 0) & (x >= 0) & (y + size <= height) & (x + size <= width)).all())


@st.composite
def images_like(draw, any_kind=True, batch=None, height=None, width=None, min_channels=0):
    """Images [B, C, H, W] of a floating dtype (NaN and Inf pixels included), in any memory layout; with
    ``any_kind`` sometimes of another rank or of a non-floating dtype."""
    shape = [draw(st.integers(0, 3)) if batch is None else batch, draw(st.integers(min_channels, 3)),
             draw(st.integers(0, 40)) if height is None else height,
             draw(st.integers(0, 40)) if width is None else width]
    if any_kind:
        rank = draw(st.sampled_from([4, 4, 3, 5]))
        shape = shape[:rank] if rank < 4 else shape + [2] * (rank - 4)
    dtype = draw(st.sampled_from(FLOATS + NOT_FLOATS if any_kind else FLOATS))
    return make_tensor(shape, dtype, draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 2**16)),
                       specials=draw(st.sampled_from([0] * 4 + [1, 3])))


PATCH_SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16])
ANY_PATCH_SIZES = PATCH_SIZES | st.sampled_from([0, -1, MAX_PATCH_SIDE + 1, 2**31, 2**40, -2**40])
MODES = st.sampled_from(["area", "bilinear"])
ANY_MODES = MODES | st.sampled_from(["nearest", "", "AREA"])


# ------------------------------------------------------------------------------------------------------- outcomes


ALLOCATOR_ERROR = "can't allocate memory"


def outcome(function, *args, allocation_may_fail=False, **kwargs):
    """The result of ``function``, or the ValueError or TypeError it raised; with ``allocation_may_fail``, also
    the allocator's RuntimeError. Any other exception propagates and fails the test."""
    try:
        return function(*args, **kwargs)
    except (ValueError, TypeError) as error:
        assert str(error), f"{type(error).__name__} without a message"
        return error
    except RuntimeError as error:
        if allocation_may_fail and ALLOCATOR_ERROR in str(error):
            return error
        raise


def assert_refused(*outcomes):
    """Every outcome is an error, all of one type (the C++ op, its wrapper and the reference agree)."""
    for result in outcomes:
        assert isinstance(result, (ValueError, TypeError)), f"bad input gave a result instead of an error: {result}"
    assert len({type(result) for result in outcomes}) == 1, f"implementations disagree: {outcomes}"


def assert_result(result):
    assert not isinstance(result, Exception), f"valid input was refused: {type(result).__name__}: {result}"


def assert_same(result, expected):
    """Equal bit for bit, NaN included."""
    torch.testing.assert_close(result, expected, rtol=0, atol=0, equal_nan=True)


def assert_close_to_oracle(result, expected, dtype, rtol=None, atol=None):
    """Close where the oracle is finite (to ``TOLERANCE[dtype]`` unless ``rtol`` and ``atol`` are given);
    non-finite where it is not. Which of NaN and Inf an Inf pixel gives is F.interpolate's implementation detail
    (0 * Inf = NaN for a tap of weight 0, except where it copies), not part of the contract."""
    assert result.shape == expected.shape, (result.shape, expected.shape)
    finite = expected.isfinite()
    assert not result[~finite].isfinite().any(), "a finite result where the oracle is NaN or Inf"
    rtol, atol = (TOLERANCE[dtype],) * 2 if rtol is None else (rtol, atol)
    torch.testing.assert_close(result[finite].double(), expected[finite].double(), rtol=rtol, atol=atol)


# -------------------------------------------------------------------------------------------- extract_patches


@fuzz_settings
@given(st.data())
def fuzz_extract_patches(data):
    broken = data.draw(broken_parts(["images", "boxes", "patch_size", "mode"]))
    images = data.draw(images_like(any_kind="images" in broken))
    batch, height, width = (images.shape[0], images.shape[-2], images.shape[-1]) if images.dim() >= 2 else (0,) * 3
    boxes = data.draw(boxes_for(batch, height, width, any_kind="boxes" in broken))
    patch_size = data.draw(ANY_PATCH_SIZES if "patch_size" in broken else PATCH_SIZES)
    mode = data.draw(ANY_MODES if "mode" in broken else MODES)
    results = [outcome(op, images, boxes, patch_size, mode) for op in
               (torch.ops.mixres.extract_patches, mixres.ops.extract_patches, reference.extract_patches)]
    valid = (images.dim() == 4 and images.dtype in FLOATS and mode in ("area", "bilinear")
             and 0 < patch_size <= MAX_PATCH_SIDE and valid_boxes(boxes, batch, height, width))
    if not valid:
        assert_refused(*results)
        return
    for result in results:
        assert_result(result)
        assert result.shape == (batch, boxes.shape[1], images.shape[1], patch_size, patch_size)
        assert result.dtype == images.dtype
    assert_same(results[0], results[1])
    if images.shape[1] == 0:  # F.interpolate takes no image without channels: nothing to compare
        return
    expected = interpolate_each_leaf(images.double(), boxes, patch_size, mode)
    assert_close_to_oracle(results[0], expected, images.dtype)
    # The reference is F.interpolate batched: the oracle in the images' own dtype.
    torch.testing.assert_close(results[2], interpolate_each_leaf(images, boxes, patch_size, mode), equal_nan=True)


@fuzz_settings
@given(st.data())
def fuzz_extract_patches_backward(data):
    broken = data.draw(broken_parts(["grad_tokens", "boxes", "size", "mode"]))
    batch, channels = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 3))
    height, width = data.draw(st.integers(0, 40)), data.draw(st.integers(0, 40))
    if "size" in broken:
        height = data.draw(st.integers(-2, 40) | st.sampled_from([2**31, 2**40, 2**62]))
        width = data.draw(st.integers(-2, 40) | st.sampled_from([2**31, 2**40]))
    boxes = data.draw(boxes_for(batch, max(height, 0), max(width, 0), any_kind="boxes" in broken))
    n_leaves = boxes.shape[1] if boxes.dim() >= 2 else 0
    shape = [batch, n_leaves, channels, data.draw(PATCH_SIZES)]
    shape.append(shape[3])
    dtype = data.draw(st.sampled_from(FLOATS))
    if "grad_tokens" in broken:
        shape[3] = shape[4] = data.draw(st.sampled_from([shape[3], 0, MAX_PATCH_SIDE + 1]))
        shape[1] += data.draw(st.sampled_from([0, 0, 1]))
        shape[4] += data.draw(st.sampled_from([0, 0, 1]))
        dtype = data.draw(st.sampled_from(FLOATS + NOT_FLOATS))
    if shape[3] > MAX_PATCH_SIDE:  # an expanded tensor: the check must come before any copy
        grad_tokens = torch.ones((), dtype=dtype).expand(shape)
    else:
        grad_tokens = make_tensor(shape, dtype, data.draw(st.sampled_from(LAYOUTS)), data.draw(st.integers(0, 2**16)),
                                  specials=data.draw(st.sampled_from([0] * 4 + [1, 3])))
    patch = shape[3]
    mode = data.draw(ANY_MODES if "mode" in broken else MODES)
    result = outcome(torch.ops.mixres.extract_patches_backward, grad_tokens, boxes, height, width, mode,
                     allocation_may_fail=True)
    # The gradient, accumulated in at most 8 bytes an element, must be addressable (its bytes counted in an int64).
    addressable = max(batch, 1) * max(channels, 1) * max(height, 1) * max(width, 1) * 8 < 2**63
    valid = (grad_tokens.dtype in FLOATS and shape[3] == shape[4] and 0 < patch <= MAX_PATCH_SIDE
             and mode in ("area", "bilinear") and height >= 0 and width >= 0 and addressable
             and valid_boxes(boxes, batch, height, width) and boxes.shape[1] == shape[1])
    if not valid:
        assert_refused(result)
        return
    if batch * channels * height * width * 8 > 1 << 31:  # more than the subprocess may allocate
        assert isinstance(result, RuntimeError), result
        return
    assert_result(result)
    assert result.shape == (batch, channels, height, width) and result.dtype == grad_tokens.dtype
    # The oracle: the vector-Jacobian product of F.interpolate leaf by leaf (its own autograd), in float64.
    images = torch.zeros(batch, channels, height, width, dtype=torch.float64, requires_grad=True)
    expected = torch.zeros_like(images)
    if channels > 0:  # F.interpolate takes no image without channels (and their gradient is empty)
        tokens = interpolate_each_leaf(images, boxes, patch, mode)
        if tokens.requires_grad:  # else no leaf reads a pixel
            (expected,) = torch.autograd.grad(tokens, images, grad_tokens.double())
    assert_close_to_oracle(result, expected, grad_tokens.dtype)


# ----------------------------------------------------------------------------- build_quadtree, QuadtreeGeometry


@st.composite
def geometries(draw, any_kind):
    """(height, width, min_patch_size, max_patch_size), small; with ``any_kind`` sometimes invalid: sizes that are
    not powers of two apart, zero or negative, sides that are not multiples or past INT32_MAX."""
    lo = draw(st.sampled_from([1, 2, 3, 4, 8, 16]) | (st.sampled_from([0, -4, 2**40]) if any_kind else st.nothing()))
    ratio = draw(st.sampled_from([1, 2, 4, 8]) | (st.sampled_from([3, 6, 0]) if any_kind else st.nothing()))
    hi = lo * ratio
    sides = []
    for _ in range(2):
        side = draw(st.integers(1, 4)) * hi
        sides.append(draw(st.sampled_from([side] * 4 + [side + 1, 0, -hi, 2**31, 2**40])) if any_kind else side)
    return sides[0], sides[1], lo, hi


def geometry_is_valid(height, width, lo, hi):
    return (lo > 0 and hi >= lo and hi % lo == 0 and (hi // lo) & (hi // lo - 1) == 0 and 0 < height <= INT32_MAX
            and 0 < width <= INT32_MAX and height % hi == 0 and width % hi == 0)


def level_sizes(lo, hi):
    sizes, size = [], hi
    while size >= lo:
        sizes.append(size)
        size //= 2
    return sizes


def assert_mosaic(boxes, height, width, lo, hi):
    """Each image's boxes tile it exactly, every leaf aligned to its size, in raster order of the corners."""
    sizes = level_sizes(lo, hi)
    for image in boxes.tolist():
        covered = torch.zeros(height, width, dtype=torch.int32)
        for y, x, size in image:
            assert size in sizes and y % size == 0 and x % size == 0, (y, x, size)
            covered[y:y + size, x:x + size] += 1
        assert (covered == 1).all()
        corners = [(y, x) for y, x, _ in image]
        assert corners == sorted(corners)


@fuzz_settings
@given(st.data())
def fuzz_build_quadtree(data):
    broken = data.draw(broken_parts(["geometry", "n_patches", "scores"]))
    height, width, lo, hi = data.draw(geometries(any_kind="geometry" in broken))
    valid_geometry = geometry_is_valid(height, width, lo, hi)
    geometry = outcome(mixres.QuadtreeGeometry, height, width, lo, hi)
    assert isinstance(geometry, mixres.QuadtreeGeometry) == valid_geometry, geometry
    n_scores = sum((height // s) * (width // s) for s in level_sizes(lo, hi)[:-1]) if valid_geometry else 3
    n_roots = (height // hi) * (width // hi) if valid_geometry else 1
    max_leaves = (height // lo) * (width // lo) if valid_geometry else 1
    budgets = st.sampled_from([n_roots + 3 * k for k in range(4) if n_roots + 3 * k <= max_leaves]
                              + [max_leaves] * (max_leaves <= 4096))
    if "n_patches" in broken:
        budgets = st.sampled_from([n_roots - 1, n_roots + 1, max_leaves + 3, 0, -3, 2**62])
    n_patches = data.draw(budgets)
    batch = data.draw(st.integers(0, 3))
    columns, dtype, specials = n_scores, data.draw(st.sampled_from([torch.float32, torch.float64])), 0
    if "scores" in broken:
        columns += data.draw(st.sampled_from([0, -1, 1]))
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32, torch.bool]))
        specials = data.draw(st.sampled_from([0, 1, 2]))
    scores = make_tensor([batch, max(columns, 0)], dtype, data.draw(st.sampled_from(LAYOUTS)),
                         data.draw(st.integers(0, 2**16)), specials=specials)
    if data.draw(st.booleans()) and dtype.is_floating_point:
        scores = (scores * 3).floor()  # many ties, broken by raster order
    args = (scores, height, width, lo, hi, n_patches)
    results = [outcome(op, *args) for op in
               (torch.ops.mixres.build_quadtree, mixres.ops.build_quadtree, reference.build_quadtree)]
    valid = (valid_geometry and n_patches >= n_roots and n_patches <= max_leaves and (n_patches - n_roots) % 3 == 0
             and scores.shape[1] == n_scores and dtype in (torch.float32, torch.float64)
             and bool(scores.isfinite().all()))
    if not valid:
        assert_refused(*results)
        return
    for result in results:
        assert_result(result)
        assert result.shape == (batch, n_patches, 3) and result.dtype == torch.int32
    expected = oracles.quadtree(oracles.unpack(scores, height, width, lo, hi), height, width, lo, hi, n_patches,
                                batch=batch)
    for result in results:
        assert torch.equal(result, expected)
    assert_mosaic(results[0], height, width, lo, hi)


# ---------------------------------------------------------------------------------------------- leaf_centers


@fuzz_settings
@given(st.data())
def fuzz_leaf_centers(data):
    broken = data.draw(broken_parts(["boxes", "min_patch_size"]))
    boxes = data.draw(boxes_for(data.draw(st.integers(0, 3)), 64, 64, any_kind="boxes" in broken, inside=False))
    min_patch_size = data.draw(st.sampled_from([1, 3, 16, 2**24 + 1, 2**40, 2**62]))
    if "min_patch_size" in broken:
        min_patch_size = data.draw(st.sampled_from([0, -16, -2**62]))
    results = [outcome(op, boxes, min_patch_size) for op in
               (torch.ops.mixres.leaf_centers, mixres.ops.leaf_centers, reference.leaf_centers)]
    if not (boxes.dim() == 3 and boxes.shape[2] == 3 and boxes.dtype == torch.int32 and min_patch_size > 0):
        assert_refused(*results)
        return
    for result in results:
        assert_result(result)
        assert result.shape == (*boxes.shape[:2], 2) and result.dtype == torch.float32
    # Every device and the reference round alike: bit for bit.
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    corner, size = boxes[..., :2].double(), boxes[..., 2:].double()
    expected = (corner + size / 2) / min_patch_size - 0.5
    # Four float32 roundings, each at most half an ulp of the largest magnitude in play.
    bound = 4 * 2**-24 * ((corner.abs() + size.abs() / 2) / min_patch_size + 0.5)
    assert ((results[0].double() - expected).abs() <= bound).all()


# ------------------------------------------------------------------------------------------ pixel_blur_scores


@fuzz_settings
@given(st.data())
def fuzz_pixel_blur_scores(data):
    broken = data.draw(broken_parts(["images", "sizes", "sides"]))
    lo = data.draw(st.sampled_from([1, 2, 3, 4, 8]))
    hi = lo * data.draw(st.sampled_from([1, 2, 4, 8]))
    if "sizes" in broken:
        lo = data.draw(st.sampled_from([lo, 0, -2]))
        hi = data.draw(st.sampled_from([lo * 3, 2 * MAX_PATCH_SIDE, -hi, lo // 2]))
    side = hi if 0 < hi <= 64 else 1
    height, width = data.draw(st.integers(1, 3)) * side, data.draw(st.integers(1, 3)) * side
    if "sides" in broken:
        height = data.draw(st.sampled_from([height, height + 1, 0]))
        width = data.draw(st.sampled_from([width + 1, width - 1, 0]))
    images = data.draw(images_like(any_kind="images" in broken, batch=data.draw(st.integers(0, 2)),
                                   height=max(height, 0), width=max(width, 0),
                                   min_channels=0 if "images" in broken else 1))
    results = [outcome(op, images, lo, hi) for op in
               (torch.ops.mixres.pixel_blur_scores, mixres.ops.pixel_blur_scores, reference.pixel_blur_scores)]
    valid = (images.dim() == 4 and images.dtype in FLOATS and images.shape[1] > 0 and hi <= MAX_PATCH_SIDE
             and geometry_is_valid(images.shape[-2], images.shape[-1], lo, hi))
    if not valid:
        assert_refused(*results)
        return
    height, width = images.shape[-2:]
    n_scores = sum((height // s) * (width // s) for s in level_sizes(lo, hi)[:-1])
    out_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    for result in results:
        assert_result(result)
        assert result.shape == (images.shape[0], n_scores) and result.dtype == out_dtype
    assert_same(results[0], results[1])
    # The oracle in float64; the ops widen half-precision images to float32 and compute in it.
    tolerance = (1e-12, 1e-14) if images.dtype == torch.float64 else (1e-5, 1e-6)
    expected = oracles.pack(oracles.pixel_blur_pyramid(images, lo, hi), images.shape[0])
    for result in (results[0], results[2]):
        assert_close_to_oracle(result, expected, images.dtype, *tolerance)


# ------------------------------------------------------------------------------------------------------ tokenize


@st.composite
def tokenize_inputs(draw):
    """Arguments of tokenize, valid, then at most two of them broken. Returns (kwargs, broken): the breakages that
    applied (a breakage of a score map does not apply to an image that has none, or to a scorer)."""
    lo = draw(st.sampled_from([2, 4, 8]))
    hi = lo * draw(st.sampled_from([1, 2, 4]))
    height, width = draw(st.integers(1, 3)) * hi, draw(st.integers(1, 3)) * hi
    geometry = mixres.QuadtreeGeometry(height, width, lo, hi)
    batch = draw(st.integers(1, 2))
    images = make_tensor([batch, draw(st.integers(1, 3)), height, width], draw(st.sampled_from(FLOATS)),
                         draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 2**16)))
    generator_seed = draw(st.integers(0, 2**16))
    form = draw(st.sampled_from(["list", "dict", "dense", "scorer"]))
    maps = [make_tensor([batch, height // s, width // s], draw(st.sampled_from([torch.float32, torch.float64])),
                        draw(st.sampled_from(LAYOUTS)), generator_seed + s) for s in geometry.splittable_sizes]
    if form == "list":
        scores = maps
    elif form == "dict":
        scores = dict(zip(geometry.splittable_sizes, maps))
    elif form == "dense":
        factor = draw(st.sampled_from([1, 2]))
        scores = make_tensor([batch, height // lo * factor, width // lo * factor], torch.float32, "contiguous",
                             generator_seed)
    else:
        scores = mixres.PixelBlur(lo, hi)
    budgets = geometry.valid_n_patches()
    kwargs = dict(images=images, scores=scores, n_patches=draw(st.sampled_from(budgets)), min_patch_size=lo,
                  max_patch_size=hi, patch_size=draw(st.sampled_from([None, 1, 3, lo])),
                  mode=draw(st.sampled_from(["area", "bilinear"])))
    score_maps = form == "dense" or (form in ("list", "dict") and maps)  # something to break in the scores
    broken = []
    for what in draw(st.lists(st.sampled_from(
            ["nan score", "inf score", "n_patches", "float n_patches", "patch_size", "mode", "images dtype", "rank",
             "empty batch", "no channels", "min above max", "ratio", "side", "scores dtype", "empty dense map",
             "dense batch"]), max_size=2, unique=True)):
        if what in ("nan score", "inf score") and score_maps:
            kwargs["scores"] = _with_special(scores, form, maps, math.nan if what == "nan score" else -math.inf)
        elif what == "n_patches":
            kwargs["n_patches"] = draw(st.sampled_from([budgets[0] - 1, budgets[-1] + 3, 0, -5, 2**62]))
        elif what == "float n_patches":
            kwargs["n_patches"] = float(kwargs["n_patches"])
        elif what == "patch_size":
            kwargs["patch_size"] = draw(st.sampled_from([0, -1, True, 2.0]))
        elif what == "mode":
            kwargs["mode"] = "nearest"
        elif what == "images dtype":
            kwargs["images"] = images.to(draw(st.sampled_from(NOT_FLOATS)))
        elif what == "rank":
            kwargs["images"] = images[0]
        elif what == "empty batch":
            kwargs["images"] = images[:0]
        elif what == "no channels":
            kwargs["images"] = images[:, :0]
        elif what == "min above max":
            kwargs["min_patch_size"] = hi * 2
        elif what == "ratio":
            kwargs["max_patch_size"] = lo * 3
        elif what == "side":
            kwargs["images"] = images[..., :-1]
        elif what == "scores dtype" and score_maps:
            kwargs["scores"] = _first_map_to(scores, form, maps, torch.int64)
        elif what == "empty dense map" and form == "dense":
            kwargs["scores"] = scores[:, :0, :0]
        elif what == "dense batch" and form == "dense":
            kwargs["scores"] = scores.expand(batch + 1, -1, -1) if batch == 1 else scores[:1]
        else:
            continue
        broken.append(what)
    return kwargs, broken


def _with_special(scores, form, maps, value):
    if form == "dense":
        scores = scores.clone()
        scores[0, 0, 0] = value
        return scores
    maps = [m.clone() for m in maps]
    maps[-1][-1, -1, -1] = value
    return maps if form == "list" else dict(zip(scores, maps))


def _first_map_to(scores, form, maps, dtype):
    if form == "dense":
        return scores.to(dtype)
    maps = [maps[0].to(dtype)] + maps[1:]
    return maps if form == "list" else dict(zip(scores, maps))


@fuzz_settings
@given(tokenize_inputs())
def fuzz_tokenize(inputs):
    kwargs, broken = inputs
    results = [outcome(tokenize, **kwargs) for tokenize in (mixres.tokenize, reference.tokenize)]
    if broken:  # each breakage makes the input invalid
        assert_refused(*results)
        return
    for result in results:
        assert_result(result)
    images, scores, lo, hi = kwargs["images"], kwargs["scores"], kwargs["min_patch_size"], kwargs["max_patch_size"]
    if isinstance(scores, mixres.PixelBlur):
        # Its scores, as the oracle's input: they are checked against their own oracle in fuzz_pixel_blur_scores,
        # and float64 ones could rank two patches whose float32 scores tie the other way.
        scores = scores(images)
    expected = oracles.tokenize(images, scores, kwargs["n_patches"], lo, hi, kwargs["patch_size"], kwargs["mode"])
    for result in results:
        assert torch.equal(result.boxes, expected.boxes)
        oracles.assert_centers_close(result.centers, expected.centers)
        assert result.tokens.dtype == images.dtype
        assert_close_to_oracle(result.tokens, expected.tokens, images.dtype)
    assert_mosaic(expected.boxes, images.shape[2], images.shape[3], lo, hi)


# --------------------------------------------------------------------------- tokens_to_grid and grid_to_tokens


@st.composite
def mosaic_boxes(draw):
    """(boxes, batch, min_patch_size, image_size, is_mosaic): the boxes of a real mosaic of a batch of images, or
    arbitrary ones (any values, sometimes of a wrong shape or dtype)."""
    lo = draw(st.sampled_from([1, 2, 4]))
    hi = lo * draw(st.sampled_from([1, 2, 4]))
    height, width = draw(st.integers(1, 3)) * hi, draw(st.integers(1, 3)) * hi
    batch = draw(st.integers(0, 2))
    geometry = mixres.QuadtreeGeometry(height, width, lo, hi)
    if draw(st.integers(0, 4)) > 0:
        scores = make_tensor([batch, geometry.n_scores], torch.float32, "contiguous", draw(st.integers(0, 2**16)))
        n_patches = draw(st.sampled_from(geometry.valid_n_patches()))
        boxes = torch.ops.mixres.build_quadtree(scores, height, width, lo, hi, n_patches)
        return boxes, batch, lo, (height, width), True
    return draw(boxes_for(batch, height, width)), batch, lo, (height, width), False


def paint_oracle(features, boxes, min_patch_size, image_size):
    """tokens_to_grid by loops over the leaves."""
    batch, _, dim = features.shape
    grid = features.new_zeros(batch, dim, image_size[0] // min_patch_size, image_size[1] // min_patch_size)
    for b, image in enumerate(boxes.tolist()):
        for n, (y, x, size) in enumerate(image):
            rows = slice(y // min_patch_size, (y + size) // min_patch_size)
            cols = slice(x // min_patch_size, (x + size) // min_patch_size)
            grid[b, :, rows, cols] = features[b, n][:, None, None]
    return grid


# What boxes that break mixres.grid's documented contract (a mosaic of the image; unchecked, since checking would
# need a host synchronisation) may raise besides a result: an index past the grid, a leaf smaller than a cell.
_OFF_CONTRACT_ERRORS = ("out of bounds", "ZeroDivisionError")


def outcome_off_contract(function, *args, is_mosaic, **kwargs):
    """As outcome(); for boxes that are not a mosaic, also the RuntimeErrors of _OFF_CONTRACT_ERRORS."""
    try:
        return outcome(function, *args, **kwargs)
    except RuntimeError as error:
        if is_mosaic or not any(text in str(error) for text in _OFF_CONTRACT_ERRORS):
            raise
        return error


UNIT_ROUNDOFF = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-24, torch.float64: 2**-53}


@fuzz_settings
@given(st.data())
def fuzz_grid(data):
    boxes, batch, lo, image_size, is_mosaic = data.draw(mosaic_boxes())
    n_leaves = boxes.shape[1] if boxes.dim() >= 2 else 0
    dtype = data.draw(st.sampled_from(FLOATS + [torch.int64, torch.int32]))
    feature_shape = [batch, n_leaves + data.draw(st.sampled_from([0] * 6 + [1])), data.draw(st.integers(0, 3))]
    features = make_tensor(feature_shape, dtype, data.draw(st.sampled_from(LAYOUTS)), data.draw(st.integers(0, 2**16)))
    size_arg = data.draw(st.sampled_from([image_size] * 8 + [(image_size[0] + 1, image_size[1]), (0, 4), [4.0, 4]]))
    lo_arg = data.draw(st.sampled_from([lo] * 8 + [0, -1, True, 2.0]))
    boxes_checked = (boxes.dim() == 3 and boxes.shape[0] == batch and boxes.shape[2] == 3
                     and boxes.dtype in (torch.int32, torch.int64))
    lo_checked = type(lo_arg) is int and lo_arg > 0
    painted = outcome_off_contract(mixres.tokens_to_grid, features, boxes, lo_arg, size_arg, is_mosaic=is_mosaic)
    # What tokens_to_grid checks (types, ranks, shapes, sizes), then the contract it documents (a mosaic of the
    # image): a result is due only when both hold, an error whenever the first fails.
    checked = (boxes_checked and lo_checked and feature_shape[1] == n_leaves and all(type(v) is int for v in size_arg)
               and all(v > 0 and v % lo_arg == 0 for v in size_arg))
    if not checked:
        assert_refused(painted)
    elif is_mosaic and tuple(size_arg) == image_size:
        assert_result(painted)
        assert torch.equal(painted, paint_oracle(features, boxes, lo, image_size))
    reduce = data.draw(st.sampled_from(["mean"] * 4 + ["sum"] * 4 + ["max"]))
    grid = make_tensor([batch, feature_shape[2], image_size[0] // lo, image_size[1] // lo], dtype,
                       data.draw(st.sampled_from(LAYOUTS)), data.draw(st.integers(0, 2**16)))
    pooled = outcome_off_contract(mixres.grid_to_tokens, grid, boxes, lo_arg, reduce, is_mosaic=is_mosaic)
    checked = (boxes_checked and lo_checked and reduce in ("mean", "sum")
               and (reduce == "sum" or dtype.is_floating_point))
    if not checked:
        assert_refused(pooled)
    elif is_mosaic:
        assert_result(pooled)
        assert pooled.shape == (batch, n_leaves, grid.shape[1]) and pooled.dtype == dtype
        # The oracle: each leaf's cells summed in float64 (exact for these sums), then the mean's division.
        owner = paint_oracle(torch.arange(n_leaves, dtype=torch.float64).expand(batch, n_leaves)[..., None], boxes,
                             lo, image_size)
        expected = torch.zeros(batch, n_leaves, grid.shape[1], dtype=torch.float64)
        for n in range(n_leaves):
            members = owner == n  # [B, 1, h, w]
            expected[:, n] = (grid.double() * members).sum((2, 3))
            if reduce == "mean":
                expected[:, n] /= members.sum((2, 3))
        # Non-negative values: the pairwise sums of at most 4 x 4 cells and the division round at most 5 times.
        tolerance = 6 * UNIT_ROUNDOFF.get(dtype, 0)
        torch.testing.assert_close(pooled.double(), expected, rtol=tolerance, atol=tolerance)


# ----------------------------------------------------------------------------- pack_pyramid, saliency_to_pyramid


@fuzz_settings
@given(st.data())
def fuzz_pack_pyramid(data):
    lo = data.draw(st.sampled_from([2, 4]))
    hi = lo * data.draw(st.sampled_from([1, 2, 4, 8]))
    geometry = mixres.QuadtreeGeometry(data.draw(st.integers(1, 3)) * hi, data.draw(st.integers(1, 3)) * hi, lo, hi)
    batch = data.draw(st.integers(0, 2))
    sizes = geometry.splittable_sizes
    broken = data.draw(broken_parts(["count", "shape", "batch", "keys", "not a map", "form", "device", "dtype"]))
    dtypes = [data.draw(st.sampled_from(FLOATS + (NOT_FLOATS if "dtype" in broken else []))) for _ in sizes]
    maps = [make_tensor([batch, *geometry.grid(s)], dtype, data.draw(st.sampled_from(LAYOUTS)),
                        data.draw(st.integers(0, 2**16)), specials=data.draw(st.sampled_from([0] * 4 + [1])))
            for s, dtype in zip(sizes, dtypes)]
    form = data.draw(st.sampled_from(["list", "tuple", "dict"]))
    pyramid = dict(zip(sizes, maps)) if form == "dict" else (tuple(maps) if form == "tuple" else list(maps))
    # Each breakage, where the geometry gives it something to break.
    if "count" in broken:
        pyramid = list(maps) + [maps[-1]] if maps else [torch.zeros(batch, 1, 1)]
    if "shape" in broken and maps:
        pyramid = [maps[0][..., :-1]] + maps[1:]
    if "batch" in broken:
        pyramid = [torch.zeros(batch + 1, *geometry.grid(s)) for s in sizes] if sizes else [torch.zeros(1, 1, 1)]
    if "keys" in broken:
        pyramid = {s + 1: m for s, m in zip(sizes, maps)} if sizes else {1: torch.zeros(batch, 1, 1)}
    if "not a map" in broken and maps:
        pyramid = [maps[0].tolist()] + maps[1:]
    if "form" in broken:
        pyramid = data.draw(st.sampled_from(["scores", 3, None]))
    if "device" in broken and maps:
        pyramid = [maps[0].to("meta")] + maps[1:]
    result = outcome(mixres.pack_pyramid, pyramid, geometry, batch, torch.device("cpu"))
    # A map's dtype is checked below; the others break nothing without a map.
    harmless = {"dtype"} | ({"shape", "not a map", "device"} if not maps else set())
    if not broken <= harmless or not all(dtype.is_floating_point for dtype in dtypes):
        assert_refused(result)
        return
    assert_result(result)
    dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    expected = (torch.cat([m.reshape(batch, m.shape[1] * m.shape[2]).to(dtype) for m in maps], 1) if maps
                else torch.zeros(batch, 0))
    assert result.dtype == dtype and result.shape == (batch, geometry.n_scores)
    assert_same(result, expected)


@fuzz_settings
@given(st.data())
def fuzz_saliency_to_pyramid(data):
    lo = data.draw(st.sampled_from([2, 4]))
    hi = lo * data.draw(st.sampled_from([1, 2, 4]))
    geometry = mixres.QuadtreeGeometry(data.draw(st.integers(1, 3)) * hi, data.draw(st.integers(1, 3)) * hi, lo, hi)
    rows, cols = geometry.grid(lo)
    # A map 1 to 3 times finer than the s_min grid, or as coarse as the roots (resampled where that is coarser).
    map_rows, map_cols = data.draw(st.sampled_from([(rows * f, cols * f) for f in (1, 2, 3)] + [geometry.grid(hi)]))
    shape = [data.draw(st.integers(0, 2)), map_rows, map_cols]
    breakage = data.draw(st.sampled_from(["none"] * 6 + ["rank", "aspect", "empty", "dtype", "type"]))
    if breakage == "rank":
        shape = data.draw(st.sampled_from([shape[1:], shape + [1]]))
    elif breakage == "aspect":
        shape[2] += 1
    elif breakage == "empty":
        shape[1:] = [0, 0]
    dtype = data.draw(st.sampled_from(FLOATS)) if breakage != "dtype" else data.draw(st.sampled_from(NOT_FLOATS))
    saliency = make_tensor(shape, dtype, data.draw(st.sampled_from(LAYOUTS)), data.draw(st.integers(0, 2**16)))
    if breakage == "type":
        saliency = saliency.tolist()
    result = outcome(mixres.saliency_to_pyramid, saliency, geometry)
    if breakage != "none":
        assert_refused(result)
        return
    assert_result(result)
    assert [tuple(m.shape) for m in result] == [(shape[0], *geometry.grid(s)) for s in geometry.splittable_sizes]
    expected = oracles.saliency_pyramid(saliency.double(), geometry.height, geometry.width, lo, hi)
    for level, oracle_level in zip(result, expected, strict=True):
        assert_close_to_oracle(level, oracle_level, dtype)


# ----------------------------------------------------------------------------------------------- the tests


FUZZERS = ["fuzz_extract_patches", "fuzz_extract_patches_backward", "fuzz_build_quadtree", "fuzz_leaf_centers",
           "fuzz_pixel_blur_scores", "fuzz_tokenize", "fuzz_grid", "fuzz_pack_pyramid", "fuzz_saliency_to_pyramid"]


@pytest.mark.hypothesis  # in a subprocess: the marker selects it with the tests that draw examples in-process
@pytest.mark.parametrize("threads", [None, 1], ids=["threads-default", "threads-1"])
@pytest.mark.parametrize("fuzzers", [FUZZERS[:2], FUZZERS[2:5], FUZZERS[5:]],
                         ids=["extract_patches", "quadtree-centers-blur", "tokenize-grid-pyramid"])
def test_fuzz(fuzzers, threads):
    calls = "\n".join(f"test_fuzz_ops.{name}()" for name in fuzzers)
    run_script(f"""
import torch
{'torch.set_num_threads(1)' if threads == 1 else ''}
import test_fuzz_ops
cap_memory(2048)  # a runaway allocation raises instead of exhausting the machine
{calls}
""")


def test_segfault_regression():
    """The probe's crash: int32 box bounds that overflowed let the forward read, and the backward write, far
    outside the image (signal 11). Every op must refuse each of these boxes with a ValueError naming it."""
    run_script("""
import pytest, torch, mixres
from mixres import reference
images = torch.rand(1, 3, 64, 64)
reference.extract_patches(images, torch.tensor([[[0, 0, 16]]], dtype=torch.int32), 16, "area")  # warm-up
cap_memory(1024)  # the reference allocated until killed
for box in ([2**31 - 8, 0, 16], [0, 2**31 - 8, 16], [0, 0, 2**31 - 1], [2**31 - 1] * 3, [-2**31, 0, 16],
            [16, 16, -2**31], [2**31 - 16, 2**31 - 16, 32]):
    boxes = torch.tensor([[box]], dtype=torch.int32)
    message = rf"boxes\\[0, 0\\] \\(y={box[0]}, x={box[1]}, size={box[2]}\\) is not inside the 64x64 image"
    for mode in ("area", "bilinear"):
        for extract in (torch.ops.mixres.extract_patches, mixres.ops.extract_patches, reference.extract_patches):
            with pytest.raises(ValueError, match=message):
                extract(images, boxes, 16, mode)
        with pytest.raises(ValueError, match=message):
            torch.ops.mixres.extract_patches_backward(torch.rand(1, 1, 3, 16, 16), boxes, 64, 64, mode)
""")
