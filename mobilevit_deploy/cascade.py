"""Coarse-to-fine cascades (CF-ViT, Chen et al. AAAI 2023, as static graphs): the exit rule, the choice
of its threshold on real images, and the cascade's accuracy / exit rates for a given threshold.

A cascade runs stage 1 on a small input; when the largest softmax probability of its output reaches
the threshold its answer is final, otherwise the next stage runs on the same image at its own, larger
size; the last stage always answers. The rule and the threshold travel in the artifact manifest's
`cascade` section (docs/contracts.md), read by `runtime.py` and the Swift package alike.

Everything here works on per-stage probability arrays ([N, C] per stage, the same N images), so the
threshold is chosen once from one pass of every stage over the exit data.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import UserError

EXIT_RULE = "max_probability"


@dataclass(frozen=True)
class CascadeOutcome:
    threshold: float
    top1: float  # % of images whose answering stage is right
    exit_rates: tuple  # fraction of images answered by each stage (sums to 1)

    def cost(self, stage_costs: Sequence[float]) -> float:
        """Mean cost per image when stage i costs stage_costs[i] and an image runs stages 1..answering one."""
        reach = 1.0
        total = 0.0
        for rate, c in zip(self.exit_rates, stage_costs):
            total += reach * c
            reach -= rate
        return total


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    outcome: CascadeOutcome
    last_stage_top1: float
    max_drop_points: float
    sweep: list = field(default_factory=list)  # CascadeOutcome for every candidate threshold, ascending

    def to_manifest(self, data: str, images: int) -> dict:
        return {"data": data, "images": images, "max_drop_points": self.max_drop_points,
                "last_stage_top1": round(self.last_stage_top1, 2), "cascade_top1": round(self.outcome.top1, 2),
                "exit_rates": [round(r, 4) for r in self.outcome.exit_rates]}


def check_sizes(sizes: Sequence[int]) -> list[int]:
    """Validated cascade input sizes: at least two, strictly increasing, positive."""
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise UserError(f"--cascade needs at least two input sizes, smallest first (e.g. 48,64), got {sizes}")
    if any(s <= 0 for s in sizes) or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise UserError(f"--cascade sizes must be positive and strictly increasing (e.g. 48,64), got {sizes}")
    return sizes


def answering_stage(stage_probs, threshold: float):
    """Index of the stage that answers each image: the first non-last stage whose max probability >= threshold."""
    import numpy as np

    n = stage_probs[0].shape[0]
    ans = np.full(n, len(stage_probs) - 1)
    open_ = np.ones(n, dtype=bool)
    for i, p in enumerate(stage_probs[:-1]):
        exit_ = open_ & (p.max(1) >= threshold)
        ans[exit_] = i
        open_ &= ~exit_
    return ans


def simulate(stage_probs, labels, threshold: float) -> CascadeOutcome:
    """Top-1 and exit rates of the cascade at `threshold` from every stage's probabilities on the same images."""
    import numpy as np

    labels = np.asarray(labels)
    ans = answering_stage(stage_probs, threshold)
    preds = np.stack([p.argmax(1) for p in stage_probs])  # [S, N]
    chosen = preds[ans, np.arange(len(labels))]
    rates = tuple(float((ans == i).mean()) for i in range(len(stage_probs)))
    return CascadeOutcome(float(threshold), 100.0 * float((chosen == labels).mean()), rates)


def choose_threshold(stage_probs, labels, max_drop_points: float = 0.5) -> ThresholdChoice:
    """The lowest threshold whose cascade top-1 is within `max_drop_points` of the last stage alone.

    Candidates are the distinct max probabilities of the non-last stages (where the outcome changes) and
    1.0 + eps (nobody exits: the last stage alone, which always qualifies).
    """
    import numpy as np

    if not 0 <= max_drop_points <= 100:
        raise UserError(f"--max-drop must be in [0, 100] top-1 points, got {max_drop_points}")
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise UserError("no exit-data images to choose the cascade threshold on")
    last_top1 = 100.0 * float((stage_probs[-1].argmax(1) == labels).mean())
    cands = np.unique(np.concatenate([p.max(1) for p in stage_probs[:-1]]))
    sweep = [simulate(stage_probs, labels, float(t)) for t in cands] + [simulate(stage_probs, labels, 1.0 + 1e-6)]
    ok = [o for o in sweep if o.top1 >= last_top1 - max_drop_points - 1e-9]
    best = min(ok, key=lambda o: o.threshold)
    return ThresholdChoice(best.threshold, best, last_top1, float(max_drop_points), sweep)


def softmax(logits):
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
