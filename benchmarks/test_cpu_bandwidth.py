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
  alike), by :func:`mixres.apps.end_to_end.interleaved_ms`; medians over the rounds. pytest-benchmark's statistics
  are pixel_blur_scores'.
- Cache state: before each call (untimed), a read of a buffer twice the size of the last-level cache, so that every
  call starts alike: its input in DRAM, and no dirty line left to write back. Without it, each call inherits the
  state the previous one left: ``pixel_blur_scores``, which runs after the copy, paid for writing back the copy's
  output (at 1024 px, B=1, on 2 threads: 1.4 ms instead of 1.0), and the copy of those 12.6 MB, whose source the
  previous round's calls had just read, ran from the last-level cache (0.5-0.7 ms, 0.7-1.2 ms from DRAM).

CPU only: skipped when the benchmark device (MIXRES_BENCH_DEVICE) is CUDA. Threads: torch's default
(``torch.get_num_threads()``, recorded).
"""
import re
from pathlib import Path

import pytest
import torch

import mixres
from mixres.apps.end_to_end import interleaved_ms

from conftest import DEVICE, report
from timers import pedantic_runner

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


def last_level_cache_bytes() -> int:
    """The largest CPU cache, from Linux's sysfs; 32 MiB where it cannot be read."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", path.read_text().strip())
        if match:
            sizes.append(int(match[1]) * units[match[2]])
    return max(sizes, default=32 * 2**20)


def cache_evictor():
    """A call that leaves the caches holding none of the benchmark's tensors and no dirty line: it reads (and
    writes nothing to) a buffer twice the size of the last-level cache."""
    buffer = torch.ones(2 * last_level_cache_bytes() // 4)
    return lambda: buffer.sum()


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
    calls = {  # pixel_blur last: pytest-benchmark's statistics are its
        "copy": lambda: copy.copy_(images),
        "extract_area": lambda: torch.ops.mixres.extract_patches(images, boxes, min_size, "area"),
        "extract_bilinear": lambda: torch.ops.mixres.extract_patches(images, boxes, min_size, "bilinear"),
        "pixel_blur": lambda: torch.ops.mixres.pixel_blur_scores(images, min_size, max_size),
    }
    benchmark.group = f"cpu bandwidth {setting}"
    ms, _ = interleaved_ms(calls, "cpu", ROUNDS, WARMUP, pedantic_runner(benchmark), before_each=cache_evictor())
    ratios = {name: ms["copy"] / ms[name] for name in calls if name != "copy"}
    benchmark.extra_info.update(
        setting=setting, batch=batch, size=size, min_patch_size=min_size, max_patch_size=max_size,
        n_patches=n_patches, image_bytes=images.nbytes, threads=torch.get_num_threads(),
        **{f"{name}_ms": value for name, value in ms.items()},
        **{f"{name}_ratio": value for name, value in ratios.items()})
    report(f"cpu bandwidth {setting} ({images.nbytes / 1e6:.1f} MB, {torch.get_num_threads()} threads): copy "
           f"{ms['copy']:.2f} ms ({images.nbytes / ms['copy'] / 1e6:.3g} GB/s read); copy time / op time: "
           + ", ".join(f"{name} {ratio:.2f} ({ms[name]:.2f} ms)" for name, ratio in ratios.items()))
