"""What the tokenizer costs on a GPU next to what surrounds it (skipped without CUDA).

    pytest benchmarks/test_cuda_costs.py --benchmark-json=out/cuda_costs.json

At B=256 (MIXRES_BENCH_BATCH), N=100, 16 px tokens, RGB, ``mode="area"``, random score pyramids:
- tokenize time as a share of a bf16 ViT-B/16 forward over the same tokens (timm, random weights), with the
  tokenizer called eagerly from Python (what a training loop pays) and replayed from a CUDA graph (the kernels
  alone);
- the resize kernel's achieved bandwidth against a device-to-device copy measured in the same run;
- the quadtree and centre kernels' own times.

Device times are medians of CUDA-event intervals; the eager tokenize is timed on the host with a synchronisation,
as pytest-benchmark does. Images are 200 MB per batch at 256 px float32, far beyond the L2 cache.
"""
import os
import statistics

import pytest
import torch

import mixres

from conftest import CONFIGS, inputs, report

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")
BATCH = int(os.environ.get("MIXRES_BENCH_BATCH", "256"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_vit_ms: dict[str, float] = {}


def device_ms(fn, reps: int = 30, warmup: int = 3) -> float:
    """Median device time of one ``fn()``, between CUDA events recorded around each call."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def graphed(fn):
    """``fn`` captured in a CUDA graph: a replay launches its kernels with no Python or launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on a side stream, as torch.cuda.graphs requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def vit_b16():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_base_patch16_224", pretrained=False).to(DEVICE, torch.bfloat16).eval()


def vit_forward(model, tokens):
    """ViT-B/16 over ``tokens [B, N, 3, 16, 16]``: the patch embedding applied to each token, then the encoder.

    Position embeddings are the first N+1 of the model's table: a stand-in with the right cost until the Quadformer
    models (issue 5) embed the leaves' positions."""
    batch, n = tokens.shape[:2]
    x = model.patch_embed.proj(tokens.flatten(0, 1)).reshape(batch, n, -1)
    x = torch.cat([model.cls_token.expand(batch, -1, -1), x], dim=1) + model.pos_embed[:, : n + 1]
    return model.forward_head(model.norm(model.blocks(x)))


@pytest.mark.parametrize("config", CONFIGS)
def test_vit_b16_forward(benchmark, config):
    size, min_size, max_size, n_patches = CONFIGS[config]
    images, pyramid = inputs(BATCH, size, min_size, max_size, DEVICE, torch.bfloat16)
    tokens = mixres.tokenize(images, pyramid, n_patches, min_size, max_size).tokens
    model = vit_b16()
    with torch.inference_mode():
        ms = device_ms(lambda: vit_forward(model, tokens), reps=20)
        benchmark.pedantic(lambda: (vit_forward(model, tokens), torch.cuda.synchronize()), rounds=5, iterations=1)
    _vit_ms[config] = ms
    benchmark.extra_info.update(device_ms=ms, batch=BATCH, n_patches=n_patches)
    report(f"{config} B={BATCH}: bf16 ViT-B/16 forward over {n_patches} tokens: {ms:.2f} ms")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_tokenize_share_of_vit(benchmark, config, dtype):
    size, min_size, max_size, n_patches = CONFIGS[config]
    images, pyramid = inputs(BATCH, size, min_size, max_size, DEVICE, DTYPES[dtype])

    def tokenize():
        return mixres.tokenize(images, pyramid, n_patches, min_size, max_size)

    graph_ms = device_ms(graphed(tokenize), reps=50)
    benchmark.pedantic(lambda: (tokenize(), torch.cuda.synchronize()), warmup_rounds=3, rounds=30, iterations=1)
    eager_ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(graph_ms=graph_ms, eager_ms=eager_ms, batch=BATCH)
    vit_ms = _vit_ms.get(config)
    share = "" if vit_ms is None else \
        f" = {100 * eager_ms / vit_ms:.1f}% (eager) and {100 * graph_ms / vit_ms:.1f}% (graph) of the ViT forward"
    report(f"{config} B={BATCH} {dtype} images: tokenize {eager_ms:.3f} ms eager, {graph_ms:.3f} ms as a CUDA graph"
           f"{share}")


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
