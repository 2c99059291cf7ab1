"""Padded against packed (issue 15, item 4): the same Quadformer forward on the same mosaics of variable length, in
the padded layout ([B, N_max, ...], a key-padding mask) and in the packed one ([T, ...], attention per image), at
equal mean tokens per image. One run, one batch size, one precision.

    benchmarks/bench.sh -k padded_vs_packed     (or pytest benchmarks/test_padded_vs_packed.py)

- Model: timm's vit_small_patch16_224 in a Quadformer (``mixres.apps.end_to_end.quadformer_around``: random weights,
  ``pos_embed="resample"``, eval mode, under torch.inference_mode), 224 px, 16-32 px leaves, N_max = 196 (49 roots
  and 49 splits, a valid budget: ``mixres.valid_n_patches(224, min_patch_size=16, max_patch_size=32)``).
- Mosaics: B images, each tokenized by pixel-blur at its own budget 49 + 3k (untimed), with k drawn at random (fixed
  seed) so that the mean length is as near the setting's fraction of N_max as budgets allow (half: 97.9; three
  quarters: 147.1). The padded mosaic holds them at N_max = 196; the packed one is ``mixres.pack`` of it.
- Timing: each round runs the padded forward, then ``model(mixres.pack(padded))`` (packing included: the one host
  synchronisation and a gather), each waiting for the device; medians over the rounds
  (``mixres.apps.end_to_end.interleaved_ms``, pytest-benchmark timing the packed call). Interleaving makes a slow spell
  of this shared machine hit both alike. ``ratio`` = padded time / packed time (above 1: packing is faster).
- Attention: the Quadformer's default, ``packed_attention="auto"``: per image on the CPU (see mixres/models/packing.py
  for the measurements behind the choice).

Environment: MIXRES_BENCH_DEVICE (default: cuda if available, else cpu); MIXRES_BENCH_BATCH (default 16);
MIXRES_BENCH_DTYPE (default float32 on the cpu, bfloat16 on cuda). Rounds: 5 after 1 warm-up on the CPU (a few
minutes on a loaded 2-core VM, where a padded forward of 16 images takes seconds), 20 after 3 on CUDA.
"""
import os

import pytest
import torch

import mixres
from mixres.apps.end_to_end import interleaved_ms, normalised_random_images, quadformer_around, random_vit

from conftest import DEVICE, report
from timers import pedantic_runner

CUDA = DEVICE.type == "cuda"
DTYPE_NAME = os.environ.get("MIXRES_BENCH_DTYPE", "bfloat16" if CUDA else "float32")
DTYPE = getattr(torch, DTYPE_NAME)
BATCH = int(os.environ.get("MIXRES_BENCH_BATCH", "16"))
SIZE, MIN_SIZE, MAX_SIZE, N_MAX = 224, 16, 32, 196
ROUNDS, WARMUP = (20, 3) if CUDA else (5, 1)
# name: the mean length as a fraction of N_max
FRACTIONS = {"half": 0.5, "three-quarters": 0.75}
assert N_MAX in mixres.valid_n_patches(SIZE, min_patch_size=MIN_SIZE, max_patch_size=MAX_SIZE)


def budgets(batch: int, mean: float, seed: int = 0) -> list[int]:
    """``batch`` budgets 49 + 3k <= N_MAX, drawn at random, whose mean is the nearest to ``mean`` that budgets give:
    k uniform on [0, 2 (mean - 49) / 3] (at most 49), then one split more (or fewer) for each image in turn until
    the sum is right."""
    roots = (SIZE // MAX_SIZE) ** 2
    splits_max = (N_MAX - roots) // 3
    generator = torch.Generator().manual_seed(seed)
    high = min(splits_max, round(2 * (mean - roots) / 3))
    splits = torch.randint(0, high + 1, (batch,), generator=generator).tolist()
    wanted = round(batch * (mean - roots) / 3)
    index = 0
    while sum(splits) != wanted:
        step = 1 if sum(splits) < wanted else -1
        if 0 <= splits[index] + step <= splits_max:
            splits[index] += step
        index = (index + 1) % batch
    return [roots + 3 * k for k in splits]


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_padded_vs_packed(benchmark, fraction):
    vit = random_vit("vit_small_patch16_224", SIZE, SIZE, DEVICE, DTYPE)
    model = quadformer_around(vit, N_MAX, "pixel-blur", MIN_SIZE, MAX_SIZE)
    del vit
    images = normalised_random_images(model.vit, BATCH, SIZE, SIZE)
    lengths = budgets(BATCH, FRACTIONS[fraction] * N_MAX)
    with torch.inference_mode():
        singles = [model.tokenize(images[b:b + 1], n_patches=n) for b, n in enumerate(lengths)]
        # The images' leaves one after the other, then unpacked to N_max: the padded batch tokenize would give.
        packed = mixres.PackedMosaic(
            tokens=torch.cat([mosaic.tokens[0] for mosaic in singles]),
            boxes=torch.cat([mosaic.boxes[0] for mosaic in singles]),
            centers=torch.cat([mosaic.centers[0] for mosaic in singles]),
            cu_seqlens=torch.tensor([0] + lengths, device=DEVICE).cumsum(0, dtype=torch.int32),
            max_seqlen=max(lengths), min_patch_size=MIN_SIZE, image_size=(SIZE, SIZE))
        padded = packed.unpack(N_MAX)
        calls = {"padded": lambda: model(padded), "packed": lambda: model(mixres.pack(padded))}
        benchmark.group = f"padded vs packed vit_small B={BATCH} {DEVICE.type} {DTYPE_NAME}"
        ms, outputs = interleaved_ms(calls, DEVICE, ROUNDS, WARMUP, pedantic_runner(benchmark))
    assert outputs["padded"].shape == outputs["packed"].shape == (BATCH, model.num_classes)
    # The same computation (tests/test_packed.py checks it to rounding): a loose guard against timing a broken path.
    scale = outputs["padded"].float().abs().max().item()
    torch.testing.assert_close(outputs["packed"].float(), outputs["padded"].float(), rtol=0, atol=0.05 * scale)
    mean = sum(lengths) / BATCH
    ratio = ms["padded"] / ms["packed"]
    benchmark.extra_info.update(model="vit_small_patch16_224", batch=BATCH, dtype=DTYPE_NAME, device=str(DEVICE),
                                n_max=N_MAX, mean_length=mean, lengths=lengths, padded_ms=ms["padded"],
                                packed_ms=ms["packed"], ratio=ratio, attention=model.packed_attention)
    report(f"padded vs packed vit_small B={BATCH} {DEVICE.type} {DTYPE_NAME}, mean length {mean:.1f} of N_max "
           f"{N_MAX} ({fraction}): padded {ms['padded']:.1f} ms, packed {ms['packed']:.1f} ms, "
           f"padded / packed = {ratio:.2f}x")
