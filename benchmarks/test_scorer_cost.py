"""What each scorer costs next to the tokenizer it feeds, same run, same device.

    benchmarks/bench.sh -k scorer     (or pytest benchmarks/test_scorer_cost.py)

256 px RGB images, 16-64 px patches, N=100, B = MIXRES_BENCH_BATCH (default 256 on cuda, 16 on cpu). Networks
have random weights (their cost does not depend on the weights): FeatureBased on ShuffleNetV2 x0.5, GradCAM on a
torchvision ResNet-18.
"""
import os
import warnings

import pytest
import torch

import mixres

from conftest import DEVICE, inputs, median_seconds, report

BATCH = int(os.environ.get("MIXRES_BENCH_BATCH", "256" if DEVICE.type == "cuda" else "16"))
SIZE, MIN_SIZE, MAX_SIZE, N_PATCHES = 256, 16, 64, 100


def gradcam():
    import torchvision

    model = torchvision.models.resnet18().to(DEVICE)
    return mixres.GradCAM(model, min_patch_size=MIN_SIZE, max_patch_size=MAX_SIZE)


def feature_based():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights, on purpose
        return mixres.FeatureBased(random_init=True, min_patch_size=MIN_SIZE, max_patch_size=MAX_SIZE)


SCORERS = {
    "Uniform": lambda: mixres.Uniform(MIN_SIZE, MAX_SIZE),
    "Random": lambda: mixres.Random(MIN_SIZE, MAX_SIZE, seed=0),
    "PixelBlur": lambda: mixres.PixelBlur(MIN_SIZE, MAX_SIZE),
    "Entropy": lambda: mixres.Entropy(MIN_SIZE, MAX_SIZE),
    "FeatureBased": feature_based,
    "GradCAM": gradcam,
}
_tokenize_ms: list[float] = []


def timed(benchmark, fn, rounds):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, warmup_rounds=2, rounds=rounds, iterations=1)
    return median_seconds(benchmark) * 1e3


def test_tokenize(benchmark):
    images, pyramid = inputs(BATCH, SIZE, MIN_SIZE, MAX_SIZE, DEVICE)
    benchmark.group = f"scorers B={BATCH} {DEVICE.type}"
    ms = timed(benchmark, lambda: mixres.tokenize(images, pyramid, N_PATCHES, MIN_SIZE, MAX_SIZE), rounds=20)
    _tokenize_ms.append(ms)
    report(f"scorers, {SIZE} px B={BATCH} {DEVICE.type}: tokenize (precomputed scores) {ms:.3f} ms")


@pytest.mark.parametrize("name", SCORERS)
def test_scorer(benchmark, name):
    images, _ = inputs(BATCH, SIZE, MIN_SIZE, MAX_SIZE, DEVICE)
    scorer = SCORERS[name]()
    benchmark.group = f"scorers B={BATCH} {DEVICE.type}"
    ms = timed(benchmark, lambda: scorer(images), rounds=10)
    benchmark.extra_info.update(batch=BATCH, device=str(DEVICE), median_ms=ms)
    ratio = f" = {ms / _tokenize_ms[0]:.2f}x tokenize" if _tokenize_ms else ""
    bandwidth = ""
    if name not in ("Uniform", "Random"):
        # A scorer that reads pixels reads every one at least once: the images' bytes over the time is the least
        # bandwidth it achieved, to set against the device's copy bandwidth (test_cuda_costs.py measures it).
        benchmark.extra_info["images_read_gb_s"] = images.nbytes / ms / 1e6
        bandwidth = f"; images read at {images.nbytes / ms / 1e6:.3g} GB/s"
    report(f"scorers, {SIZE} px B={BATCH} {DEVICE.type}: {name} {ms:.3f} ms{ratio}{bandwidth}")
