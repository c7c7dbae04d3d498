"""A/B timing of artifacts of one model, interleaved round-robin in one process (before/after rows).

    python -m benchmarks.compare_artifacts --size 256 --threads 1 A.pte B.pte C.onnx [--model mobilevit_xxs]

Every artifact gets the bench input (`mobilevit_deploy.bench.harness.bench_input`) and the same thread
count; the benchmark's round-robin timing (`bench.timing.time_round_robin`) and in-run reference
(fp32 matmul) are used, so the rows compare within the run even on a busy machine. Prints one row per artifact:
median / p10 / p90 ms, ratio to the reference, and ratio to the first artifact (paired per round).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--model", default="mobilevit_xxs", help="for the input's normalisation (DeployCfg)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)

    from dataclasses import replace

    import torch

    from mobilevit_deploy.bench import stats
    from mobilevit_deploy.bench.flops import make_matmul
    from mobilevit_deploy.bench.harness import REF_N, bench_input
    from mobilevit_deploy.bench.runners import artifact_runner
    from mobilevit_deploy.bench.timing import Timed, time_round_robin
    from mobilevit_deploy.models import get_deploy_cfg

    torch.set_num_threads(a.threads)
    cfg = replace(get_deploy_cfg(a.model), input_size=(3, a.size, a.size))
    x = bench_input(cfg)
    slots = []
    for path in a.artifacts:
        target = {".pte": "executorch", ".onnx": "onnx", ".mlpackage": "coreml"}[Path(path).suffix]
        runner = artifact_runner(target, path, x, a.threads, "?")
        slots.append(Timed((path, target, "?"), runner.fn, runner))
    ref = time_round_robin(slots, make_matmul(REF_N), warmup=a.warmup, rounds=a.rounds, iters=a.iters)
    first = slots[0]
    rows = []
    print(f"{a.threads} threads, {a.rounds} rounds x {a.iters} inferences, reference matmul median "
          f"{stats.median(ref):.2f} ms")
    for s in slots:
        st = stats.summarize(s.samples)
        row = {"artifact": s.key[0], "target": s.key[1], "median_ms": st["median"], "p10_ms": st["p10"],
               "p90_ms": st["p90"], "ratio": stats.paired_ratio(s.round_medians, ref),
               "vs_first": stats.paired_ratio(s.round_medians, first.round_medians), "threads": s.runner.threads}
        rows.append(row)
        print(f"  {row['median_ms']:8.2f} ms (p10 {row['p10_ms']:.2f}, p90 {row['p90_ms']:.2f})  "
              f"ratio {row['ratio']:.3f}"
              f"  vs first {row['vs_first']:.3f}  {row['artifact']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
