"""Inputs shared by the tests: random score pyramids, with and without ties, and mosaics; subprocess runs.
The oracles are in oracles.py."""
import contextlib
import os
import signal
import subprocess
import sys

import torch
from hypothesis import strategies as st

import mixres
from mixres.pyramid import QuadtreeGeometry

# The tests' subprocesses time out only so that a hang fails instead of blocking the suite: the slowest takes about a
# minute on an idle 2-core machine, and several times that on a loaded one. MIXRES_TEST_TIMEOUT (seconds) overrides.
HANG_TIMEOUT = float(os.environ.get("MIXRES_TEST_TIMEOUT", 900))


def random_pyramid(geometry: QuadtreeGeometry, batch: int, seed: int = 0, ties: bool = False,
                   dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    """One random map per splittable size. With ``ties``, scores come from {0, 1, 2}: many equal values."""
    generator = torch.Generator().manual_seed(seed)
    maps = []
    for size in geometry.splittable_sizes:
        shape = (batch, *geometry.grid(size))
        if ties:
            maps.append(torch.randint(0, 3, shape, generator=generator).to(dtype))
        else:
            maps.append(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype))
    return [m.to(device) for m in maps]


def random_mosaic(batch=3, channels=3, height=128, width=192, n_patches=60, seed=0, dtype=torch.float32,
                  **tokenize_kwargs):
    """Random images [B, C, H, W] (16-64 px patches) and their mosaic for a random pyramid."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, height, width, generator=generator, dtype=torch.float64).to(dtype)
    geometry = QuadtreeGeometry(height, width, 16, 64)
    return images, mixres.tokenize(images, random_pyramid(geometry, batch, seed), n_patches, **tokenize_kwargs)


def pad_mosaics(mosaics: list[mixres.Mosaic]) -> mixres.Mosaic:
    """One padded batch of single-image mosaics of their own lengths, laid out as docs/design.md says: each image's
    leaves first, then padding up to the longest: tokens 0, boxes (0, 0, 0), centres (-0.5, -0.5); lengths [B]
    int64. Built by hand, for the models' tests, independently of tokenize's own padding."""
    n_max = max(mosaic.tokens.shape[1] for mosaic in mosaics)

    def padded(tensor, fill):
        padding = tensor.new_tensor(fill).expand(1, n_max - tensor.shape[1], *tensor.shape[2:])
        return torch.cat([tensor, padding], dim=1)

    first = mosaics[0]
    return mixres.Mosaic(tokens=torch.cat([padded(mosaic.tokens, 0) for mosaic in mosaics]),
                         boxes=torch.cat([padded(mosaic.boxes, [0, 0, 0]) for mosaic in mosaics]),
                         centers=torch.cat([padded(mosaic.centers, [-0.5, -0.5]) for mosaic in mosaics]),
                         min_patch_size=first.min_patch_size, image_size=first.image_size,
                         lengths=torch.tensor([mosaic.tokens.shape[1] for mosaic in mosaics],
                                              device=first.tokens.device))


def random_boxes(batch: int, n_leaves: int, height: int, width: int, sizes: list[int], seed: int = 0) -> torch.Tensor:
    """Arbitrary boxes [B, N, 3] int32 inside a height x width image: they overlap, and their sides (drawn from
    ``sizes``) need not be multiples of a token side."""
    generator = torch.Generator().manual_seed(seed)
    size = torch.tensor(sizes)[torch.randint(0, len(sizes), (batch, n_leaves), generator=generator)]
    y = (torch.rand(batch, n_leaves, generator=generator) * (height - size + 1)).long()
    x = (torch.rand(batch, n_leaves, generator=generator) * (width - size + 1)).long()
    return torch.stack([y, x, size], dim=-1).to(torch.int32)


def coverage(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """How many leaves cover each pixel, [B, H, W]: all ones for a mosaic."""
    count = torch.zeros(boxes.shape[0], height, width, dtype=torch.int32)
    for b in range(boxes.shape[0]):
        for y, x, s in boxes[b].tolist():
            count[b, y:y + s, x:x + s] += 1
    return count


# Defines cap_memory(headroom_mb) in a script run by run_script: from then on, the process may map at most
# headroom_mb more megabytes (RLIMIT_AS). A larger allocation raises a RuntimeError ("can't allocate memory")
# instead of exhausting the machine.
_CAP_MEMORY = """
import resource as _resource


def cap_memory(headroom_mb):
    with open("/proc/self/status") as status:
        in_use = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
    _resource.setrlimit(_resource.RLIMIT_AS, (in_use + (headroom_mb << 20), _resource.RLIM_INFINITY))
"""


def run_script(script: str, timeout: float = HANG_TIMEOUT) -> None:
    """Runs ``script`` in a fresh Python process (the worktree's mixres and tests/ importable; ``cap_memory`` defined)
    and fails the test, with its output, unless it exits with status 0: a crash (a signal such as SIGSEGV), a hang
    (past ``timeout`` seconds) or an exception. So a crash fails the test instead of killing pytest.

    glibc's malloc is given a fixed mmap threshold, so that large blocks go back to the system when freed and a
    memory cap measures what the code holds, not the allocator's caching."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests, os.environ.get("PYTHONPATH", "")]))
    try:
        result = subprocess.run([sys.executable, "-c", _CAP_MEMORY + script], capture_output=True, text=True,
                                timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"the script hung (no exit after {timeout} s); its output:\n{error.stdout}\n"
                             f"{error.stderr}") from None
    if result.returncode != 0:
        how = (f"was killed by signal {signal.Signals(-result.returncode).name}" if result.returncode < 0
               else f"exited with status {result.returncode}")
        raise AssertionError(f"the script {how}; its output:\n{result.stdout}\n{result.stderr}")


@st.composite
def small_geometries(draw) -> QuadtreeGeometry:
    """A hypothesis strategy: 1 to 3 x 1 to 3 roots of 1 to 4 levels above a 4, 8 or 16 px smallest leaf."""
    min_size = draw(st.sampled_from([4, 8, 16]))
    max_size = min_size << (draw(st.integers(1, 4)) - 1)
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return QuadtreeGeometry(rows * max_size, cols * max_size, min_size, max_size)


def captured_in_cuda_graph(fn):
    """``fn()`` captured in a CUDA graph, after a warm-up call on a side stream (as torch.cuda.graph's documentation
    asks): (the graph, the outputs of the captured call, which each replay overwrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def float64_tolerance(reference):
    """The logits (and pooled features) come out of a few dozen float64 sums (dot products of up to 128 terms, layer
    norms, softmaxes over at most 33 keys, pooling over at most 31 tokens), each rounded to 2^-53 relative. A padded
    batch sums in another order (over N_max keys, the padding ones exactly 0 after the mask; over N_max tokens when
    pooling), so it may differ by a few units of 2^-53 of the largest output (at most 17 measured, with 1 to 8
    threads and without vector instructions): 64 units hold any order. A token that leaks through the mask moves
    the outputs by more than 10^10 of that."""
    return 64 * 2**-53 * reference.abs().max().item()


@contextlib.contextmanager
def raising_on_host_sync(enabled: bool = True):
    """Within it, a CUDA call that synchronises with the host raises (``torch.cuda.set_sync_debug_mode("error")``);
    the default mode is back afterwards, whatever happens. ``enabled=False``: a no-op, for code that may sync."""
    if enabled:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
