"""Wall-clock timing shared by ``mixres bench``, the demo and ``python -m mixres.evaluate``: the median of timed
calls that wait for the device, the device's name, and the table of the tokenizer's throughput against the
reference and the scorers."""
from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .. import ops, reference
from ..mosaic import tokenize

__all__ = ["synchronize", "timed_call", "median_seconds", "device_name", "kernel_label", "time_tokenizer",
           "throughput_row", "format_throughput"]


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device``: CUDA kernels run asynchronously, so a timer must wait for them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(wall-clock seconds, result) of one ``fn()``, the clock stopped once ``device`` has finished its work."""
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median_seconds(fn: Callable[[], object], device: torch.device | str, repeats: int = 5, warmup: int = 1) -> float:
    """The median wall-clock time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones, each call
    waiting for ``device`` to finish it."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    return statistics.median(timed_call(fn, device)[0] for _ in range(repeats))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    return f"{name}, {torch.get_num_threads()} threads"


def kernel_label(device: torch.device) -> str:
    """What ``mixres.tokenize`` runs on ``device``: the compiled ops, or the reference it falls back to."""
    if ops.has_kernel(device):
        return f"{'CUDA' if device.type == 'cuda' else 'C++'} ops"
    return "no compiled kernel: the reference"


def throughput_row(name: str, label: str, seconds: float, n_images: int, tokenize_seconds: float | None) -> dict:
    """One row of :func:`format_throughput`: the time of one batch of ``n_images``, its images/s, and that time
    over the tokenizer's (``tokenize_seconds``; the row's own time when None: the tokenizer's row)."""
    return {"name": name, "label": label, "ms": seconds * 1e3, "images_per_s": n_images / seconds,
            "vs_tokenize": seconds / (seconds if tokenize_seconds is None else tokenize_seconds)}


def time_tokenizer(images: Tensor, scores, n_patches: int, min_patch_size: int, max_patch_size: int,
                   scorers: Mapping[str, tuple[str, Callable[[Tensor], object]]] | None = None, mode: str = "area",
                   repeats: int = 5, warmup: int = 1) -> list[dict]:
    """Times ``mixres.tokenize`` (the compiled ops) and ``mixres.reference.tokenize`` (plain PyTorch) on the same
    images and precomputed scores, then each scorer on the images; see :func:`median_seconds`.

    Args:
        images: ``[B, C, H, W]`` on the device to time.
        scores: their score pyramid, computed once: the tokenizers are timed without a scorer.
        n_patches, min_patch_size, max_patch_size, mode: as for :func:`mixres.tokenize`.
        scorers: name -> (label, scorer), each timed as ``scorer(images)``.
        repeats, warmup: timed and untimed calls of each.

    Returns:
        One :func:`throughput_row` each, the tokenizer first, then the reference and the scorers in order.
    """
    device, batch = images.device, images.shape[0]

    def run(implementation):
        return lambda: implementation(images, scores, n_patches, min_patch_size, max_patch_size, mode=mode)

    tokenize_seconds = median_seconds(run(tokenize), device, repeats, warmup)
    rows = [throughput_row("tokenize", f"mixres.tokenize ({kernel_label(device)})", tokenize_seconds, batch, None)]
    timed = {"reference": ("mixres.reference.tokenize (PyTorch)", run(reference.tokenize))}
    timed.update({name: (label, lambda scorer=scorer: scorer(images))
                  for name, (label, scorer) in (scorers or {}).items()})
    for name, (label, fn) in timed.items():
        rows.append(throughput_row(name, label, median_seconds(fn, device, repeats, warmup), batch,
                                   tokenize_seconds))
    return rows


def format_throughput(rows: Sequence[dict]) -> str:
    """The rows of :func:`time_tokenizer` as a text table, and how much faster the tokenizer is than the
    reference."""
    width = max(len(row["label"]) for row in rows)
    lines = [f"{'':<{width}}  {'ms/batch':>10}  {'images/s':>10}  {'x tokenize':>10}"]
    lines += [f"{row['label']:<{width}}  {row['ms']:10.3f}  {row['images_per_s']:10,.0f}  {row['vs_tokenize']:10.2f}"
              for row in rows]
    speedup = {row["name"]: row["vs_tokenize"] for row in rows}.get("reference")
    if speedup is not None:
        lines.append(f"mixres.tokenize is {speedup:.1f}x as fast as mixres.reference.tokenize")
    return "\n".join(lines)
