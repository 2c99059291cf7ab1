"""Throughput of mixres.tokenize (C++/CUDA ops) vs mixres.reference.tokenize (plain PyTorch), same run, same device.

    benchmarks/bench.sh     (or pytest benchmarks; bench.sh keeps the JSON and the log in benchmarks/results/)

Environment: MIXRES_BENCH_DEVICE (default: cuda if available, else cpu), MIXRES_BENCH_BATCH (default 256 on
cuda, 64 on cpu).
Scores are precomputed random pyramids: this measures the quadtree, the resize and the centres, not a scorer.

``test_tokenize_threshold`` (issue 15): adaptive budgets against the fixed one, same run. A threshold calibrated
(:func:`mixres.calibrate_threshold`) so that the images' mean is half of N, with N as the cap, against the fixed
budget N; interleaved rounds, medians. The adaptive mosaic is padded to N: it resizes fewer leaves, and writes the
same tensor sizes.
"""
import os

import pytest
import torch

import mixres
from mixres.apps.end_to_end import interleaved_ms

from conftest import CONFIGS, DEVICE, inputs, median_seconds, record, report
from timers import pedantic_runner

BATCH = int(os.environ.get("MIXRES_BENCH_BATCH", "256" if DEVICE.type == "cuda" else "64"))
IMPLS = {"ops": mixres.tokenize, "reference": mixres.reference.tokenize}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", CONFIGS)
def test_tokenize(benchmark, config, impl):
    size, min_size, max_size, n_patches = CONFIGS[config]
    images, pyramid = inputs(BATCH, size, min_size, max_size, DEVICE)
    tokenize = IMPLS[impl]

    def run():
        mosaic = tokenize(images, pyramid, n_patches=n_patches, min_patch_size=min_size, max_patch_size=max_size)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return mosaic

    benchmark.group = f"{config} B={BATCH} {DEVICE.type}"
    mosaic = benchmark.pedantic(run, warmup_rounds=2, rounds=20 if impl == "ops" else 5, iterations=1)
    assert mosaic.tokens.shape == (BATCH, n_patches, 3, min_size, min_size)
    images_per_second = BATCH / median_seconds(benchmark)
    benchmark.extra_info.update(images_per_second=images_per_second, device=str(DEVICE), batch=BATCH,
                                torch=torch.__version__, threads=torch.get_num_threads())
    record(f"{config} B={BATCH} {DEVICE.type}", impl, images_per_second)


@pytest.mark.parametrize("config", CONFIGS)
def test_tokenize_threshold(benchmark, config):
    size, min_size, max_size, n_patches = CONFIGS[config]
    images, pyramid = inputs(BATCH, size, min_size, max_size, DEVICE)
    calibration = mixres.calibrate_threshold(pyramid, images, mean_tokens=n_patches / 2, max_patches=n_patches,
                                             min_patch_size=min_size, max_patch_size=max_size)
    sizes = dict(min_patch_size=min_size, max_patch_size=max_size)
    calls = {"fixed": lambda: mixres.tokenize(images, pyramid, n_patches, **sizes),
             "threshold": lambda: mixres.tokenize(images, pyramid, n_patches, threshold=calibration.thresholds,
                                                  **sizes)}
    benchmark.group = f"{config} B={BATCH} {DEVICE.type} threshold"
    ms, outputs = interleaved_ms(calls, DEVICE, 20, 2, pedantic_runner(benchmark))
    lengths = outputs["threshold"].lengths.float()
    assert outputs["threshold"].tokens.shape == outputs["fixed"].tokens.shape
    assert lengths.mean().item() == pytest.approx(calibration.mean_tokens)
    benchmark.extra_info.update(device=str(DEVICE), batch=BATCH, fixed_ms=ms["fixed"], threshold_ms=ms["threshold"],
                                mean_tokens=calibration.mean_tokens, min_tokens=calibration.min_tokens,
                                max_tokens=calibration.max_tokens, threshold=calibration.threshold)
    report(f"tokenize {config} B={BATCH} {DEVICE.type}: fixed N={n_patches} {ms['fixed']:.2f} ms, threshold (mean "
           f"{calibration.mean_tokens:.1f} tokens, {calibration.min_tokens}-{calibration.max_tokens}, cap "
           f"{n_patches}) {ms['threshold']:.2f} ms: fixed / threshold = {ms['fixed'] / ms['threshold']:.2f}x")
