"""Prints, after the run, the throughput of each tokenize config with the speed-up of the C++/CUDA ops over the
reference, then the cost lines the other benchmarks report (share of a ViT forward, bandwidth, scorers)."""
import os

import pytest
import torch

import mixres

# The device every benchmark but test_cuda_costs.py runs on (MIXRES_BENCH_DEVICE; default cuda where there is one).
DEVICE = torch.device(os.environ.get("MIXRES_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))

# The targets' first setting (docs/design.md) was 224 px with 16-64 px patches, but 224 is not a multiple of 64 (the
# root grid must tile the image): 224 px runs with 16-32 px patches, and 256 px with 16-64 px patches.
# name: (image side, min_patch_size, max_patch_size, n_patches)
CONFIGS = {"224px-16to32-N100": (224, 16, 32, 100), "256px-16to64-N100": (256, 16, 64, 100)}


def inputs(batch: int, size: int, min_size: int, max_size: int, device: torch.device, dtype=torch.float32,
           seed: int = 0):
    """Random RGB images [B, 3, size, size] and a random score pyramid for them (the scorer is not timed)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator).to(device, dtype)
    geometry = mixres.QuadtreeGeometry(size, size, min_size, max_size)
    pyramid = [torch.rand(batch, *geometry.grid(s), generator=generator).to(device)
               for s in geometry.splittable_sizes]
    return images, pyramid


_results: dict[tuple[str, str], float] = {}
_lines: list[str] = []


def median_seconds(benchmark) -> float:
    """pytest-benchmark's median of the calls it timed. Under ``--benchmark-disable`` it ran the call once, untimed:
    the test then ends as skipped, its figures unmeasured (and nothing derived from them reported)."""
    if benchmark.disabled:
        pytest.skip("--benchmark-disable: the call ran once, untimed")
    return benchmark.stats.stats.median


def record(config: str, impl: str, images_per_second: float) -> None:
    _results[(config, impl)] = images_per_second


def report(line: str) -> None:
    """A line for the end-of-run summary, which the terminal's tail always shows."""
    _lines.append(line)


def pytest_terminal_summary(terminalreporter):
    if _results:
        terminalreporter.section("mixres tokenize throughput (median)")
        for config in sorted({config for config, _ in _results}):
            ops, ref = _results.get((config, "ops")), _results.get((config, "reference"))
            line = f"{config}: ops {ops:,.0f} images/s" if ops else f"{config}:"
            if ref:
                line += f", reference {ref:,.0f} images/s"
            if ops and ref:
                line += f", ops / reference = {ops / ref:.1f}x"
            terminalreporter.write_line(line)
    if _lines:
        terminalreporter.section("mixres costs (medians)")
        for line in _lines:
            terminalreporter.write_line(line)
