"""Throughput of mixres.tokenize (C++/CUDA ops) vs mixres.reference.tokenize (plain PyTorch), same run, same device.

    benchmarks/bench.sh     (or pytest benchmarks; bench.sh keeps the JSON and the log in benchmarks/results/)

Environment: MIXRES_BENCH_DEVICE (default: cuda if available, else cpu), MIXRES_BENCH_BATCH (default 256 on
cuda, 64 on cpu).
Scores are precomputed random pyramids: this measures the quadtree, the resize and the centres, not a scorer.
"""
import os

import pytest
import torch

import mixres

from conftest import CONFIGS, DEVICE, inputs, record

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
    images_per_second = BATCH / benchmark.stats.stats.median
    benchmark.extra_info.update(images_per_second=images_per_second, device=str(DEVICE), batch=BATCH,
                                torch=torch.__version__, threads=torch.get_num_threads())
    record(f"{config} B={BATCH} {DEVICE.type}", impl, images_per_second)
