"""Export: one `torch.export` capture -> Core ML `.mlpackage`, ExecuTorch `.pte` or `.onnx`, verified.

    from mobilevit_deploy.export import export_model
    res = export_model("mobilevit_xxs", "executorch", out_dir="artifacts")
    res.artifact, res.manifest_path, res.manifest["verification"]

Stages (one progress line each): load the model -> capture (capture.py) -> lower (coreml.py,
executorch.py, onnx.py; the artifact is built in a staging directory inside `out_dir`) -> verify
(../verify.py, on the staged artifact) -> write (rename into place, manifest beside it, manifest.py).
Nothing is left behind when a stage fails. Importing this package imports neither torch's exporters
nor coremltools, executorch, onnx or onnxruntime; each stage imports what it needs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, UserError, choices_error

__all__ = ["export_model", "ExportResult", "TARGETS", "BACKENDS", "artifact_path"]

TARGETS = ("coreml", "executorch", "onnx")
BACKENDS = {"coreml": ("mlprogram",), "executorch": ("xnnpack", "coreml"), "onnx": ("onnxruntime",)}
PRECISIONS = {
    ("coreml", "mlprogram"): ("fp16", "fp32"),
    ("executorch", "xnnpack"): ("fp32",),
    ("executorch", "coreml"): ("fp16", "fp32"),
    ("onnx", "onnxruntime"): ("fp32",),
}
COREML_DEPLOYMENT_TARGET = "iOS16"  # float ML program; W8A8 will need iOS17


@dataclass
class ExportResult:
    artifact: Path
    manifest_path: Path
    manifest: dict
    # with quant=...: the QuantizedModel the artifact was built from (`.reference` = its numerics in
    # PyTorch, the torch-side check of Core ML schemes); None for float exports
    quantized: object = None

    @property
    def verification(self) -> dict | None:
        return self.manifest.get("verification")


def artifact_path(out_dir, model_name: str, target: str, backend: str | None = None, quant: str | None = None) -> Path:
    """artifacts/<model>[_<quant>].mlpackage | .pte | _coreml.pte | .onnx"""
    backend = backend or BACKENDS[target][0]
    stem = model_name + (f"_{quant}" if quant else "")
    if target == "coreml":
        return Path(out_dir) / f"{stem}.mlpackage"
    if target == "executorch":
        return Path(out_dir) / (f"{stem}_coreml.pte" if backend == "coreml" else f"{stem}.pte")
    return Path(out_dir) / f"{stem}.onnx"


def _fmt_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _check_out_dir(out_dir) -> tuple[Path, bool]:
    """Create `out_dir` if needed and check that files can be written in it: (path, created)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        if created:
            _rmdir_quiet(out)
        raise UserError(f"output directory {out} is not writable: {e.strerror or e}") from None
    return out, created


def _rmdir_quiet(d: Path):
    try:
        d.rmdir()
    except OSError:
        pass


def _state_dict_sha256(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _checkpoint_deploy_cfg(path: Path):
    """A DeployCfg stored with a checkpoint: `"deploy_cfg"` in `<ckpt>.json` / `<stem>.json` beside it,
    or in the safetensors metadata (a JSON string under "deploy_cfg"). None when there is none."""
    from ..models import DeployCfg

    for meta in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if meta.is_file():
            try:
                d = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(d, dict) and isinstance(d.get("deploy_cfg"), dict):
                return DeployCfg.from_dict(d["deploy_cfg"]), meta
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
            if "deploy_cfg" in md:
                return DeployCfg.from_dict(json.loads(md["deploy_cfg"])), path
        except Exception:
            pass
    return None


def _repo_relative(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path(__file__).resolve().parents[2]))
    except ValueError:
        return str(p)


def _load_model(model_name, *, model, checkpoint, num_classes, deploy_cfg, log):
    """(model, deploy_cfg, name, checkpoint block of the manifest)."""
    from ..checkpoint import file_sha256, load_checkpoint

    if model is not None:
        cfg = deploy_cfg or getattr(model, "deploy_cfg", None)
        if cfg is None:
            raise UserError("export_model(model=...) needs deploy_cfg= or a model with a .deploy_cfg")
        if num_classes is not None and num_classes != cfg.num_classes:
            raise UserError(f"num_classes={num_classes} does not match the model's deploy_cfg ({cfg.num_classes} classes)")
        name = model_name or type(model).__name__.lower()
        if checkpoint is not None:
            load_checkpoint(model, checkpoint)
            ckpt = {"path": str(checkpoint), "sha256": file_sha256(checkpoint)}
        else:
            ckpt = {"path": None, "sha256": _state_dict_sha256(model), "source": "nn.Module passed to export_model (state_dict sha256)"}
        log(f"model: {name} (module passed in), {cfg.num_classes} classes, input {cfg.input_size[1]}x{cfg.input_size[2]}")
        return model.eval(), cfg, name, ckpt

    from ..models import create_model, get_deploy_cfg, list_models

    if model_name not in list_models():
        raise choices_error("model", model_name, list_models())
    if num_classes is not None and num_classes < 1:
        raise UserError(f"--num-classes must be >= 1, got {num_classes}")

    def with_classes(cfg):
        return cfg.with_classes(num_classes) if num_classes is not None and num_classes != cfg.num_classes else cfg

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        found = None if deploy_cfg is not None else _checkpoint_deploy_cfg(path)
        cfg = with_classes(deploy_cfg or (found[0] if found else get_deploy_cfg(model_name)))
        try:
            m = create_model(model_name, checkpoint=str(path), deploy_cfg=cfg)
        except CheckpointError as e:
            hint = ""
            if num_classes is None and "shape mismatch" in str(e):
                hint = " (trained on another number of classes? pass --num-classes N)"
            raise CheckpointError(f"{e}{hint}") from None
        log(f"model: {model_name} from checkpoint {path} ({cfg.num_classes} classes, input "
            f"{cfg.input_size[1]}x{cfg.input_size[2]}{', deploy_cfg from ' + str(found[1]) if found else ''})")
        return m, cfg, model_name, {"path": str(path), "sha256": file_sha256(path)}

    from ..pretrained import shipped_weights

    sw = shipped_weights(model_name)
    if sw is not None:
        sw_cfg = sw.deploy_cfg
        cfg = with_classes(deploy_cfg or sw_cfg)
        if cfg.num_classes == sw_cfg.num_classes:
            m = create_model(model_name, checkpoint=str(sw.path), deploy_cfg=cfg)
            top1 = sw.meta.get("val_top1")
            top1_s = f"{top1:.2f}" if isinstance(top1, (int, float)) else "?"
            log(f"model: {model_name} with shipped weights {sw.path.name} (val top-1 {top1_s} % on "
                f"{sw.meta.get('data', '?')}, {cfg.num_classes} classes, input {cfg.input_size[1]}x{cfg.input_size[2]})")
            return m, cfg, model_name, {"path": _repo_relative(sw.path), "sha256": file_sha256(sw.path),
                                        "shipped": True, "val_top1": top1}
        why = (f"the shipped weights {sw.path.name} have {sw_cfg.num_classes} classes, not {cfg.num_classes}")
    else:
        why = f"no checkpoint given and no shipped weights for {model_name}"
    cfg = with_classes(deploy_cfg or get_deploy_cfg(model_name))
    m = create_model(model_name, deploy_cfg=cfg)
    log(f"WARNING: {why}: exporting UNTRAINED random weights "
        f"(pass --checkpoint PATH for a trained model)")
    log(f"model: {model_name}, untrained, {cfg.num_classes} classes, input {cfg.input_size[1]}x{cfg.input_size[2]}")
    return m, cfg, model_name, {"path": None, "sha256": "untrained"}


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


def export_model(
    model_name: str | None = "mobilevit_xxs",
    target: str = "coreml",
    *,
    out_dir="artifacts",
    checkpoint=None,
    num_classes: int | None = None,
    backend: str | None = None,
    quant: str | None = None,
    calib_data=None,
    calib_size: int | None = None,
    keep_float: str | None = None,
    calibration: str | None = None,
    weight_bits_budget: float | None = None,
    model=None,
    deploy_cfg=None,
    verify: bool = True,
    precision: str | None = None,
    log: Callable[[str], None] | None = print,
) -> ExportResult:
    """Export one model to one target, verify it, and write the artifact and its manifest.

    `model=` exports an `nn.Module` directly (its `.deploy_cfg`, or `deploy_cfg=`); otherwise
    `model_name` is built with `checkpoint`, or the shipped weights, or untrained (said loudly).
    `deploy_cfg=` overrides the input spec (e.g. a smaller input size). `precision`: Core ML
    compute precision ("fp16" default, or "fp32"); ExecuTorch XNNPACK and ONNX are fp32.
    Raises UserError (CheckpointError) for bad input before anything is written.
    `quant` names a scheme of `mobilevit_deploy.quantize` for the target (calibrated on `calib_data`,
    or on the shipped sample images; `keep_float`: "LAYER,...", "auto:N" or "none"). `calibration`:
    "minmax" (default) or "vit" (ViT-aware PTQ) for the calibrated W8A8 schemes (executorch/coreml
    int8); `weight_bits_budget`: average weight bits of coreml palette-mixed (default 6.0).
    """
    log = log or (lambda s: None)
    t_total = time.perf_counter()
    if target not in TARGETS:
        raise choices_error("target", target, TARGETS)
    backend = backend or BACKENDS[target][0]
    if backend not in BACKENDS[target]:
        raise choices_error(f"backend for {target}", backend, BACKENDS[target])
    quant_args = None
    if quant is not None:
        from ..quantize.export_hooks import validate

        quant_args = validate(target, backend, quant, calib_data=calib_data, calib_size=calib_size, keep_float=keep_float,
                              calibration=calibration, weight_bits_budget=weight_bits_budget)
    elif calibration is not None or weight_bits_budget is not None:
        from ..quantize import schemes_accepting

        flag, opt = (("--calibration", "calibration") if calibration is not None
                     else ("--weight-bits-budget", "budget_avg_bits"))
        raise UserError(f"{flag} needs --quant (it applies to: {', '.join(schemes_accepting(opt))})")
    elif calib_data is not None or calib_size is not None or keep_float is not None:
        raise UserError("calib_data/calib_size/keep_float need a quantization scheme (quant=...)")
    allowed = PRECISIONS[(target, backend)]
    precision = precision or allowed[0]
    if precision not in allowed:
        raise choices_error(f"precision for {target}/{backend}", precision, allowed)

    out, created_out = _check_out_dir(out_dir)
    try:
        timings = {}
        t = time.perf_counter()
        model, cfg, name, ckpt = _load_model(model_name, model=model, checkpoint=checkpoint, num_classes=num_classes,
                                             deploy_cfg=deploy_cfg, log=log)
        timings["load_model"] = time.perf_counter() - t
        final = artifact_path(out, name, target, backend, quant)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging.", dir=out))
        try:
            return _export(model, cfg, name, ckpt, target, backend, precision, verify, final,
                           staging / final.name, timings, t_total, log, quant_args)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        if created_out:
            _rmdir_quiet(out)  # only if empty: never removes anything but the directory we made
        raise


def _export(model, cfg, name, ckpt, target, backend, precision, verify, final, staged, timings, t_total, log,
            quant_args=None):
    from . import capture as cap
    from .manifest import build_manifest, input_spec, manifest_path_for, write_manifest

    _, h, w = cfg.input_size
    q = None  # quantize (optional): the QuantizedModel's module is captured instead of the fp32 model
    if quant_args is not None:
        from ..quantize import export_hooks

        t = time.perf_counter()
        q = export_hooks.prepare(model, cfg, target=target, backend=backend, log=log, **quant_args)
        timings["quantize"] = time.perf_counter() - t
    dt = (q.minimum_deployment_target if q is not None and q.minimum_deployment_target else COREML_DEPLOYMENT_TARGET)
    # capture
    t = time.perf_counter()
    module = cap.module_for_target(q.module if q is not None else model, cfg, target)
    ep = cap.capture(module, cfg)
    timings["capture"] = time.perf_counter() - t
    wrapped = " (+ softmax" + (", per-channel std" if cap.channel_scale(cfg) else "") + " for the Core ML classifier)" \
        if target == "coreml" else ""
    log(f"capture: torch.export of {name} at 1x3x{h}x{w}{wrapped} ({timings['capture']:.1f} s)")

    # lower (writes the staged artifact)
    t = time.perf_counter()
    ops_outside: dict[str, int] = {}
    extra: dict = {}
    if target == "coreml":
        from . import coreml

        mlmodel = coreml.convert(ep, cfg, precision=precision, minimum_deployment_target=dt, model_name=name)
        if q is not None and q.compress_mlmodel is not None:
            # before verify and the manifest: palette-mixed plans on this MLModel and completes
            # q.reference (the artifact's weights) and q.info (the plan) here
            mlmodel = q.compress_mlmodel(mlmodel)
        coreml.save(mlmodel, staged)
        extra["minimum_deployment_target"] = dt
        what = f"Core ML ML program, {precision}, image input {w}x{h} RGB, {cfg.num_classes} labels, " \
               f"minimum deployment target {dt}"
    elif target == "executorch":
        from . import executorch as et

        program, ops_outside = et.lower(ep, backend=backend, precision=precision,
                                        minimum_deployment_target=COREML_DEPLOYMENT_TARGET)
        et.save(program, staged)
        n_out = sum(ops_outside.values())
        if backend == "xnnpack":
            what = f"ExecuTorch, XNNPACK delegate, {'fp32' if q is None else q.config.scheme}; " + (
                f"{n_out} ops outside the delegate: " + ", ".join(f"{k} x{v}" for k, v in ops_outside.items())
                if ops_outside else "every op delegated")
        else:
            extra["minimum_deployment_target"] = COREML_DEPLOYMENT_TARGET
            what = f"ExecuTorch, Core ML delegate, {precision}, minimum deployment target {COREML_DEPLOYMENT_TARGET}; " + (
                f"{n_out} ops outside the delegate: " + ", ".join(ops_outside) if ops_outside else "every op delegated")
        extra["ops_not_delegated_counts"] = ops_outside
    else:
        from . import onnx as ox

        proto, info = ox.convert(ep, cfg)
        ox.save(proto, staged)
        extra["onnx"] = info
        what = f"ONNX opset {info['opset']}, simplified by onnxsim ({info['nodes_exported']} -> {info['nodes']} nodes)"
    timings["lower"] = time.perf_counter() - t
    log(f"lower: {what} ({timings['lower']:.1f} s)")

    # verify (on the staged artifact)
    verification = None
    if verify:
        from ..verify import verify_artifact

        t = time.perf_counter()
        # a quantized artifact is checked against its own torch-side quantized module (faithful lowering);
        # its accuracy against fp32 goes into the `quantization` block below
        verification = verify_artifact(staged, q.reference if q is not None else model, cfg, precision=precision,
                                       minimum_deployment_target=dt,
                                       **({"min_sqnr_db": q.verify_min_sqnr_db} if q is not None else {}))
        timings["verify"] = time.perf_counter() - t
        log(f"verify: {_describe_verification(verification)} ({timings['verify']:.1f} s)")
    else:
        log("verify: skipped (verify=False)")

    # write
    from ..checkpoint import file_sha256
    from .coreml import replace_dir

    t = time.perf_counter()
    size = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file()) if staged.is_dir() else staged.stat().st_size
    sha = file_sha256(staged)
    coreml_target = target == "coreml"
    inp = input_spec(cfg, kind="image" if coreml_target else "tensor",
                     channel_scale=cap.channel_scale(cfg) if coreml_target else None)
    c = cfg.num_classes
    output = ({"name": "classLabel_probs", "shape": [1, c], "kind": "probabilities", "label_output": "classLabel"}
              if coreml_target else {"name": "logits", "shape": [1, c], "kind": "logits"})
    quantization = None
    if q is not None:
        from ..quantize import export_hooks

        quantization = export_hooks.manifest_block(
            q, model, cfg, staged, target=target, backend=backend, artifact_size=size, checkpoint_sha256=ckpt.get("sha256"),
            fp32_existing=artifact_path(final.parent, name, target, backend), log=log)
    manifest = build_manifest(
        model=name, target=target, backend=backend, precision=precision, deploy_cfg=cfg, input=inp, output=output,
        checkpoint=ckpt, artifact_file=final.name, artifact_sha256=sha, artifact_size=size,
        verification=verification, ops_not_delegated=list(ops_outside), quantization=quantization, timings_s=timings,
        extra=extra,
    )
    mpath = manifest_path_for(final)
    if staged.is_dir():
        replace_dir(staged, final)
    else:
        os.replace(staged, final)
    try:
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_total
        manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        write_manifest(mpath, manifest)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True) if final.is_dir() else final.unlink(missing_ok=True)
        raise
    log(f"write: {final} ({_fmt_size(size)}) + {mpath.name} ({timings['total']:.1f} s total)")
    if verification is not None and not verification.get("passed", True):
        log(f"WARNING: verification FAILED for {final.name}: see 'verification' in {mpath}")
    return ExportResult(artifact=final, manifest_path=mpath, manifest=manifest, quantized=q)
