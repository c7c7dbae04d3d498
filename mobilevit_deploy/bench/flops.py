"""FLOPs counted on the eager model, and the machine's measured fp32 matmul peak.

Convention: GFLOPs = 2 x multiply-accumulates (torch.utils.flop_counter.FlopCounterMode counts a
multiply and an add per MAC). Only matmul-like ops are counted (conv, mm, addmm, bmm, baddbmm, sdpa);
softmax, normalisation and activations are not, which is the usual convention. The MobileViT paper's
"FLOPs" are MACs, i.e. our GFLOPs / 2.
"""
from __future__ import annotations

import time


def count_flops(model, input_size: tuple[int, int], batch: int = 1) -> dict:
    """{"gflops": total / 1e9, "by_op": {op: flops}} for one forward of `model` on [batch, 3, H, W]."""
    import torch

    return count_flops_on(model, torch.zeros(batch, 3, int(input_size[0]), int(input_size[1])))


def count_flops_on(model, x) -> dict:
    """`count_flops` for one forward of `model` on the tensor `x` (any input, e.g. a stage's features)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return {"gflops": fc.get_total_flops() / 1e9, "by_op": by_op}


def matmul_flops(n: int) -> int:
    """FLOPs of an n x n by n x n fp32 matmul (2 n^3)."""
    return 2 * n ** 3


def make_matmul(n: int, seed: int = 0):
    """A callable computing one n x n fp32 matmul into a preallocated output (the reference workload)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)

    def run():
        torch.mm(a, b, out=out)
        return out

    return run


def measure_peak(num_threads: int, n: int = 2048, repeats: int = 8) -> dict:
    """The fp32 matmul peak: best of `repeats` timed n x n matmuls with `num_threads` torch threads.

    Returns {"gflops_per_s", "n", "threads", "best_ms", "median_ms"}.
    """
    import torch

    from . import stats

    prev = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        run = make_matmul(n)
        run()
        run()  # warm-up: page in, spin up threads
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            run()
            times.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        torch.set_num_threads(prev)
    best = min(times)
    return {"gflops_per_s": matmul_flops(n) / (best / 1e3) / 1e9, "n": n, "threads": num_threads,
            "best_ms": best, "median_ms": stats.median(times)}
