"""What the tokenizer costs on a GPU next to what surrounds it (skipped without CUDA).

    benchmarks/bench.sh -k cuda     (or pytest benchmarks/test_cuda_costs.py)

At B=256 (MIXRES_BENCH_BATCH), N=100, 16 px tokens, RGB, ``mode="area"``, random score pyramids:
- tokenize time as a share of the bf16 ViT-B/16 forward that reads the same mosaic (a timm Quadformer with random
  weights: leaf embedding, resampled position table, blocks, head). Both sides are timed with the same two clocks:
  host wall time of an eager call that waits for the GPU (what a training loop pays), and the device time between
  CUDA events around it. The tokenizer is also replayed from a CUDA graph (its kernels without Python and launch
  overhead), against the ViT's device time;
- the resize kernel's achieved bandwidth against a device-to-device copy measured in the same run;
- the quadtree and centre kernels' own times.

Medians throughout. Images are 200 MB per batch at 256 px float32, far beyond the L2 cache.
"""
import os

import pytest
import torch

import mixres
from mixres.apps.timing import median_seconds

from conftest import CONFIGS, inputs, report
from timers import device_ms, graphed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")
BATCH = int(os.environ.get("MIXRES_BENCH_BATCH", "256"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_vit_ms: dict[str, dict[str, float]] = {}


def wall_ms(fn, reps: int = 30, warmup: int = 3) -> float:
    """Median host wall time of one ``fn()`` that waits for the GPU to finish it."""
    return 1e3 * median_seconds(fn, DEVICE, repeats=reps, warmup=warmup)


def vit_b16(size: int, min_size: int, max_size: int, n_patches: int):
    """The bf16 ViT-B/16 that reads a mosaic of ``n_patches`` leaves: timm's, as a Quadformer, random weights."""
    pytest.importorskip("timm")
    from mixres.models import create_quadformer

    model = create_quadformer("vit_base_patch16_224", img_size=size, n_patches=n_patches, min_patch_size=min_size,
                              max_patch_size=max_size, pos_embed="resample", scorer="uniform")
    return model.to(DEVICE, torch.bfloat16).eval()


def vit_costs(config: str) -> dict[str, float]:
    """The ViT forward's wall and device times (ms) for ``config``, measured once per run."""
    if config not in _vit_ms:
        size, min_size, max_size, n_patches = CONFIGS[config]
        images, pyramid = inputs(BATCH, size, min_size, max_size, DEVICE, torch.bfloat16)
        mosaic = mixres.tokenize(images, pyramid, n_patches, min_size, max_size)
        model = vit_b16(size, min_size, max_size, n_patches)
        with torch.inference_mode():
            _vit_ms[config] = {"wall_ms": wall_ms(lambda: model(mosaic), reps=20),
                               "device_ms": device_ms(lambda: model(mosaic), reps=20)}
    return _vit_ms[config]


@pytest.mark.parametrize("config", CONFIGS)
def test_vit_b16_forward(benchmark, config):
    size, min_size, max_size, n_patches = CONFIGS[config]
    images, pyramid = inputs(BATCH, size, min_size, max_size, DEVICE, torch.bfloat16)
    mosaic = mixres.tokenize(images, pyramid, n_patches, min_size, max_size)
    model = vit_b16(size, min_size, max_size, n_patches)
    with torch.inference_mode():
        benchmark.pedantic(lambda: (model(mosaic), torch.cuda.synchronize()), warmup_rounds=2, rounds=5,
                           iterations=1)
    costs = vit_costs(config)
    benchmark.extra_info.update(costs, batch=BATCH, n_patches=n_patches)
    report(f"{config} B={BATCH}: bf16 ViT-B/16 forward over {n_patches} tokens: {costs['wall_ms']:.2f} ms wall, "
           f"{costs['device_ms']:.2f} ms device")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_tokenize_share_of_vit(benchmark, config, dtype):
    size, min_size, max_size, n_patches = CONFIGS[config]
    images, pyramid = inputs(BATCH, size, min_size, max_size, DEVICE, DTYPES[dtype])

    def tokenize():
        return mixres.tokenize(images, pyramid, n_patches, min_size, max_size)

    benchmark.pedantic(lambda: (tokenize(), torch.cuda.synchronize()), warmup_rounds=3, rounds=30, iterations=1)
    times = {"wall_ms": wall_ms(tokenize), "device_ms": device_ms(tokenize),
             "graph_device_ms": device_ms(graphed(tokenize), reps=50)}
    vit = vit_costs(config)
    shares = {"wall_share": times["wall_ms"] / vit["wall_ms"], "device_share": times["device_ms"] / vit["device_ms"],
              "graph_share": times["graph_device_ms"] / vit["device_ms"]}
    benchmark.extra_info.update(times, **shares, vit_wall_ms=vit["wall_ms"], vit_device_ms=vit["device_ms"],
                                batch=BATCH)
    report(f"{config} B={BATCH} {dtype} images: tokenize {times['wall_ms']:.3f} ms wall = "
           f"{100 * shares['wall_share']:.1f}% of the ViT's wall time; {times['device_ms']:.3f} ms device = "
           f"{100 * shares['device_share']:.1f}%; as a CUDA graph {times['graph_device_ms']:.3f} ms = "
           f"{100 * shares['graph_share']:.1f}% of the ViT's device time")


@pytest.mark.parametrize("config", CONFIGS)
def test_resize_bandwidth_vs_copy(benchmark, config):
    size, min_size, max_size, n_patches = CONFIGS[config]
    sets = [inputs(BATCH, size, min_size, max_size, DEVICE, seed=seed) for seed in range(2)]
    boxes = [mixres.ops.build_quadtree(mixres.pack_pyramid(pyramid, mixres.QuadtreeGeometry(
        size, size, min_size, max_size), BATCH, DEVICE), size, size, min_size, max_size, n_patches)
        for _, pyramid in sets]
    turn = iter(range(1 << 30))

    def resize():
        i = next(turn) % len(sets)
        return torch.ops.mixres.extract_patches(sets[i][0], boxes[i], min_size, "area")

    tokens = resize()
    # The leaves partition the image and are at least as large as a token, so area resizing must read every
    # pixel once and write every token element once.
    moved = sets[0][0].nbytes + tokens.nbytes
    resize_ms = device_ms(resize, reps=50)
    source = sets[0][0]
    target = torch.empty_like(source)
    copy_ms = device_ms(lambda: target.copy_(source), reps=50)
    benchmark.pedantic(lambda: (resize(), torch.cuda.synchronize()), rounds=10, iterations=1)
    resize_gbs, copy_gbs = moved / resize_ms / 1e6, 2 * source.nbytes / copy_ms / 1e6
    benchmark.extra_info.update(resize_ms=resize_ms, resize_gb_s=resize_gbs, copy_gb_s=copy_gbs)

    packed = mixres.pack_pyramid(sets[0][1], mixres.QuadtreeGeometry(size, size, min_size, max_size), BATCH, DEVICE)
    quadtree_ms = device_ms(
        lambda: torch.ops.mixres.build_quadtree(packed, size, size, min_size, max_size, n_patches), reps=50)
    centers_ms = device_ms(lambda: torch.ops.mixres.leaf_centers(boxes[0], min_size), reps=50)
    report(f"{config} B={BATCH} float32: resize {resize_ms:.3f} ms for {moved / 1e6:.0f} MB = {resize_gbs:,.0f} GB/s; "
           f"copy {copy_gbs:,.0f} GB/s (read + write); resize / copy = {100 * resize_gbs / copy_gbs:.0f}%; "
           f"quadtree {quadtree_ms:.3f} ms, centres {centers_ms:.3f} ms")
