"""Latency regression check: compare each row's in-run ratio with a baseline's.

A baseline is the JSON `--json` writes (a top-level list `rows`, each with `model`, `target`, `quant`,
`median_ms`, `ratio`). Rows match on (model, target, quant) and, when both sides record it, the input
size. `change = ratio / baseline ratio`; a row is a REGRESSION when change > 1 + tolerance, `faster`
when change < 1 / (1 + tolerance), `ok` otherwise. A baseline row whose current row did not run (failed
or skipped) is MISSING -- also a failure, so a broken export cannot pass the check by vanishing.
Current rows absent from the baseline are `new` (informational).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import UserError

FAILING = ("REGRESSION", "MISSING")


def load_baseline(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"baseline not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"baseline {p}: not valid JSON ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise UserError(f"baseline {p}: needs a top-level list 'rows' (the JSON that --json writes)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"baseline {p}: rows[{i}] is not an object")
        if row.get("status", "ok") != "ok":
            continue
        for k in ("model", "target", "quant", "median_ms", "ratio"):
            if k not in row:
                raise UserError(f"baseline {p}: rows[{i}] misses '{k}'")
        r = row["ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise UserError(f"baseline {p}: rows[{i}].ratio must be a number > 0, got {r!r}")
    return data


def _key(row: dict) -> tuple:
    return row["model"], row["target"], row["quant"]


def _same_size(a: dict, b: dict) -> bool:
    sa, sb = a.get("input_size"), b.get("input_size")
    return sa is None or sb is None or list(sa) == list(sb)


def compare(rows: list[dict], baseline: dict, tolerance: float) -> list[dict]:
    """One verdict per row of either side: {model, target, quant, base_ms, cur_ms, base_ratio, cur_ratio,
    change, verdict}."""
    if not tolerance > 0:
        raise UserError(f"--tolerance must be > 0, got {tolerance}")
    base_rows = {_key(r): r for r in baseline["rows"] if r.get("status", "ok") == "ok"}
    cur_rows = {_key(r): r for r in rows}
    out = []
    for key in list(base_rows) + [k for k in cur_rows if k not in base_rows]:
        b, c = base_rows.get(key), cur_rows.get(key)
        v = {"model": key[0], "target": key[1], "quant": key[2],
             "base_ms": b["median_ms"] if b else None, "base_ratio": b["ratio"] if b else None,
             "cur_ms": None, "cur_ratio": None, "change": None, "verdict": "", "note": ""}
        if c is None or c.get("status") != "ok":
            if b is None:
                continue  # skipped here and absent from the baseline: nothing to compare
            v["verdict"] = "MISSING"
            v["note"] = (c or {}).get("reason", "not measured in this run")
        elif b is None:
            v.update(cur_ms=c["median_ms"], cur_ratio=c["ratio"], verdict="new")
        elif not _same_size(b, c):
            v.update(cur_ms=c["median_ms"], cur_ratio=c["ratio"], verdict="MISSING",
                     note=f"input size {c.get('input_size')} vs baseline {b.get('input_size')}")
        else:
            change = c["ratio"] / b["ratio"]
            verdict = "REGRESSION" if change > 1 + tolerance else ("faster" if change < 1 / (1 + tolerance) else "ok")
            v.update(cur_ms=c["median_ms"], cur_ratio=c["ratio"], change=change, verdict=verdict)
        out.append(v)
    return out


def has_regression(verdicts: list[dict]) -> bool:
    return any(v["verdict"] in FAILING for v in verdicts)


def format_verdicts(verdicts: list[dict], tolerance: float) -> str:
    """Plain-text before/after table."""
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = (f"{'model':<16} {'target':<11} {'quant':<5} {'before ms':>9} {'after ms':>9} {'before r':>8} "
            f"{'after r':>8} {'change':>7}  verdict")
    lines = [f"regression check (tolerance {tolerance:.0%} on the in-run ratio)", head, "-" * len(head)]
    for v in verdicts:
        ch = "-" if v["change"] is None else f"{v['change']:.2f}x"
        lines.append(f"{v['model']:<16} {v['target']:<11} {v['quant']:<5} {f(v['base_ms'], '9.2f'):>9} "
                     f"{f(v['cur_ms'], '9.2f'):>9} {f(v['base_ratio'], '8.3f'):>8} {f(v['cur_ratio'], '8.3f'):>8} "
                     f"{ch:>7}  {v['verdict']}" + (f" ({v['note']})" if v["note"] else ""))
    n_bad = sum(v["verdict"] in FAILING for v in verdicts)
    lines.append(f"result: {'FAIL' if n_bad else 'PASS'} ({n_bad} of {len(verdicts)} rows failing)")
    return "\n".join(lines)
