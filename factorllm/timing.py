"""Timing implementations of one computation against each other on a shared, noisy machine."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_in_turns(fns: dict[str, Callable[[], object]], repeats: int, warm_calls: int = 1,
                    sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds of one call of each function. The functions run in turns, so that drift on
    the machine disturbs them all alike, and each timed call follows `warm_calls` untimed calls of
    the same function: a call right after another function's runs slow (the MoE layer's first
    call after the dense FFN ~0.25 ms slower, as much as a whole dispatch path's margin). `sync`
    waits for queued device work (CUDA)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(warm_calls):
                fn()
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def doubling_counts(most: int) -> list[int]:
    """The counts a tuner times up to `most`: 1, 2, 4, ... below it, then `most` itself."""
    return [1 << i for i in range(most.bit_length()) if 1 << i < most] + [most]


def planned(plan: list[tuple[int, str]], count: int, default: str | None) -> str | None:
    """The choice a tuner's plan [(most, choice), ...] (ascending `most`) makes for `count`: the
    first entry covering it, past the last the last's; `default` when nothing was tuned."""
    for most, choice in plan:
        if count <= most:
            return choice
    return plan[-1][1] if plan else default
