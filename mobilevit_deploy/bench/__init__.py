"""Benchmarks: host latency (eager, ExecuTorch, ONNX Runtime, Core ML on macOS), device reports, paper data.

`python -m mobilevit_deploy.bench --help`. Importing this package is light; the runners import their
runtimes when they are built (artifacts are run by `mobilevit_deploy.runtime`). Public entry points:
`harness.run_benchmark` / `harness.BenchSession`, `timing.time_round_robin`,
`device_report.load_device_report`, `device_report.modelbench_stats`, `baseline.compare`,
`paper.paper_figure`.
"""
from __future__ import annotations

__all__ = ["load_device_report", "modelbench_stats"]

from .device_report import load_device_report, modelbench_stats
