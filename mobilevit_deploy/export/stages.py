"""The export pipeline as typed stages, in the one order `STAGES` declares:

    LoadedModel -Capture-> Captured -Quantize-> Quantized -Lower-> Lowered -Compress-> Compressed
                -Verify-> Verified -Write-> Written

Each stage is a small class whose `run(previous artifact, ctx)` returns the next artifact (a
dataclass) and keeps it as `.artifact`; no stage changes an earlier stage's artifact. `ctx`
(`ExportContext`) holds what every stage may read: the ExportConfig, the staging and final paths,
the calibration images, the log and the timings. `ExportPipeline` runs them in order, all or up to a
named stage (tests run them one by one, as ExecuTorch's XNNPACK tester does):

- Capture: `torch.export` of the fp32 model (wrapped for Core ML: softmax, per-channel std) at
  batch 1 with the DeployCfg's static shape (capture.py).
- Quantize: the scheme of `config.quant` applied to the model (`mobilevit_deploy.quantize`; the
  calibrated schemes capture their own dynamic-batch graph for batched calibration), and the
  quantized module captured like the fp32 one. Without a scheme the fp32 program passes through.
- Lower: the program to the target's format, by the lowerer `LOWERERS[target]` (coreml.py,
  executorch.py, onnx.py), in memory.
- Compress: the scheme's Core ML weight compression (w8, palette*, palette-mixed), which also yields
  the torch-side module of the compressed weights; then the artifact is saved to the staging path.
- Verify: the staged artifact against PyTorch (`verify.verify_artifact`, when `config.verify`), and
  for a quantized artifact its size against the fp32 artifact of the same target (lowered from the
  Capture stage's program) and its accuracy against the fp32 model on the shipped samples.
- Write: rename into place, manifest beside it (manifest.py), atomically.

A cascade (`config.cascade`, export/cascade.py) runs the same stages: Capture makes one program per stage
size ({method name: program}), Lower uses `lowerer_for(config)` (one `.pte` with one method per stage, or
one multi-function `.mlpackage`), Verify checks every stage and chooses the exit threshold, and Write
adds the manifest's `cascade` section.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..checkpoint import artifact_size, file_sha256
from ..pretrained import LoadedModel
from .config import COREML_DEPLOYMENT_TARGET, ExportConfig

__all__ = [
    "STAGES", "LOWERERS", "ExportContext", "ExportPipeline", "Captured", "Quantized", "Lowered", "Compressed",
    "Verified", "Written", "Capture", "Quantize", "Lower", "Compress", "Verify", "Write", "LoweredProgram",
    "lowerer_for",
]


def _fmt_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@dataclass
class ExportContext:
    """What every stage may read (and where it records its time)."""

    config: ExportConfig
    final: Path  # where the artifact ends up
    staged: Path  # where the stages build it (a staging directory inside the output directory)
    calib: Any = None  # quantize.CalibrationSet of a calibrated scheme
    log: Callable[[str], None] = print
    timings: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


# ----------------------------------------------------------------------------------------- artifacts

@dataclass
class Captured:
    source: LoadedModel
    program: Any  # torch.export.ExportedProgram of the fp32 model (Core ML: wrapped), batch 1


@dataclass
class Quantized:
    captured: Captured
    program: Any  # the program to lower: the quantized module's, or the fp32 one
    reference: Any  # nn.Module with the artifact's numerics in PyTorch (the fp32 model for a float export)
    quantized: Any = None  # quantize.QuantizedModel, None for a float export


@dataclass
class LoweredProgram:
    """What a lowerer returns: the target's program in memory, how to save it, and what it is."""

    program: Any  # coremltools MLModel | ExecutorchProgramManager | onnx.ModelProto
    save: Callable[[Any, Path], Path]
    description: str  # the `lower:` line
    ops_outside: dict = field(default_factory=dict)  # {op: count} left outside the delegate
    extra: dict = field(default_factory=dict)  # target-specific manifest keys


@dataclass
class Lowered:
    quantized: Quantized
    lowered: LoweredProgram


@dataclass
class Compressed:
    lowered: Lowered
    staged: Path  # the saved artifact (staging path)
    size_bytes: int
    reference: Any  # the torch-side module of what was saved
    quant_info: dict | None  # the scheme's `quantization` block (before the measured figures)


@dataclass
class Verified:
    compressed: Compressed
    verification: dict | None
    quantization: dict | None  # quant_info + size ratio and accuracy against fp32
    cascade: dict | None = None  # a cascade's manifest section (stages, exit rule, threshold selection)


@dataclass
class Written:
    verified: Verified
    artifact: Path
    manifest_path: Path
    manifest: dict


# ----------------------------------------------------------------------------------------- lowerers

def lower_coreml(program, deploy_cfg, config: ExportConfig, name: str, scheme: str = "fp32") -> LoweredProgram:
    from . import coreml

    dt = config.deployment_target
    mlmodel = coreml.convert(program, deploy_cfg, precision=config.precision, minimum_deployment_target=dt,
                             model_name=name)
    _, h, w = deploy_cfg.input_size
    what = (f"Core ML ML program, {config.precision}, image input {w}x{h} RGB, {deploy_cfg.num_classes} labels, "
            f"minimum deployment target {dt}")
    from .coreml_ane import ane_report  # ops the Neural Engine is known not to run (static, from the MIL program)

    ane = ane_report(mlmodel)
    what += ("; Neural Engine static check: clean" if ane["clean"] else
             "; Neural Engine static check: " + ", ".join(f"{k} x{v}" for k, v in ane["counts"].items()))
    return LoweredProgram(mlmodel, coreml.save, what, extra={"minimum_deployment_target": dt,
                                                             "neural_engine_static": ane})


LOWER_PHASES_KEY = "_lower_phases_s"  # LoweredProgram.extra: {phase: seconds} of the lowerer


def lower_executorch(program, deploy_cfg, config: ExportConfig, name: str, scheme: str = "fp32") -> LoweredProgram:
    from . import executorch as et

    phases: dict = {}
    et_program, outside = et.lower(program, backend=config.backend, precision=config.precision,
                                   minimum_deployment_target=COREML_DEPLOYMENT_TARGET, timings=phases)
    n_out = sum(outside.values())
    extra = {}
    if config.backend == "xnnpack":
        what = f"ExecuTorch, XNNPACK delegate, {scheme}; " + (
            f"{n_out} ops outside the delegate: " + ", ".join(f"{k} x{v}" for k, v in outside.items())
            if outside else "every op delegated")
    else:
        extra["minimum_deployment_target"] = COREML_DEPLOYMENT_TARGET
        what = (f"ExecuTorch, Core ML delegate, {config.precision}, minimum deployment target "
                f"{COREML_DEPLOYMENT_TARGET}; "
                + (f"{n_out} ops outside the delegate: " + ", ".join(outside) if outside else "every op delegated"))
    extra["ops_not_delegated_counts"] = outside
    extra[LOWER_PHASES_KEY] = phases  # moved into the manifest's timings_s by the Lower stage
    return LoweredProgram(et_program, et.save, what, ops_outside=outside, extra=extra)


def lower_onnx(program, deploy_cfg, config: ExportConfig, name: str, scheme: str = "fp32") -> LoweredProgram:
    from . import onnx as ox

    proto, info = ox.convert(program, deploy_cfg)
    what = f"ONNX opset {info['opset']}, simplified by onnxsim ({info['nodes_exported']} -> {info['nodes']} nodes)"
    return LoweredProgram(proto, ox.save, what, extra={"onnx": info})


# target -> lowerer(program, deploy_cfg, config, model name, scheme) -> LoweredProgram
LOWERERS: dict[str, Callable[..., LoweredProgram]] = {
    "coreml": lower_coreml,
    "executorch": lower_executorch,
    "onnx": lower_onnx,
}


def lowerer_for(config: ExportConfig) -> Callable[..., LoweredProgram]:
    """`LOWERERS[target]`, or for a cascade the multi-stage lowerer (export/cascade.py), which takes the
    Capture stage's {stage name: program} and returns one program with one method / function per stage."""
    if config.cascade is not None:
        from .cascade import CASCADE_LOWERERS

        return CASCADE_LOWERERS[config.target]
    return LOWERERS[config.target]


# ----------------------------------------------------------------------------------------- stages

class Stage:
    """One step of the export: `run(previous artifact, ctx)` -> this stage's artifact (kept as `.artifact`)."""

    name: ClassVar[str]

    def __init__(self):
        self.artifact = None

    def run(self, previous, ctx: ExportContext):
        self.artifact = self._run(previous, ctx)
        return self.artifact

    def _run(self, previous, ctx: ExportContext):
        raise NotImplementedError


class Capture(Stage):
    name = "capture"

    def _run(self, source: LoadedModel, ctx: ExportContext) -> Captured:
        from . import capture as cap

        if ctx.config.cascade is not None:  # one program per stage size: {stage name: ExportedProgram}
            from .cascade import capture_stages

            return capture_stages(source, ctx)
        cfg = source.deploy_cfg
        t = time.perf_counter()
        module = source.module
        if hasattr(module, "fold_for_export"):  # AugViT: circulant shortcuts folded into dense weights (same outputs)
            import copy

            module = copy.deepcopy(module).fold_for_export()
        program = cap.capture(cap.module_for_target(module, cfg, ctx.config.target), cfg)
        ctx.timings["capture"] = time.perf_counter() - t
        _, h, w = cfg.input_size
        ctx.log(f"capture: torch.export of {source.name} at 1x3x{h}x{w}{cap.describe_wrapper(cfg, ctx.config.target)} "
                f"({ctx.timings['capture']:.1f} s)")
        return Captured(source, program)


class Quantize(Stage):
    name = "quantize"

    def _run(self, captured: Captured, ctx: ExportContext) -> Quantized:
        source = captured.source
        if ctx.config.quant is None:
            return Quantized(captured, captured.program, source.module)
        from .. import quantize as qz
        from . import capture as cap

        t = time.perf_counter()
        q = qz.quantize_model(source.module, ctx.config.quant, deploy_cfg=source.deploy_cfg, calib=ctx.calib,
                              log=ctx.log)
        program = captured.program if q.module is source.module else cap.capture(
            cap.module_for_target(q.module, source.deploy_cfg, ctx.config.target), source.deploy_cfg)
        ctx.timings["quantize"] = time.perf_counter() - t
        return Quantized(captured, program, q.reference, q)


class Lower(Stage):
    name = "lower"

    def _run(self, quantized: Quantized, ctx: ExportContext) -> Lowered:
        source = quantized.captured.source
        t = time.perf_counter()
        lowered = lowerer_for(ctx.config)(quantized.program, source.deploy_cfg, ctx.config, source.name,
                                          ctx.config.scheme or "fp32")
        ctx.timings["lower"] = time.perf_counter() - t
        for k, v in (lowered.extra.pop(LOWER_PHASES_KEY, None) or {}).items():  # the lowerer's own phases
            ctx.timings[f"lower.{k}"] = v
        ctx.log(f"lower: {lowered.description} ({ctx.timings['lower']:.1f} s)")
        return Lowered(quantized, lowered)


class Compress(Stage):
    name = "compress"

    def _run(self, lowered: Lowered, ctx: ExportContext) -> Compressed:
        quantized, program = lowered.quantized, lowered.lowered.program
        q = quantized.quantized
        reference, info = quantized.reference, (None if q is None else dict(q.info))
        if q is not None and q.compress_mlmodel is not None:
            t = time.perf_counter()
            done = q.compress_mlmodel(program)
            program, reference, info = done.mlmodel, done.reference, {**info, **done.info}
            ctx.timings["compress"] = time.perf_counter() - t
            ctx.log(f"compress: {q.config.scheme} weights of the Core ML program ({ctx.timings['compress']:.1f} s)")
        t = time.perf_counter()
        lowered.lowered.save(program, ctx.staged)
        ctx.timings["serialize"] = time.perf_counter() - t
        return Compressed(lowered, ctx.staged, artifact_size(ctx.staged), reference, info)


def _describe_verification(v: dict) -> str:
    checks = v.get("checks") or {}
    failed = [k for k, ok in checks.items() if not ok]
    parts = [v["method"]]
    if v.get("sqnr_db") is not None or v.get("images"):
        sq = v.get("sqnr_db")
        sq_s = "inf (identical)" if sq is None or sq == float("inf") else f"{sq:.1f} dB"
        agree = round(v["top1_agreement"] * v["images"])
        parts.append(f"{v['images']} sample images: SQNR {sq_s}, max |diff| {v['max_abs_diff']:.3g}, "
                     f"top-1 agreement {agree}/{v['images']}")
    if checks:
        parts.append(f"{len(checks) - len(failed)}/{len(checks)} structural checks passed"
                     + (f" (FAILED: {', '.join(failed)})" if failed else ""))
    return "; ".join(parts)


_FP32_SIZES: dict = {}  # (checkpoint sha256, target, backend, input size) -> bytes, per process


def _existing_fp32_size(existing: Path, source: LoadedModel) -> int | None:
    """Size of an fp32 artifact already in the output directory, if its manifest names the same
    checkpoint, input size and fp32 precision."""
    import json

    sha = source.checkpoint.get("sha256")
    if not existing.exists() or sha in (None, "untrained"):
        return None
    try:
        m = json.loads(existing.with_name(existing.name + ".json").read_text())
    except (OSError, ValueError):
        return None
    same = (m.get("quantization") is None and m.get("precision") == "fp32"
            and m.get("checkpoint", {}).get("sha256") == sha
            and m.get("input", {}).get("shape") == [1, *source.deploy_cfg.input_size])
    return artifact_size(existing) if same else None


def fp32_artifact_size(captured: Captured, config: ExportConfig, out_dir: Path, log) -> tuple[int, str]:
    """Bytes of the fp32 artifact of the same model and target, and how they were obtained: one
    built earlier in this process, one already in `out_dir`, or the Capture stage's fp32 program
    lowered by the same lowerer into a temporary directory."""
    source, fp32 = captured.source, config.fp32()
    sha = source.checkpoint.get("sha256")
    key = (sha, fp32.target, fp32.backend, tuple(source.deploy_cfg.input_size))
    if sha not in (None, "untrained") and key in _FP32_SIZES:
        return _FP32_SIZES[key], "fp32 artifact of the same model and target, built earlier in this process"
    existing = fp32.artifact_path(out_dir, source.name)
    size = _existing_fp32_size(existing, source)
    if size is not None:
        return size, f"existing fp32 artifact {existing.name}"
    t = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="mvd_fp32_baseline_"))
    try:
        low = LOWERERS[fp32.target](captured.program, source.deploy_cfg, fp32, source.name)
        size = artifact_size(low.save(low.program, tmp / fp32.artifact_path(tmp, "fp32").name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if sha not in (None, "untrained"):
        _FP32_SIZES[key] = size
    log(f"quantize: fp32 reference artifact for the size ratio built ({size / 1e6:.2f} MB, "
        f"{time.perf_counter() - t:.1f} s)")
    return size, "fp32 artifact of the same model and target, built for the comparison"


def measure_quantization(compressed: Compressed, ctx: ExportContext) -> dict:
    """The manifest's `quantization` block: the scheme's info + size ratio + accuracy against fp32
    (from the artifact itself where its runtime exists here, otherwise torch-side, and it says which)."""
    from .. import verify as verify_mod

    quantized = compressed.lowered.quantized
    source, size = quantized.captured.source, compressed.size_bytes
    block = dict(compressed.quant_info)
    fp32_size, how = fp32_artifact_size(quantized.captured, ctx.config, ctx.final.parent, ctx.log)
    block.update(size_bytes=int(size), fp32_size_bytes=int(fp32_size), size_ratio_fp32=size / fp32_size,
                 fp32_size_source=how)
    suffix = compressed.staged.suffix.lower()
    runs_here = suffix in (".pte", ".onnx")
    if runs_here:
        from ..runtime import load_artifact

        run = load_artifact(compressed.staged)
        method = f"the artifact run by {'the ExecuTorch runtime' if suffix == '.pte' else 'ONNX Runtime'}"
    else:
        run, method = compressed.reference, block.get("torch_side", "torch-side")
    acc = verify_mod.compare_with_fp32(source.module, run, source.deploy_cfg, method=method)
    if (block.get("calibration") or {}).get("shipped_samples"):
        acc["overlaps_calibration"] = True  # the shipped samples are both the calibration and the check images
    block["accuracy"] = acc
    ctx.log(f"quantize: {quantized.quantized.config.scheme}: {size / 1e6:.2f} MB = {block['size_ratio_fp32']:.2f} x "
            f"fp32 ({fp32_size / 1e6:.2f} MB); vs fp32 on {acc['images']} sample images: SQNR {acc['sqnr_db']:.1f} dB, "
            f"top-1 agreement {acc['top1_agreement'] * 100:.1f} % ({'artifact' if runs_here else 'torch-side'})")
    return block


class Verify(Stage):
    name = "verify"

    def _run(self, compressed: Compressed, ctx: ExportContext) -> Verified:
        from .. import verify as verify_mod

        q = compressed.lowered.quantized.quantized
        source = compressed.lowered.quantized.captured.source
        verification = None
        t = time.perf_counter()
        if ctx.config.cascade is not None:
            return self._run_cascade(compressed, source, ctx, t)
        if ctx.config.verify:
            # a quantized artifact is checked against its own torch-side module (faithful lowering);
            # its accuracy against fp32 goes into the `quantization` block
            verification = verify_mod.verify_artifact(
                compressed.staged, compressed.reference, source.deploy_cfg, precision=ctx.config.precision,
                minimum_deployment_target=ctx.config.deployment_target,
                **({"min_sqnr_db": q.verify_min_sqnr_db} if q is not None else {}))
            ctx.timings["verify"] = time.perf_counter() - t
            ctx.log(f"verify: {_describe_verification(verification)} ({ctx.timings['verify']:.1f} s)")
        else:
            ctx.log("verify: skipped (verify=False)")
        quantization = measure_quantization(compressed, ctx) if q is not None else None
        return Verified(compressed, verification, quantization)

    @staticmethod
    def _run_cascade(compressed: Compressed, source: LoadedModel, ctx: ExportContext, t: float) -> Verified:
        """Every stage against eager at its size, then the exit threshold on the exit images (cascade.py)."""
        from .cascade import describe_verification, select_threshold, verify_cascade

        verification = None
        if ctx.config.verify:
            verification = verify_cascade(compressed.staged, compressed.reference, source.deploy_cfg, ctx.config)
            ctx.timings["verify"] = time.perf_counter() - t
            ctx.log(f"verify: {describe_verification(verification)} ({ctx.timings['verify']:.1f} s)")
        else:
            ctx.log("verify: skipped (verify=False)")
        t = time.perf_counter()
        section = select_threshold(compressed.staged, source, ctx.config, ctx.log)
        ctx.timings["threshold"] = time.perf_counter() - t
        return Verified(compressed, verification, None, section)


class Write(Stage):
    name = "write"

    def _run(self, verified: Verified, ctx: ExportContext) -> Written:
        from .coreml import replace_dir
        from .manifest import build_manifest, manifest_path_for, write_manifest

        t = time.perf_counter()
        compressed = verified.compressed
        lowered = compressed.lowered.lowered
        source = compressed.lowered.quantized.captured.source
        final, staged = ctx.final, compressed.staged
        artifact = {"file": final.name, "sha256": file_sha256(staged), "size_bytes": compressed.size_bytes}
        extra = lowered.extra if verified.cascade is None else {**lowered.extra, "cascade": verified.cascade}
        manifest = build_manifest(ctx.config, source, artifact, verification=verified.verification,
                                  quantization=verified.quantization, ops_not_delegated=list(lowered.ops_outside),
                                  extra=extra)
        mpath = manifest_path_for(final)
        replace_dir(staged, final) if staged.is_dir() else os.replace(staged, final)
        try:
            ctx.timings["write"] = time.perf_counter() - t
            ctx.timings["total"] = time.perf_counter() - ctx.started
            manifest["timings_s"] = {k: round(v, 3) for k, v in ctx.timings.items()}
            write_manifest(mpath, manifest)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True) if final.is_dir() else final.unlink(missing_ok=True)
            raise
        ctx.log(f"write: {final} ({_fmt_size(compressed.size_bytes)}) + {mpath.name} "
                f"({ctx.timings['total']:.1f} s total)")
        if verified.verification is not None and not verified.verification.get("passed", True):
            ctx.log(f"WARNING: verification FAILED for {final.name}: see 'verification' in {mpath}")
        return Written(verified, final, mpath, manifest)


# The one declared order.
STAGES: tuple[type[Stage], ...] = (Capture, Quantize, Lower, Compress, Verify, Write)


class ExportPipeline:
    """The stages of one export over a staging directory inside the output directory.

    `run()` runs every stage; `run(until="lower")` stops after that stage (and `run` again goes on
    from there). `stages[name].artifact` is each stage's result. Use as a context manager: the
    staging directory (and whatever a stopped run left in it) is removed on exit.
    """

    def __init__(self, source: LoadedModel, config: ExportConfig, out_dir, *, calib=None,
                 log: Callable[[str], None] | None = print, timings: dict | None = None, started: float | None = None):
        out = Path(out_dir)
        final = config.artifact_path(out, source.name)
        from .staging import make_staging_dir  # removes stale ones a killed export left, not a live run's

        self._staging = make_staging_dir(out, final.name, log or (lambda s: None))
        self.ctx = ExportContext(config, final, self._staging / final.name, calib, log or (lambda s: None),
                                 dict(timings or {}), started if started is not None else time.perf_counter())
        self.source = source
        self.stages = {cls.name: cls() for cls in STAGES}
        self._done = 0

    def run(self, until: str = "write"):
        """Run the next stages up to and including `until`; returns that stage's artifact."""
        names = list(self.stages)
        if until not in names:
            raise ValueError(f"unknown stage {until!r} (stages: {', '.join(names)})")
        art = self.source if self._done == 0 else self.stages[names[self._done - 1]].artifact
        while self._done <= names.index(until):
            art = self.stages[names[self._done]].run(art, self.ctx)
            self._done += 1
        return self.stages[until].artifact

    def close(self):
        shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
