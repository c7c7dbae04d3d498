"""The host benchmark: build runners, time them round-robin against an in-run reference, make rows.

Method (documented in benchmarks/README.md):
1. Same input for every runner: a shipped sample image at the row's input size, preprocessed with
   the model's DeployCfg (Core ML gets the same pixels as an image). Same thread count for
   every runtime (recorded per row as the runtime reports it).
2. Each runner (and the reference) gets `warmup` untimed inferences. Then `rounds` rounds; in each
   round every runner runs one untimed inference and `iters` timed ones, back to back. The order of
   runners rotates every round, so a slow phase of the shared machine hits all rows alike.
3. Row statistics pool all timed inferences (median, p10, p90, min, max, spread). The in-run ratio is
   the median over rounds of (row's round median / reference's round median) -- `stats.paired_ratio`.
4. The reference is a fixed fp32 matmul (REF_N x REF_N, torch, same threads): it tracks how fast the
   machine is right now and does not change when the model, the exporter or a runtime changes, so a
   real slowdown of any row moves that row's ratio. (The eager model would cancel a slowdown of the
   model's own formulation, because eager would slow down with it.)
5. FLOPs are counted on the eager model (FlopCounterMode, 2 x MACs); achieved GFLOP/s = FLOPs /
   median; peak share = achieved / the measured fp32 matmul peak (`flops.measure_peak`).
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UserError, choices_error
from . import stats
from .runners import QUANTS, TARGETS, SkipRow, artifact_runner, coreml_unavailable_reason, eager_runner, make_artifact
from .timing import Timed, time_round_robin

SCHEMA_VERSION = 1
REF_N = 1024


@dataclass
class BenchConfig:
    models: Sequence[str] = ("mobilevit_xxs",)
    targets: Sequence[str] = ("eager", "executorch", "onnx")
    quants: Sequence[str] = ("fp32",)
    size: int | None = None  # H = W; None: the model's DeployCfg input size
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    warmup: int = 10
    rounds: int = 7
    iters: int = 20
    weights: str = "shipped"  # shipped (when the package ships weights for the model) | random
    artifacts_dir: str | None = None  # None: a temporary folder, removed afterwards
    reuse_artifacts: bool = False  # reuse matching artifacts in artifacts_dir (benchmark development only)
    peak_n: int = 2048
    coreml_compute_units: str = "cpuOnly"  # Core ML on macOS: all | cpuAndNeuralEngine | cpuAndGPU | cpuOnly
    seed: int = 0
    model_kwargs: dict = field(default_factory=dict)  # constructor options for every model (--model-arg)
    cascade: tuple | str | None = None  # stage sizes, e.g. (32, 64), or "exit3" (depth cascade): adds the
    # pte_cascade / pte_last_stage rows (cascade.py)

    def validate(self):
        from ..models import list_models

        names = list_models()
        for m in self.models:
            if m not in names:
                raise choices_error("model", m, names)
        for t in self.targets:
            if t not in TARGETS:
                raise choices_error("target", t, TARGETS)
        for q in self.quants:
            if q not in QUANTS:
                raise choices_error("quant", q, QUANTS)
        if not (self.models and self.targets and self.quants):
            raise UserError("--models, --targets and --quant each need at least one value")
        for k in ("threads", "rounds", "iters"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k} must be >= 1, got {getattr(self, k)}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}")
        if self.cascade:
            from ..export.cascade import CascadeSpec

            value = self.cascade if isinstance(self.cascade, str) else ",".join(map(str, self.cascade))
            spec = CascadeSpec.from_value(value)  # UserError for bad sizes / forms
            self.cascade = f"exit{spec.exit_after}" if spec.depth else spec.sizes
            if spec.depth and (self.weights != "shipped" or self.size is not None):
                raise UserError(f"--cascade {self.cascade} runs the exit head shipped for the shipped weights at their "
                                "input size: use --weights shipped and no --size")
        if self.size is not None and self.size < 32:
            raise UserError(f"--size must be >= 32, got {self.size}")
        if self.weights not in ("shipped", "random"):
            raise choices_error("weights", self.weights, ("shipped", "random"))


def _build_model(name: str, cfg: BenchConfig):
    """The benchmarked module, its DeployCfg at the row size, and what is known about its weights."""
    import torch

    from ..pretrained import load_model

    torch.manual_seed(cfg.seed)  # random-init weights are the same in every run (and artifacts reusable)
    loaded = load_model(name, pretrained=cfg.weights == "shipped", model_kwargs=dict(cfg.model_kwargs) or None)
    model, dcfg = loaded.module, loaded.deploy_cfg
    size = cfg.size or get_default_size(name)
    if dcfg.image_size != (size, size):
        dcfg = replace(dcfg, input_size=(3, size, size))
    model.deploy_cfg = dcfg
    weights = {"kind": "random init", "accuracy": None}
    if loaded.checkpoint.get("shipped"):
        meta = loaded.meta
        trained = tuple(loaded.deploy_cfg.image_size)
        acc = meta.get("val_top1")
        weights = {"kind": "shipped", "file": Path(loaded.checkpoint["path"]).name, "sha256": meta.get("sha256"),
                   "trained_size": list(trained),
                   # accuracy of these weights is known only at the size they were evaluated at
                   "accuracy": ({"top1": acc, "data": meta.get("data"), "split": "val"}
                                if acc is not None and trained == (size, size) else None)}
    return model, dcfg, weights


def get_default_size(name: str) -> int:
    from ..models import get_deploy_cfg

    h, w = get_deploy_cfg(name).image_size
    if h != w:
        raise UserError(f"{name}: non-square default input {h}x{w}; pass --size")
    return h


def bench_input(dcfg, seed: int = 0):
    """The one input every runner sees: shipped sample image number `seed` (of 40, CIFAR-10 training
    split), through the model's own preprocessing at the DeployCfg's input size. A natural image, so
    the output check of a quantized row means what it would on real input (random pixels fall
    outside every calibrated activation range); it is also one of the default calibration images."""
    from ..data import load_batch, sample_images

    samples = sample_images()
    return load_batch([samples[seed % len(samples)][0]], dcfg).contiguous()


def _check(ref, out) -> dict:
    """Agreement of a runner's output with eager fp32 on the bench input."""
    import torch

    ref = ref.detach().float().reshape(ref.shape[0], -1)
    out = out.detach().float().reshape(ref.shape[0], -1)
    if out.shape != ref.shape:
        return {"error": f"output shape {tuple(out.shape)} vs eager {tuple(ref.shape)}"}
    noise = (ref - out).pow(2).mean().item()
    sig = ref.pow(2).mean().item()
    # None: identical (JSON has no inf)
    sqnr = None if noise == 0 else 10 * torch.log10(torch.tensor(sig / noise)).item()
    return {"max_abs_diff": (ref - out).abs().max().item(), "sqnr_db": sqnr, "identical": noise == 0,
            "top1_agree": bool((ref.argmax(-1) == out.argmax(-1)).all().item())}


def _tool_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "executorch", "torchao", "onnxruntime", "onnx", "coremltools"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = None
    if hasattr(os, "getloadavg"):
        load = round(os.getloadavg()[0], 2)
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_avg_1min_at_start": load}


def _skipped(key, dcfg, threads, reason, status="skipped") -> dict:
    model, target, quant = key
    return {"model": model, "target": target, "quant": quant, "input_size": list(dcfg.image_size), "batch": 1,
            "threads": threads, "status": status, "reason": reason}


class BenchSession:
    """Runners built once (exports done), timed by one or more `measure()` passes.

    Use as a context manager (removes the temporary artifact folder). `result()` gives the document
    `--json` writes; with several passes, a row's ratio is the median of the passes' ratios and its
    timing statistics pool every pass's samples.
    """

    def __init__(self, cfg: BenchConfig, *, artifact_factory: Callable = make_artifact, progress: bool = True,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        cfg.validate()
        self.cfg, self.artifact_factory, self.progress, self.log = cfg, artifact_factory, progress, log
        self._tmp = None
        self.rows: list[dict] = []  # skipped/failed rows, and {"_slot": slot} placeholders in order
        self.slots: list[Timed] = []
        self.per_model: dict[str, dict] = {}
        self.passes: list[dict] = []  # per pass: {"ref_rounds": [...], "slot_rounds": {key: [...]}}
        self.peak: dict | None = None
        self.started = time.time()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def prepare(self) -> BenchSession:
        import torch

        from .flops import count_flops, measure_peak

        cfg, threads, log = self.cfg, self.cfg.threads, self.log
        torch.set_num_threads(threads)
        if cfg.artifacts_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mobilevit_bench_")
            art_dir = Path(self._tmp.name)
        else:
            art_dir = Path(cfg.artifacts_dir)
            art_dir.mkdir(parents=True, exist_ok=True)
        log(f"measuring the fp32 matmul peak ({cfg.peak_n}x{cfg.peak_n}, {threads} threads)")
        self.peak = measure_peak(threads, cfg.peak_n)
        for name in cfg.models:
            model, dcfg, weights = _build_model(name, cfg)
            x = bench_input(dcfg, cfg.seed)
            flops = count_flops(model, dcfg.image_size)
            with torch.inference_mode():
                ref_out = model(x)
            self.per_model[name] = {"gflops": flops["gflops"], "weights": weights, "input_size": list(dcfg.image_size)}
            for target in cfg.targets:
                for quant in cfg.quants:
                    self._add(name, target, quant, model, dcfg, x, ref_out, art_dir)
            if cfg.cascade:
                self._add_cascade(name, model, dcfg, art_dir)
        return self

    def _add(self, name, target, quant, model, dcfg, x, ref_out, art_dir):
        key, threads, log = (name, target, quant), self.cfg.threads, self.log
        t0 = time.time()
        try:
            manifest = None
            if target == "eager":
                runner = eager_runner(model, x, threads, quant)
            elif target == "coreml" and coreml_unavailable_reason():
                raise SkipRow(coreml_unavailable_reason())  # before spending an export on it
            else:
                log(f"exporting {name} -> {target} {quant}")
                kw = {"reuse": True} if self.cfg.reuse_artifacts else {}
                path, manifest = self.artifact_factory(name, target, quant, art_dir / name,
                                                       model=model, deploy_cfg=dcfg, **kw)
                runner = artifact_runner(target, path, x, threads, quant, manifest, self.cfg.coreml_compute_units)
            out = runner.output()
            if manifest and manifest.get("output", {}).get("kind") == "probabilities":
                check = _check(ref_out.softmax(-1), out)
            else:
                check = _check(ref_out, out)
        except SkipRow as e:
            self.rows.append(_skipped(key, dcfg, threads, str(e)))
            log(f"skipped {name} {target} {quant}: {e}")
            return
        except Exception as e:  # a broken export or runtime is a failed row, not a crash
            self.rows.append(_skipped(key, dcfg, threads, f"{type(e).__name__}: {e}", status="failed"))
            log(f"FAILED {name} {target} {quant}: {type(e).__name__}: {e}")
            return
        runner.info["prepare_s"] = round(time.time() - t0, 2)
        runner.info["check"] = check
        runner.info["manifest"] = manifest
        slot = Timed(key, runner.fn, runner)
        self.slots.append(slot)
        self.rows.append({"_slot": slot})

    def _add_cascade(self, name, model, dcfg, art_dir):
        from .cascade import cascade_rows

        t0 = time.time()
        try:
            rows = cascade_rows(self, name, model, dcfg, art_dir)
        except Exception as e:  # UserError (a size the model cannot take, ...) or a broken export: failed rows
            for target in ("pte_cascade", "pte_last_stage"):
                self.rows.append(_skipped((name, target, "fp32"), dcfg, self.cfg.threads,
                                          f"{type(e).__name__}: {e}", status="failed"))
            self.log(f"FAILED {name} cascade: {type(e).__name__}: {e}")
            return
        for key, bc in rows:
            bc.info["prepare_s"] = round(time.time() - t0, 2)
            slot = Timed(key, bc.fn, bc)
            self.slots.append(slot)
            self.rows.append({"_slot": slot})

    def measure(self) -> BenchSession:
        """One timing pass over every runner and the reference (round-robin)."""
        from .flops import make_matmul

        cfg = self.cfg
        reference = make_matmul(REF_N)
        before = {s.key: len(s.round_medians) for s in self.slots}
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=(len(self.slots) + 1) * (cfg.rounds + 1), desc=f"timing pass {len(self.passes) + 1}",
                       unit="block", file=sys.stderr, leave=False)
        try:
            ref_rounds = time_round_robin(self.slots, reference, warmup=cfg.warmup, rounds=cfg.rounds, iters=cfg.iters,
                                          tick=(bar.update if bar else (lambda *a: None)))
        finally:
            if bar:
                bar.close()
        from .cascade import per_image

        per_image(self.slots, cfg.rounds * cfg.iters, before)  # cascade rows: one call = a set of images
        self.passes.append({"ref_rounds": ref_rounds,
                            "slot_rounds": {s.key: s.round_medians[before[s.key]:] for s in self.slots}})
        return self

    def _pass_ratio(self, key, ref_key=None) -> float:
        vals = []
        for p in self.passes:
            den = p["ref_rounds"] if ref_key is None else p["slot_rounds"][ref_key]
            vals.append(stats.paired_ratio(p["slot_rounds"][key], den))
        return stats.median(vals)

    def result(self) -> dict:
        if not self.passes:
            raise RuntimeError("measure() was never called")
        cfg, peak = self.cfg, self.peak
        ref_all = [m for p in self.passes for m in p["ref_rounds"]]
        ref_median = stats.median(ref_all)
        by_key = {s.key: s for s in self.slots}
        out_rows = []
        for row in self.rows:
            if "_slot" not in row:
                out_rows.append(row)
                continue
            s = row["_slot"]
            name, target, quant = s.key
            st = stats.summarize(s.samples)
            g = self.per_model[name]["gflops"]
            achieved = g / (st["median"] / 1e3)
            r = {
                "model": name, "target": target, "quant": quant, "input_size": self.per_model[name]["input_size"],
                "batch": 1, "threads": s.runner.threads, "status": "ok", "reason": "",
                "median_ms": st["median"], "p10_ms": st["p10"], "p90_ms": st["p90"], "min_ms": st["min"],
                "max_ms": st["max"], "mean_ms": st["mean"], "std_ms": st["std"], "spread_pct": st["spread_pct"],
                "n": st["n"], "round_medians_ms": list(s.round_medians),
                "ratio": self._pass_ratio(s.key),
                "ratio_passes": [stats.paired_ratio(p["slot_rounds"][s.key], p["ref_rounds"]) for p in self.passes],
                "artifact": s.runner.artifact.name if s.runner.artifact else None,
                "artifact_bytes": s.runner.artifact_bytes,
                "gflops": g, "gflops_per_s": achieved, "peak_share": achieved / peak["gflops_per_s"],
                "runtime": s.runner.info.get("runtime"), "prepare_s": s.runner.info.get("prepare_s"),
                "check": s.runner.info.get("check"),
                "accuracy": self.per_model[name]["weights"].get("accuracy"),
            }
            extra = s.runner.info.get("row_extra")
            if extra:  # cascade rows (bench/cascade.py): their own sizes, GFLOPs per image, exit rates
                r.update(extra)
                r["gflops_per_s"] = r["gflops"] / (st["median"] / 1e3)
                r["peak_share"] = r["gflops_per_s"] / peak["gflops_per_s"]
            for ref_target in ("onnx", "eager"):
                if (name, ref_target, "fp32") in by_key:
                    r[f"vs_{ref_target}_fp32"] = self._pass_ratio(s.key, (name, ref_target, "fp32"))
            out_rows.append(r)
        return {
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": None,
            "machine": machine_info(),
            "tools": _tool_versions(),
            "settings": {"threads": cfg.threads, "warmup": cfg.warmup, "rounds": cfg.rounds, "iters": cfg.iters,
                         "passes": len(self.passes), "size": cfg.size, "weights": cfg.weights, "seed": cfg.seed},
            "reference": {"name": f"matmul_fp32_{REF_N}",
                          "what": f"torch.mm {REF_N}x{REF_N} fp32, {cfg.threads} threads, timed in every round",
                          "median_ms": ref_median, "round_medians_ms": ref_all,
                          "gflops_per_s": 2 * REF_N ** 3 / (ref_median / 1e3) / 1e9},
            "peak": peak,
            "models": self.per_model,
            "rows": out_rows,
            "elapsed_s": round(time.time() - self.started, 1),
        }


def run_benchmark(cfg: BenchConfig, *, passes: int = 1, artifact_factory: Callable = make_artifact,
                  progress: bool = True, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Prepare every runner, time `passes` round-robin passes, return the result document."""
    with BenchSession(cfg, artifact_factory=artifact_factory, progress=progress, log=log) as session:
        session.prepare()
        for _ in range(passes):
            session.measure()
        return session.result()
