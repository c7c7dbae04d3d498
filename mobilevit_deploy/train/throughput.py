"""Measure training throughput (forward + backward + AdamW step) in fp32 and bf16 autocast.

    python -m mobilevit_deploy.train.throughput --model mobilevit_xxs --size 64 --batch 64 \
        [--amp fp32 bf16] [--channels-last off on] [--steps 5]

Random inputs, a 10-class head; prints img/s per precision (median step time after one warm-up step).
Use it to decide a recipe's `amp`: bf16 autocast only pays on CPUs with native bf16 (AVX512-BF16/AMX).
"""
from __future__ import annotations

import os
import statistics
import time

from ..cli import ArgumentParser, run_cli


def measure(model: str = "mobilevit_xxs", size: int = 64, batch: int = 64, amp: str = "fp32", steps: int = 5,
            threads: int | None = None, channels_last: bool = False, **model_kwargs) -> dict:
    import torch

    from ..models import create_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = create_model(model, num_classes=10, **model_kwargs).train()
    if hasattr(m, "set_input_size"):  # CMT: size its relative position biases for `size`, as a recipe's img_size does
        m.set_input_size(size)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = m(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"model": model, "size": size, "batch": batch, "amp": amp, "channels_last": channels_last,
            "threads": torch.get_num_threads(),
            "step_ms": round(1000 * med, 1), "img_per_s": round(batch / med, 1), "steps": steps,
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m mobilevit_deploy.train.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilevit_xxs")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--amp", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--channels-last", nargs="+", default=["off"], choices=["off", "on"],
                   help="memory format(s) to measure (the trainer's default, channels_last: true, is 'on')")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for amp in a.amp:
        for cl in a.channels_last:
            r = measure(a.model, a.size, a.batch, amp, a.steps, a.threads, channels_last=cl == "on")
            cl_tag = " channels_last" if r["channels_last"] else ""
            print(f"{r['model']} {r['size']} px batch {r['batch']} {amp}{cl_tag}: "
                  f"{r['step_ms']:.0f} ms/step, {r['img_per_s']:.1f} img/s "
                  f"({r['threads']} threads, load avg {r['load_avg_1min']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
