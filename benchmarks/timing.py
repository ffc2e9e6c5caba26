"""Interleaved step timing and peak CUDA memory, shared by the step benchmarks (framework-free)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def interleaved_medians(
    steps: Mapping[str, Callable[[int], None]], repeats: int, device: str, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each ``step(index)``, the steps run in turn for each index so machine noise
    hits all alike; the first ``warmup`` rounds are not counted."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(repeats + warmup):
        for name, run in steps.items():
            sync()
            start = time.perf_counter()
            run(index)
            sync()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cuda_peaks(steps: Mapping[str, Callable[[int], None]]) -> dict[str, float]:
    """MiB of ``torch.cuda.max_memory_allocated`` during one more step of each."""
    peaks = {}
    for name, run in steps.items():
        torch.cuda.reset_peak_memory_stats()
        run(0)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20
    return peaks
