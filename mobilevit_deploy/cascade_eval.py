"""Measuring a cascade artifact on real images: top-1, exit rate per stage, and the mean latency per image
of the cascade and of its last stage alone, in the same run (`evaluate --artifact CASCADE`, the bench
harness's cascade rows, `benchmarks/cascade_study.py`).

Every image is prepared once at every stage size (`data.eval_transform` of the manifest's DeployCfg at
that size), outside the timed region; the timed region is the runtime's inference calls and the exit
decision (`CascadeRunner.run_prepared`), and, for the comparison, the last stage alone on the same
prepared inputs. Both run as a stream over blocks of `block` images (what a deployment sees: the
cascade switches methods, the last stage alone does not), the two timed back to back on every block in
alternating order so a slow phase of the shared machine hits both alike; the whole pass is repeated
`repeats` times and each block keeps its fastest time (best-of, robust to preemption on a loaded
machine). Mean latency per image = sum of the blocks' times / images. Untimed warm-up images come first.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["CascadeMeasurement", "prepare_inputs", "measure_cascade", "labelled_images"]


@dataclass
class CascadeMeasurement:
    threshold: float
    images: int
    top1: float  # % of images the cascade answers right
    last_stage_top1: float  # % right for the last stage (a depth cascade: the whole model) alone, same images and run
    exit_rates: list  # fraction of images answered by each stage
    mean_latency_ms: float  # mean time per image through the cascade
    last_stage_latency_ms: float  # mean time per image of the last stage alone
    stage_names: list = field(default_factory=list)
    threads: int | None = None
    alone: str = "last stage"  # what the cascade is compared with: "last stage" or the whole model's method name

    @property
    def latency_ratio(self) -> float:
        return self.mean_latency_ms / self.last_stage_latency_ms

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "images": self.images, "top1": self.top1,
                "last_stage_top1": self.last_stage_top1, "exit_rates": self.exit_rates,
                "mean_latency_ms": self.mean_latency_ms, "last_stage_latency_ms": self.last_stage_latency_ms,
                "latency_ratio": self.latency_ratio, "stages": self.stage_names, "threads": self.threads,
                "alone": self.alone}


def labelled_images(data, labels: Sequence[str], limit: int | None = None) -> tuple[list[str], list[int]]:
    """(paths, label indices in `labels`' order) of an ImageFolder whose classes are `labels`; `limit`:
    that many images, evenly spread over the sorted list (the same pick as `evaluate --limit`)."""
    from .data import list_image_folder
    from .errors import DataError

    samples, classes = list_image_folder(data)
    if sorted(classes) != sorted(labels):
        raise DataError(f"class folders of {data} do not match the cascade's labels: data has {classes}, "
                        f"model has {list(labels)}")
    if limit:
        samples = samples[:: max(1, len(samples) // limit)][:limit]
    return [p for p, _ in samples], [list(labels).index(classes[c]) for _, c in samples]


def prepare_inputs(runner, paths: Sequence[str], progress: bool = False) -> list[list]:
    """Every image prepared for every stage: [[x_stage0, x_stage1, ...] per image]."""
    from tqdm import tqdm

    return [runner.prepare_all(p) for p in tqdm(paths, desc="prepare", disable=not progress, unit="img")]


def measure_cascade(runner, inputs: Sequence[Sequence], labels: Sequence[int], *, threshold: float | None = None,
                    warmup: int = 10, repeats: int = 3, block: int = 20, progress: bool = False) -> CascadeMeasurement:
    """Run the cascade (at `threshold`, default the runner's) and the last stage alone on every prepared image."""
    from tqdm import tqdm

    if len(inputs) == 0:
        from .errors import DataError

        raise DataError("no images to measure the cascade on")
    saved = runner.threshold
    if threshold is not None:
        runner.threshold = float(threshold)
    try:
        last_stage = runner.alone  # the last stage / whole model alone, on inputs[k][runner.alone_input]
        last = runner.alone_input
        for k in range(min(warmup, len(inputs))):
            runner.run_prepared(inputs[k])
            last_stage.run_one(inputs[k][last])
        clock = time.perf_counter_ns
        blocks = [range(i, min(i + block, len(inputs))) for i in range(0, len(inputs), block)]
        best_cascade = [None] * len(blocks)
        best_last = [None] * len(blocks)
        answers, outs_last = [None] * len(inputs), [None] * len(inputs)

        def run_cascade(b):
            for k in b:
                answers[k] = runner.run_prepared(inputs[k])

        def run_last(b):
            for k in b:
                outs_last[k] = last_stage.run_one(inputs[k][last])

        for r in tqdm(range(max(1, repeats)), desc="cascade", disable=not progress, unit="pass"):
            for j, b in enumerate(blocks):
                first_cascade = (j + r) % 2 == 0
                for which in ((0, 1) if first_cascade else (1, 0)):
                    t0 = clock()
                    run_cascade(b) if which == 0 else run_last(b)
                    dt = clock() - t0
                    best = best_cascade if which == 0 else best_last
                    best[j] = dt if best[j] is None else min(best[j], dt)
        t_cascade, t_last = sum(best_cascade), sum(best_last)
        answered = [0] * len(runner.stages)
        for a in answers:
            answered[a.stage] += 1
        right = sum(int(a.label_index == y) for a, y in zip(answers, labels))
        right_last = sum(int(int(o.argmax(-1)[0]) == y) for o, y in zip(outs_last, labels))
        n = len(inputs)
        return CascadeMeasurement(
            threshold=runner.threshold, images=n, top1=100.0 * right / n, last_stage_top1=100.0 * right_last / n,
            exit_rates=[a / n for a in answered], mean_latency_ms=t_cascade / n / 1e6,
            last_stage_latency_ms=t_last / n / 1e6, stage_names=list(runner.stage_names),
            threads=getattr(runner, "num_threads", None), alone=getattr(runner, "alone_what", "last stage"))
    finally:
        runner.threshold = saved
