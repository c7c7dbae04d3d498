"""Round-robin timing: the one place that times several callables against each other.

`time_round_robin(slots, reference, ...)` gives every slot's `fn` (and the reference) `warmup` untimed
calls, then `rounds` rounds; in each round every callable runs one untimed and `iters` timed calls
back to back, the order rotating every round, so a slow phase of a shared machine hits all alike.
Each slot collects every timed call (`samples`, ms) and each round's median (`round_medians`); the
in-run ratio of two slots is `stats.paired_ratio` of their round medians. Used by the benchmark
harness, `benchmarks/ptq_table.py` and `benchmarks/compare_artifacts.py`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import stats

__all__ = ["Timed", "time_round_robin"]


@dataclass
class Timed:
    """One callable to time, and what the timing collected."""

    key: object  # a label (the harness: (model, target, quant))
    fn: Callable[[], object]  # one call = one timed unit (an inference on a bound input)
    runner: object = None  # whatever made `fn` (the harness keeps its BoundCall here)
    samples: list = field(default_factory=list)  # every timed call, ms
    round_medians: list = field(default_factory=list)


def time_round_robin(slots: Sequence[Timed], reference: Callable[[], object] | None = None, *, warmup: int,
                     rounds: int, iters: int, tick: Callable[[], None] = lambda: None) -> list[float]:
    """Time every slot (and `reference`) round-robin; fills slot.samples / slot.round_medians.

    Returns the reference's round medians (ms), [] without a reference. `tick()` is called after
    each warm-up and each block of timed calls (a progress bar).
    """
    clock = time.perf_counter_ns
    entries = [(s.fn, s) for s in slots] + ([(reference, None)] if reference is not None else [])
    ref_round_medians: list[float] = []
    for fn, _ in entries:
        for _ in range(warmup):
            fn()
        tick()
    for r in range(rounds):
        k = r % len(entries)
        for fn, slot in entries[k:] + entries[:k]:
            fn()  # untimed: the first call after another runtime ran finds cold caches
            times = []
            for _ in range(iters):
                t0 = clock()
                fn()
                times.append((clock() - t0) / 1e6)
            if slot is None:
                ref_round_medians.append(stats.median(times))
            else:
                slot.samples += times
                slot.round_medians.append(stats.median(times))
            tick()
    return ref_round_medians
