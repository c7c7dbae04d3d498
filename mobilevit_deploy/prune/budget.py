"""Global allocation: remove structures in ascending importance / cost order until the budget is met.

Each candidate step removes, from one group, its lowest-scored remaining units: one 8-channel step
for channel groups (the first step takes size % 8 when a size is not a multiple of 8, so every
channel count ends a multiple of 8), one head, or one whole transformer layer. Its priority is the
summed importance of those units divided by what the step saves (MACs by default; predicted
latency with a latency model). The cheapest-per-importance step is taken, the state updated and
the costs recomputed (removing a layer makes its heads and MLP free, narrowing a width makes every
layer of the block cheaper), until cost <= target * cost of the unpruned model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .cost import CostModel, State


@dataclass
class Allocation:
    plan: dict  # {group id: kept unit indices}
    state: State
    cost_before: float
    cost_after: float
    removed: dict = field(default_factory=dict)  # {group id: number of units removed}
    steps: int = 0


def _layer_of(gid: str) -> tuple[str, int] | None:
    """(block path, layer index) of a heads / mlp_hidden group id, else None."""
    kind, _, path = gid.partition(":")
    if kind not in ("heads", "mlp_hidden") or ".transformer." not in path:
        return None
    block, _, rest = path.partition(".transformer.")
    return block, int(rest.split(".")[0])


def allocate(cost: CostModel, scores: dict[str, torch.Tensor], target: float,
             cost_fn: Callable[[State], float] | None = None, what: str = "MACs") -> Allocation:
    """Plan the removal that brings `cost_fn` (default: MACs) to `target` x its unpruned value."""
    from .structures import MIN_KEEP, STEP

    cost_fn = cost_fn or cost.macs
    state = cost.initial_state()
    base = float(cost_fn(state))
    goal = target * base
    order = {gid: torch.argsort(v, stable=True).tolist() for gid, v in scores.items()}
    removed = {gid: 0 for gid in scores}
    cur = base
    steps = 0
    while cur > goal * (1 + 1e-12):
        best = None
        for gid, sc in scores.items():
            kind = gid.split(":")[0]
            size = state.sizes[gid]
            loc = _layer_of(gid)
            if loc is not None and loc[1] in state.dropped.get(loc[0], ()):
                continue  # the layer is gone
            step = STEP[kind]
            n = size % step or step
            if size - n < min(MIN_KEEP[kind], scores[gid].numel()):
                continue
            units = order[gid][removed[gid]:removed[gid] + n]
            nxt = state.copy()
            nxt.sizes[gid] = size - n
            if kind == "layers":
                nxt.dropped.setdefault(gid.partition(":")[2], set()).update(units)
            elif kind == "attn_conv":
                nxt.conv.setdefault(gid.partition(":")[2], set()).update(units)
            saving = cur - float(cost_fn(nxt))
            if saving <= 0:
                continue
            prio = (float(sc[units].sum()) / saving, -saving)
            if best is None or prio < best[0]:
                best = (prio, gid, n, nxt)
        if best is None:
            raise UserError(f"cannot reach {target:g} x the {what} of the unpruned model: the smallest reachable is "
                            f"{cur / base:.3f} x (every structure is at its minimum)")
        _, gid, n, state = best
        removed[gid] += n
        cur = float(cost_fn(state))
        steps += 1
    plan = {}
    for gid, r in removed.items():
        if r:
            gone = set(order[gid][:r])
            plan[gid] = [u for u in range(scores[gid].numel()) if u not in gone]
    return Allocation(plan, state, base, cur, {g: r for g, r in removed.items() if r}, steps)


def unit_costs(cost: CostModel, gids, cost_fn: Callable[[State], float] | None = None) -> dict[str, float]:
    """{group id: what removing one unit saves in the unpruned model} (one step's saving / its units)."""
    from .structures import STEP

    cost_fn = cost_fn or cost.macs
    s0 = cost.initial_state()
    base = float(cost_fn(s0))
    out = {}
    for gid in gids:
        kind, _, path = gid.partition(":")
        n = min(STEP[kind], s0.sizes[gid])
        nxt = s0.copy()
        nxt.sizes[gid] -= n
        if kind in ("layers", "attn_conv"):
            # a layer's saving (the first layer not converted yet, for attn_conv)
            first = min(set(range(s0.sizes[gid])) - s0.conv.get(path, set()), default=0)
            (nxt.dropped if kind == "layers" else nxt.conv).setdefault(path, set()).add(first if kind == "attn_conv"
                                                                                      else 0)
            n = 1
        out[gid] = max(base - float(cost_fn(nxt)), 0.0) / n
    return out


def describe_removed(removed: dict) -> str:
    """'mv2_hidden -48 ch (3 blocks), heads -2, mlp_hidden -96, layers -1' from {group id: removed}."""
    by_kind: dict[str, list[int]] = {}
    for gid, r in removed.items():
        by_kind.setdefault(gid.split(":")[0], []).append(r)
    unit = {"mv2_hidden": " ch", "vit_width": " ch", "heads": "", "mlp_hidden": "", "layers": "", "attn_conv": ""}
    parts = []
    for kind in ("mv2_hidden", "vit_width", "heads", "mlp_hidden", "layers", "attn_conv"):
        if kind in by_kind:
            rs = by_kind[kind]
            parts.append(f"{kind} -{sum(rs)}{unit[kind]} ({len(rs)} group{'s' if len(rs) > 1 else ''})")
    return ", ".join(parts) or "nothing"
