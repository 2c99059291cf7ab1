"""Timers shared by the benchmarks: the device time of a call between CUDA events, a call captured in a CUDA graph,
and pytest-benchmark as the runner of :func:`mixres.apps.end_to_end.interleaved_ms`'s rounds."""
import statistics

import torch


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


def pedantic_runner(benchmark):
    """The rounds of :func:`mixres.apps.end_to_end.interleaved_ms` run by pytest-benchmark, which times the last
    call itself: its ``setup`` runs the others, so its statistics are the last call's. Its warm-up rounds run the
    setup too."""
    def run(before, last, rounds, warmup):
        benchmark.pedantic(last, setup=before, warmup_rounds=warmup, rounds=rounds, iterations=1)
    return run
