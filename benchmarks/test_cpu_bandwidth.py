"""How near the CPU kernels run to memory bandwidth: each op's time against a plain ``copy_`` of the same images,
same run (issue 14).

    benchmarks/bench.sh -k bandwidth     (or pytest benchmarks/test_cpu_bandwidth.py)

A copy reads the images once and writes them once; ``pixel_blur_scores`` and ``extract_patches`` read them once
(and write a few scores, or N tokens). ``ratio`` = copy time / op time: 1 means the op runs as fast as a copy of
its input, 0.5 twice as slow.

- Settings: 256 px B=64 with 16-64 px patches, N=100; 1024 px B=1 with 16-64 px patches, N=1000 (one image: the
  kernels must split it across the cores); 224 px B=64 with 16-32 px patches, N=100. float32 RGB, uniform random.
- Calls: ``copy_`` into a preallocated tensor; ``pixel_blur_scores``; ``extract_patches`` in area and bilinear
  mode on the boxes ``build_quadtree`` picks from random scores (the quadtree is not timed).
- Timing: each round runs every call once, in the same order (a slow spell of this shared machine hits them
  alike); medians over the rounds. pytest-benchmark's statistics are pixel_blur_scores'.

CPU only: skipped when the benchmark device (MIXRES_BENCH_DEVICE) is CUDA. Threads: torch's default
(``torch.get_num_threads()``, recorded).
"""
import statistics
import time

import pytest
import torch

import mixres

from conftest import DEVICE, report

# name: (image side, batch, min_patch_size, max_patch_size, n_patches)
SETTINGS = {
    "256px-B64-16to64-N100": (256, 64, 16, 64, 100),
    "1024px-B1-16to64-N1000": (1024, 1, 16, 64, 1000),
    "224px-B64-16to32-N100": (224, 64, 16, 32, 100),
}
WARMUP, ROUNDS = 2, 15

pytestmark = [
    pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU kernels; the benchmark device is not the CPU"),
    pytest.mark.skipif(not mixres.ops.has_kernel("cpu"), reason="the extension has no CPU kernels"),
]


def interleaved_ms(benchmark, calls: dict, timed_by_benchmark: str) -> dict:
    """Median ms of each call over rounds that run them all; pytest-benchmark times ``timed_by_benchmark`` (its
    ``setup`` runs the others, timed here)."""
    times = {name: [] for name in calls}

    def timed(name):
        start = time.perf_counter()
        calls[name]()
        times[name].append(time.perf_counter() - start)

    def the_others():
        for name in calls:
            if name != timed_by_benchmark:
                timed(name)

    benchmark.pedantic(timed, args=(timed_by_benchmark,), setup=the_others, warmup_rounds=WARMUP, rounds=ROUNDS,
                       iterations=1)
    # The warm-up rounds ran the setup too: the last ROUNDS are the timed ones.
    return {name: 1e3 * statistics.median(values[-ROUNDS:]) for name, values in times.items()}


@pytest.mark.parametrize("setting", SETTINGS)
def test_cpu_bandwidth(benchmark, setting):
    size, batch, min_size, max_size, n_patches = SETTINGS[setting]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator)
    copy = torch.empty_like(images)
    scores = torch.ops.mixres.pixel_blur_scores(images, min_size, max_size)
    random_scores = torch.rand(scores.shape, generator=generator)
    boxes = torch.ops.mixres.build_quadtree(random_scores, size, size, min_size, max_size, n_patches)
    assert boxes.shape == (batch, n_patches, 3)
    calls = {
        "copy": lambda: copy.copy_(images),
        "pixel_blur": lambda: torch.ops.mixres.pixel_blur_scores(images, min_size, max_size),
        "extract_area": lambda: torch.ops.mixres.extract_patches(images, boxes, min_size, "area"),
        "extract_bilinear": lambda: torch.ops.mixres.extract_patches(images, boxes, min_size, "bilinear"),
    }
    benchmark.group = f"cpu bandwidth {setting}"
    ms = interleaved_ms(benchmark, calls, "pixel_blur")
    ratios = {name: ms["copy"] / ms[name] for name in calls if name != "copy"}
    benchmark.extra_info.update(
        setting=setting, batch=batch, size=size, min_patch_size=min_size, max_patch_size=max_size,
        n_patches=n_patches, image_bytes=images.nbytes, threads=torch.get_num_threads(),
        **{f"{name}_ms": value for name, value in ms.items()},
        **{f"{name}_ratio": value for name, value in ratios.items()})
    report(f"cpu bandwidth {setting} ({images.nbytes / 1e6:.1f} MB, {torch.get_num_threads()} threads): copy "
           f"{ms['copy']:.2f} ms ({images.nbytes / ms['copy'] / 1e6:.3g} GB/s read); copy time / op time: "
           + ", ".join(f"{name} {ratio:.2f} ({ms[name]:.2f} ms)" for name, ratio in ratios.items()))
