"""NViT-style latency lookup table: measured `.pte` latency (ExecuTorch, XNNPACK) -> a latency model.

Lowering one variant to `.pte` takes 1-2 minutes on this 2-core machine, so the table is small: the
unpruned model plus one variant per op class, each a uniform reduction of one kind of structure
everywhere in the network (measured together, round-robin, in one process):

  base      the model as it is
  mv2       every MV2 expansion halved                 (moves the "mv2" MACs)
  linear    every transformer width and MLP halved     (moves the "linear" MACs)
  attn      every attention's heads halved             (moves "attn" and part of "linear")
  layers    every MobileViT block keeps half its layers (moves all transformer terms and "layers")

and the latency model is the least-squares fit (non-negative coefficients)

  latency_ms = const + c_mv2 * MACs_mv2 + c_linear * MACs_linear + c_attn * MACs_attn + c_layers * n_layers

over those 5 points, the features of each coming from cost.CostModel.terms. A per-layer coefficient
captures what MACs miss (LayerNorms, reshapes, delegate calls per layer). The pruning budget then
uses the predicted latency of every candidate state.

The table is cached in `~/.cache/mobilevit_deploy/prune_latency.json` (or $MOBILEVIT_DEPLOY_CACHE; hostinfo.JsonCache),
keyed by model, architecture (a hash of every parameter shape), input size, threads, torch /
executorch versions and the CPU (model name and a hash of its flags). Without ExecuTorch, or with
`table="macs"`, the fallback is MACs-proportional: latency ~ MACs (`LatencyModel.macs_proportional`),
which is what --target-macs does.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..hostinfo import JsonCache, cpu_id, cpu_key, runtime_versions

FEATURES = ("mv2", "linear", "attn", "layers")
TABLE_VERSION = 1


_CACHE = JsonCache("prune_latency.json", TABLE_VERSION)


def cache_path() -> Path:
    return _CACHE.path


def shapes_sha(model: nn.Module) -> str:
    """Hash of the architecture actually built: every parameter's name and shape, the head counts."""
    items = [(n, list(p.shape)) for n, p in model.named_parameters()]
    items += [(n, int(m.num_heads)) for n, m in model.named_modules() if isinstance(getattr(m, "num_heads", None), int)]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def table_key(model_name: str, model: nn.Module, input_size, threads: int) -> str:
    a = shapes_sha(model)
    v = runtime_versions()
    return (f"{model_name}|arch={a}|{int(input_size[0])}x{int(input_size[1])}|threads={threads}|torch={v['torch']}|"
            f"executorch={v['executorch']}|cpu={cpu_key()}")


@dataclass
class LatencyModel:
    const: float
    coef: dict
    source: str  # "measured" | "macs-proportional"
    unit: str = "ms"
    variants: list = field(default_factory=list)  # [{"name", "features", "latency_ms"}]

    def predict(self, terms: dict) -> float:
        return self.const + sum(self.coef.get(k, 0.0) * terms[k] for k in FEATURES)

    @classmethod
    def macs_proportional(cls) -> LatencyModel:
        """latency ~ MACs: what the budget does without a measured table."""
        return cls(0.0, {"mv2": 1.0, "linear": 1.0, "attn": 1.0, "layers": 0.0}, "macs-proportional", unit="MACs")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LatencyModel:
        return cls(float(d["const"]), {k: float(v) for k, v in d["coef"].items()}, d["source"], d.get("unit", "ms"),
                   list(d.get("variants", [])))


def fit(rows: list[dict]) -> LatencyModel:
    """Least squares latency_ms ~ const + coef . features with non-negative coefficients (features
    whose coefficient comes out negative are dropped and the rest refitted)."""
    import numpy as np

    active = list(FEATURES)
    y = np.array([r["latency_ms"] for r in rows], dtype=np.float64)
    while True:
        X = np.array([[1.0] + [float(r["features"][k]) for k in active] for r in rows], dtype=np.float64)
        scale = np.maximum(np.abs(X).max(axis=0), 1e-30)
        sol, *_ = np.linalg.lstsq(X / scale, y, rcond=None)
        sol = sol / scale
        neg = [k for k, c in zip(active, sol[1:]) if c < 0]
        if not neg:
            break
        active = [k for k in active if k not in neg]
    coef = {k: 0.0 for k in FEATURES}
    coef.update({k: float(c) for k, c in zip(active, sol[1:])})
    return LatencyModel(float(sol[0]), coef, "measured", variants=rows)


def variant_plans(model: nn.Module) -> dict[str, dict]:
    """{variant name: plan} of the uniform reductions (see the module docstring)."""
    from .structures import STEP, groups

    def half(g):
        n = max(g.min_keep, (g.size // 2) // STEP[g.kind] * STEP[g.kind] if STEP[g.kind] > 1 else (g.size + 1) // 2)
        return list(range(n))

    gs = groups(model)
    plans = {"base": {}}
    for name, kinds in (("mv2", ("mv2_hidden",)), ("linear", ("vit_width", "mlp_hidden")), ("attn", ("heads",)),
                        ("layers", ("layers",))):
        p = {g.id: half(g) for g in gs if g.kind in kinds and len(half(g)) < g.size}
        if p:
            plans[name] = p
    return plans


def time_round_robin(fns: dict[str, Callable[[], object]], *, warmup: int = 3, rounds: int = 5,
                     iters: int = 10) -> dict:
    """{name: median ms} timing every callable in turn, the order rotating each round."""
    names = list(fns)
    for n in names:
        for _ in range(warmup):
            fns[n]()
    samples = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            fns[n]()
            for _ in range(iters):
                t = time.perf_counter_ns()
                fns[n]()
                samples[n].append((time.perf_counter_ns() - t) / 1e6)
    return {n: statistics.median(v) for n, v in samples.items()}


def export_pte(module: nn.Module, out_dir: str | os.PathLike, name: str) -> Path:
    """Lower `module` (with `.deploy_cfg`) to an fp32 XNNPACK `.pte` in out_dir (no verification)."""
    from ..export import ExportConfig, export_model
    from ..pretrained import ModelSource

    res = export_model(ModelSource(name, module=module), ExportConfig("executorch", verify=False), out_dir=out_dir,
                       log=None)
    return Path(res.artifact)


def measure_pte_latency(modules: dict[str, nn.Module], *, threads: int = 1, log=None, rounds: int = 5,
                        iters: int = 10, pte_paths: dict | None = None) -> dict[str, float]:
    """Lower every module to `.pte` and time them together (round-robin): {name: median ms}.

    `pte_paths` ({name: path}) times existing `.pte` files instead of lowering those modules."""
    import torch

    from ..runtime import load_artifact

    log = log or (lambda s: None)
    paths = dict(pte_paths or {})
    with tempfile.TemporaryDirectory(prefix="prune-lut-") as tmp:
        for n, m in modules.items():
            if n in paths:
                continue
            t = time.perf_counter()
            paths[n] = export_pte(m, Path(tmp) / n, n)
            log(f"  lowered {n} to .pte ({time.perf_counter() - t:.0f} s)")
        runners, fns = {}, {}
        for n, p in paths.items():
            r = load_artifact(p, num_threads=threads)
            x = torch.zeros(r.input_shape) if r.input_shape else None
            runners[n] = r
            fns[n] = r.bind(x).call
        return time_round_robin(fns, rounds=rounds, iters=iters)


def latency_model(model: nn.Module, model_name: str, cost, *, threads: int = 1, table: str = "measure",
                  measure: Callable[[dict], dict] | None = None, log=None) -> LatencyModel:
    """The latency model of `model` (cached table, else measured and cached, else MACs-proportional).

    `measure({name: module}) -> {name: ms}` replaces the ExecuTorch measurement (tests)."""
    from .cost import state_of_plan

    log = log or (lambda s: None)
    if table == "macs":
        log("latency: MACs-proportional model (no table requested)")
        return LatencyModel.macs_proportional()
    key = table_key(model_name, model, cost.input_size, threads)
    path = cache_path()
    entry = _CACHE.get(key)
    if entry is not None:
        lm = LatencyModel.from_dict(entry["model"])
        log(f"latency: table from {path} ({len(lm.variants)} variants measured {entry.get('created', '?')})")
        return lm
    plans = variant_plans(model)
    if measure is None:
        try:
            import executorch.runtime  # noqa: F401
        except ImportError:
            log("latency: ExecuTorch is not installed; falling back to a MACs-proportional model")
            return LatencyModel.macs_proportional()
        log(f"latency: measuring the .pte latency of {len(plans)} variants ({', '.join(plans)}), "
            f"{threads} thread(s); cached in {path}")

        def measure(mods):
            return measure_pte_latency(mods, threads=threads, log=log)

    from .cost import pruned_copy

    mods = {n: (copy.deepcopy(model) if not p else pruned_copy(model, p)) for n, p in plans.items()}
    t = time.perf_counter()
    ms = measure(mods)
    rows = [{"name": n, "features": cost.terms(state_of_plan(cost, p)), "latency_ms": float(ms[n])}
            for n, p in plans.items()]
    lm = fit(rows)
    log("latency: " + ", ".join(f"{r['name']} {r['latency_ms']:.3f} ms" for r in rows) +
        f" -> const {lm.const:.3f} ms + " + " + ".join(f"{v:.3g}*{k}" for k, v in lm.coef.items()) +
        f" ({time.perf_counter() - t:.0f} s)")
    _CACHE.put(key, {"model": lm.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "versions": runtime_versions(), "cpu": cpu_id(), "threads": threads,
                     "input_size": list(cost.input_size)})
    return lm
