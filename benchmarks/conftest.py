"""Prints tokenize throughput in images/s, and the speed-up of the C++/CUDA ops over the reference, per config."""
import pytest

_results: dict[tuple[str, str], float] = {}


def record(config: str, impl: str, images_per_second: float) -> None:
    _results[(config, impl)] = images_per_second


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    terminalreporter.section("mixres tokenize throughput (median)")
    for config in sorted({config for config, _ in _results}):
        ops, ref = _results.get((config, "ops")), _results.get((config, "reference"))
        line = f"{config}: ops {ops:,.0f} images/s" if ops else f"{config}:"
        if ref:
            line += f", reference {ref:,.0f} images/s"
        if ops and ref:
            line += f", ops / reference = {ops / ref:.1f}x"
        terminalreporter.write_line(line)
