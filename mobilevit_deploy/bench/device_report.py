"""Device reports (docs/contracts.md section 2): read, validate, build, and the ModelBench statistics.

A device report is what the iOS demo app's benchmark mode (and the macOS CI job) writes after timing
one artifact on one device. `python -m mobilevit_deploy.bench --device-report FILE` reads it with
`load_device_report` and prints it beside the MobileViT paper's iPhone 12 figure for the same model.

Measurement method ("modelbench", after Apple's ModelBench; the Swift code in
ios_demo/MobileViTKit mirrors `modelbench_stats` exactly):
  1. `warmup` inferences, not recorded;
  2. `rounds` rounds of `inferences_per_round` inferences, each inference timed on its own;
  3. in each round sort the times, drop the `trim_low` lowest and `trim_high` highest, and keep the
     mean of the rest: that is the round's figure (`rounds_ms`);
  4. `stats_ms` summarises `rounds_ms`: median and p90 by linear interpolation between closest ranks
     (numpy's default), mean, min, max and the population standard deviation.
Defaults: 10 warm-up, 20 rounds x 50 inferences, trim 10 + 10.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import stats as _stats

SCHEMA_VERSION = 1
COMPUTE_UNITS = ("all", "cpuAndNeuralEngine", "cpuAndGPU", "cpuOnly")
IPHONE12_IDENTIFIERS = ("iPhone13,2",)  # iPhone 12 (iPhone13,1 = 12 mini, 13,3 = 12 Pro, 13,4 = 12 Pro Max)
MODELBENCH_DEFAULTS = {"warmup": 10, "rounds": 20, "inferences_per_round": 50, "trim_low": 10, "trim_high": 10}
_STATS_KEYS = ("median", "mean", "p90", "min", "max", "std")


def modelbench_stats(per_inference_ms_rounds: Sequence[Sequence[float]], trim_low: int = 10,
                     trim_high: int = 10) -> dict:
    """ModelBench trimming: per round, the mean of the inferences left after dropping the `trim_low`
    lowest and `trim_high` highest; then statistics over those round means.

    Returns {"rounds_ms": [...], "stats_ms": {"median", "mean", "p90", "min", "max", "std"}}.
    Raises UserError when a round has no inference left after trimming.
    """
    if trim_low < 0 or trim_high < 0:
        raise UserError(f"trim_low and trim_high must be >= 0, got {trim_low}, {trim_high}")
    rounds = [list(r) for r in per_inference_ms_rounds]
    if not rounds:
        raise UserError("modelbench_stats needs at least one round of inference times")
    rounds_ms = []
    for i, r in enumerate(rounds):
        if len(r) <= trim_low + trim_high:
            raise UserError(f"round {i} has {len(r)} inferences; trimming {trim_low} + {trim_high} leaves none")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in r):
            raise UserError(f"round {i} holds a time that is not a finite number >= 0")
        kept = sorted(float(x) for x in r)[trim_low:len(r) - trim_high]
        rounds_ms.append(sum(kept) / len(kept))
    return {"rounds_ms": rounds_ms, "stats_ms": stats_of_rounds(rounds_ms)}


def stats_of_rounds(rounds_ms: Sequence[float]) -> dict:
    """`stats_ms` of a device report, computed from `rounds_ms`."""
    return {
        "median": _stats.percentile(rounds_ms, 50),
        "mean": _stats.mean(rounds_ms),
        "p90": _stats.percentile(rounds_ms, 90),
        "min": min(rounds_ms),
        "max": max(rounds_ms),
        "std": _stats.std(rounds_ms),
    }


def run_modelbench(fn: Callable[[], object], *, warmup: int = 10, rounds: int = 20, inferences_per_round: int = 50,
                   trim_low: int = 10, trim_high: int = 10, progress: Callable[[int], None] | None = None) -> dict:
    """Time `fn()` by the ModelBench method; returns {"method": {...}, "rounds_ms", "stats_ms"}."""
    for _ in range(warmup):
        fn()
    per_round = []
    for _ in range(rounds):
        times = []
        for _ in range(inferences_per_round):
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) / 1e6)
        per_round.append(times)
        if progress is not None:
            progress(1)
    out = modelbench_stats(per_round, trim_low, trim_high)
    method = {"name": "modelbench", "warmup": warmup, "rounds": rounds, "inferences_per_round": inferences_per_round,
              "trim_low": trim_low, "trim_high": trim_high}
    return {"method": method, **out}


@dataclass(frozen=True)
class DeviceReport:
    """One validated device report (docs/contracts.md section 2)."""

    device_name: str
    device_identifier: str
    os: str
    compute_units: str
    model: str
    precision: str
    input_size: tuple[int, int]
    artifact_sha256: str
    method: dict
    rounds_ms: tuple[float, ...]
    stats_ms: dict
    schema_version: int = SCHEMA_VERSION
    created: str | None = None
    path: str | None = field(default=None, compare=False)

    @property
    def median_ms(self) -> float:
        return float(self.stats_ms["median"])

    @property
    def is_iphone12(self) -> bool:
        """True for an iPhone 12 (identifier iPhone13,2, or a device name that is exactly 'iPhone 12')."""
        return self.device_identifier in IPHONE12_IDENTIFIERS or self.device_name.strip().lower() == "iphone 12"

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "device": {"name": self.device_name, "identifier": self.device_identifier, "os": self.os},
            "compute_units": self.compute_units,
            "model": self.model,
            "precision": self.precision,
            "input_size": list(self.input_size),
            "artifact_sha256": self.artifact_sha256,
            "method": dict(self.method),
            "rounds_ms": list(self.rounds_ms),
            "stats_ms": dict(self.stats_ms),
            "created": self.created,
        }


def _err(path, msg: str) -> UserError:
    return UserError(f"device report {path}: {msg}")


def _get(d: dict, key: str, where: str, path):
    if not isinstance(d, dict) or key not in d:
        raise _err(path, f"missing field '{where}{key}'")
    return d[key]


def _str(d, key, where, path, allow_empty=False) -> str:
    v = _get(d, key, where, path)
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise _err(path, f"field '{where}{key}' must be a non-empty string, got {v!r}")
    return v


def _int(d, key, where, path, minimum) -> int:
    v = _get(d, key, where, path)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _err(path, f"field '{where}{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def _num(v, name, path) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _err(path, f"field '{name}' must be a finite number >= 0, got {v!r}")
    return float(v)


def parse_device_report(data: dict, path: str | os.PathLike = "<dict>") -> DeviceReport:
    """Validate a device-report dict; a UserError names the first bad field. Unknown keys are ignored."""
    if not isinstance(data, dict):
        raise _err(path, f"top level must be a JSON object, got {type(data).__name__}")
    version = _get(data, "schema_version", "", path)
    if version != SCHEMA_VERSION:
        raise _err(path, f"field 'schema_version' is {version!r}; this reader knows version {SCHEMA_VERSION}")
    device = _get(data, "device", "", path)
    if not isinstance(device, dict):
        raise _err(path, "field 'device' must be an object with name, identifier, os")
    name = _str(device, "name", "device.", path)
    ident = _str(device, "identifier", "device.", path)
    os_ = _str(device, "os", "device.", path)
    cu = _get(data, "compute_units", "", path)
    if cu not in COMPUTE_UNITS:
        raise _err(path, f"field 'compute_units' is {cu!r} (choose from: {', '.join(COMPUTE_UNITS)})")
    model = _str(data, "model", "", path)
    precision = _str(data, "precision", "", path)
    size = _get(data, "input_size", "", path)
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise _err(path, f"field 'input_size' must be [H, W] of positive integers, got {size!r}")
    sha = _str(data, "artifact_sha256", "", path)
    method = _get(data, "method", "", path)
    if not isinstance(method, dict):
        raise _err(path, "field 'method' must be an object")
    mname = _str(method, "name", "method.", path)
    _int(method, "warmup", "method.", path, 0)
    rounds = _int(method, "rounds", "method.", path, 1)
    per_round = _int(method, "inferences_per_round", "method.", path, 1)
    tl = _int(method, "trim_low", "method.", path, 0)
    th = _int(method, "trim_high", "method.", path, 0)
    if tl + th >= per_round:
        raise _err(path, f"field 'method.trim_low' + 'method.trim_high' ({tl} + {th}) leaves no inference "
                         f"of {per_round} per round")
    rounds_ms = _get(data, "rounds_ms", "", path)
    if not isinstance(rounds_ms, list) or not rounds_ms:
        raise _err(path, "field 'rounds_ms' must be a non-empty list of numbers (ms)")
    rounds_ms = [_num(x, f"rounds_ms[{i}]", path) for i, x in enumerate(rounds_ms)]
    if mname == "modelbench" and len(rounds_ms) != rounds:
        raise _err(path, f"field 'rounds_ms' has {len(rounds_ms)} entries but 'method.rounds' is {rounds}")
    st = _get(data, "stats_ms", "", path)
    if not isinstance(st, dict):
        raise _err(path, "field 'stats_ms' must be an object")
    st = {k: _num(_get(st, k, "stats_ms.", path), f"stats_ms.{k}", path) for k in _STATS_KEYS}
    # stats_ms must be the statistics of rounds_ms (same definitions on both sides of the contract)
    expect = stats_of_rounds(rounds_ms)
    for k in _STATS_KEYS:
        if not math.isclose(st[k], expect[k], rel_tol=1e-4, abs_tol=1e-6):
            raise _err(path, f"field 'stats_ms.{k}' is {st[k]!r} but rounds_ms gives {expect[k]!r} "
                             f"({k} over rounds_ms; percentiles by linear interpolation, population std)")
    created = data.get("created")
    if created is not None and not isinstance(created, str):
        raise _err(path, f"field 'created' must be a string, got {created!r}")
    return DeviceReport(
        device_name=name, device_identifier=ident, os=os_, compute_units=cu, model=model, precision=precision,
        input_size=(size[0], size[1]), artifact_sha256=sha, method=dict(method), rounds_ms=tuple(rounds_ms),
        stats_ms=st, schema_version=version, created=created, path=str(path),
    )


def load_device_report(path: str | os.PathLike) -> DeviceReport:
    """Read and validate a device report JSON file; UserError names the file and the bad field."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"device report not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"device report {p}: not valid JSON ({e})") from None
    return parse_device_report(data, p)


def build_device_report(*, device_name: str, device_identifier: str, os_name: str, compute_units: str, model: str,
                        precision: str, input_size: Sequence[int], artifact_sha256: str, measurement: dict) -> dict:
    """A device-report dict from a `run_modelbench` result (validated before it is returned)."""
    from datetime import datetime, timezone

    d = {
        "schema_version": SCHEMA_VERSION,
        "device": {"name": device_name, "identifier": device_identifier, "os": os_name},
        "compute_units": compute_units,
        "model": model,
        "precision": precision,
        "input_size": [int(s) for s in input_size],
        "artifact_sha256": artifact_sha256,
        "method": measurement["method"],
        "rounds_ms": measurement["rounds_ms"],
        "stats_ms": measurement["stats_ms"],
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    parse_device_report(d)
    return d


def write_device_report(path: str | os.PathLike, report: dict) -> Path:
    """Validate and write a device report atomically."""
    from ..checkpoint import atomic_write

    parse_device_report(report, path)
    text = json.dumps(report, indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
