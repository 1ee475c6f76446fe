"""Paired timing: every model timed in one process, round-robin in blocks, so that speed ratios hold on a shared machine.

Absolute times on a shared CPU move by 2x between runs minutes apart, so a ratio of two numbers taken at different
times means little. Here each round times every model in turn, in a block: a few untimed warm-up calls (they refill
the caches the previous model emptied), then `block_calls` timed calls whose median is the block's figure. A model's
time is the median of its block medians; a ratio to the reference is taken per round (the two blocks ran seconds
apart, under the same load) and summarised by its median and interquartile range over the rounds.

    timings = time_round_robin({"teacher": lambda: teacher(**batch), "student": lambda: student(**batch)})
    speedups(timings, "teacher")["student"].ratio   # e.g. 2.03, with .q1 / .q3 around it
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """One model's block medians (milliseconds per call), one per round."""

    block_medians_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.block_medians_ms))

    @property
    def q1_ms(self) -> float:
        return float(np.percentile(self.block_medians_ms, 25))

    @property
    def q3_ms(self) -> float:
        return float(np.percentile(self.block_medians_ms, 75))


@dataclass(frozen=True)
class Speedup:
    """How many times faster than the reference: the median of the per-round ratios, and their quartiles."""

    ratio: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.ratio:.2f} ({self.q1:.2f}-{self.q3:.2f})"


def time_round_robin(calls: dict[str, Callable[[], object]], rounds: int = 10, block_calls: int = 15,
                     warmup_calls: int = 3, synchronize: Callable[[], None] | None = None,
                     on_round: Callable[[int], None] | None = None) -> dict[str, Timing]:
    """Time every callable in `calls` round-robin: `rounds` rounds, each one block per callable.

    `synchronize` (e.g. torch.cuda.synchronize) is called around each timed call so asynchronous devices are timed
    to completion; `on_round(round_index)` reports progress.
    """
    if not calls:
        return {}
    sync = synchronize or (lambda: None)
    block_medians: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds):
        for name, call in _rotated(calls, round_index):
            for _ in range(warmup_calls):
                call()
            block_medians[name].append(float(np.median(_timed_calls(call, block_calls, sync))))
        if on_round is not None:
            on_round(round_index)
    return {name: Timing(tuple(medians)) for name, medians in block_medians.items()}


def _rotated(calls: dict, offset: int) -> Iterable:
    """The callables in a different order each round, so none always runs right after the same neighbour."""
    items = list(calls.items())
    offset %= len(items)
    return items[offset:] + items[:offset]


def _timed_calls(call: Callable[[], object], count: int, sync: Callable[[], None]) -> list[float]:
    timings = []
    for _ in range(count):
        sync()
        start = time.perf_counter()
        call()
        sync()
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def speedups(timings: dict[str, Timing], reference: str) -> dict[str, Speedup]:
    """Each model's speed-up over `reference` (reference time / model time), paired round by round."""
    base = np.array(timings[reference].block_medians_ms)
    result = {}
    for name, timing in timings.items():
        ratios = base / np.array(timing.block_medians_ms)
        result[name] = Speedup(float(np.median(ratios)), float(np.percentile(ratios, 25)),
                               float(np.percentile(ratios, 75)))
    return result


# The instruction sets that decide how fast int8 and bf16 run on an x86 CPU: ONNX Runtime's int8 GEMMs use VNNI or
# AMX where the CPU has them (AVX2 otherwise), torch's bf16 matmuls AMX.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU's model name and which of KERNEL_FLAGS it has, e.g. "AMD EPYC (avx2)": timings depend on both."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as file:
                cpuinfo = file.read()
        except OSError:
            return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    present = [flag for flag in KERNEL_FLAGS if flags and flag in flags.group(1).split()]
    kernels = ", ".join(present) if present else "no " + "/".join(KERNEL_FLAGS)
    return f"{name.group(1).strip() if name else platform.machine()} ({kernels})"
