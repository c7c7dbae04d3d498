"""The three places where the export stage calls into quantization (kept here so the exporter's
own code changes by a few lines):

1. `prepare(...)` before capture: validate the scheme for the target, load the calibration
   images, apply the scheme -> QuantizedModel (`module` is captured instead of the fp32 model).
2. the lowering stage uses `q.minimum_deployment_target` and `q.compress_mlmodel` (Core ML).
3. `manifest_block(...)` after verification: the manifest's `quantization` block with the
   measured figures -- size ratio to the fp32 artifact of the same target, and SQNR / top-1
   agreement against the fp32 model on the shipped sample images (from the artifact itself where
   its runtime exists here, otherwise torch-side, and the block says which).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..errors import UserError
from . import ACCURACY_IMAGES, QuantizedModel, accuracy_vs_fp32, get_config, load_calibration, quantize_model


def _options(calibration, weight_bits_budget) -> dict:
    """Config fields set by their own CLI flag (None: not given, the scheme's default)."""
    out = {}
    if calibration is not None:
        out["calibration"] = calibration
    if weight_bits_budget is not None:
        out["budget_avg_bits"] = weight_bits_budget
    return out


def validate(target: str, backend: str, quant: str, *, calib_data=None, calib_size=None, keep_float=None,
             calibration: str | None = None, weight_bits_budget: float | None = None) -> dict:
    """Check the quantization arguments before anything is written (UserError / DataError);
    returns the keyword arguments of `prepare`."""
    if target == "executorch" and backend != "xnnpack":
        raise UserError(f"quantization schemes for executorch are lowered to XNNPACK; --backend {backend} "
                        "is not offered with --quant (use --target coreml --quant ... for Core ML)")
    cfg = get_config(target, quant, keep_float=keep_float, **_options(calibration, weight_bits_budget))
    if cfg.calibrated:
        load_calibration(calib_data, calib_size)  # a missing or empty folder fails here, early
    return {"quant": quant, "calib_data": calib_data, "calib_size": calib_size, "keep_float": keep_float,
            "calibration": calibration, "weight_bits_budget": weight_bits_budget}


def prepare(model, deploy_cfg, *, target: str, backend: str, quant: str, calib_data=None, calib_size=None,
            keep_float: str | None = None, calibration: str | None = None, weight_bits_budget: float | None = None,
            progress: bool = True, log: Callable[[str], None] = print) -> QuantizedModel:
    """Validate and apply scheme `quant` for `target`/`backend`; raises UserError for bad input."""
    opts = _options(calibration, weight_bits_budget)
    validate(target, backend, quant, keep_float=keep_float, calibration=calibration,
             weight_bits_budget=weight_bits_budget)
    cfg = get_config(target, quant, keep_float=keep_float, **opts)
    if "budget_avg_bits" in getattr(cfg, "__dataclass_fields__", {}) and weight_bits_budget is None:
        log(f"quantize: {target} {quant}: no --weight-bits-budget given; using the default "
            f"{cfg.budget_avg_bits:.1f} average weight bits")
    if cfg.calibrated:
        calib = load_calibration(calib_data, calib_size)
    else:
        if calib_data is not None or calib_size is not None:
            log(f"quantize: {target} {quant} needs no calibration; --calib-data/--calib-size are ignored")
        calib = None
    return quantize_model(model, cfg, deploy_cfg=deploy_cfg, calib=calib, progress=progress, log=log)


_FP32_SIZES: dict = {}  # (checkpoint sha256, target, backend, input size) -> bytes, per process


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def fp32_artifact_size(model, deploy_cfg, *, target: str, backend: str, existing: Path | None = None,
                       checkpoint_sha256: str | None = None, log: Callable[[str], None] = print) -> tuple[int, str]:
    """Size in bytes of the fp32 artifact of the same model and target: (size, how it was obtained).

    An fp32 artifact already beside the quantized one is used when its manifest names the same
    checkpoint, input size and fp32 precision; otherwise one is built in a temporary directory.
    """
    import json

    key = (checkpoint_sha256, target, backend, tuple(deploy_cfg.input_size))
    if checkpoint_sha256 not in (None, "untrained") and key in _FP32_SIZES:
        return _FP32_SIZES[key], "fp32 artifact of the same model and target, built earlier in this process"
    if existing is not None and existing.exists():
        mp = existing.with_name(existing.name + ".json")
        try:
            m = json.loads(mp.read_text())
            if (m.get("quantization") is None and m.get("precision") == "fp32"
                    and m.get("checkpoint", {}).get("sha256") == checkpoint_sha256 and checkpoint_sha256 != "untrained"
                    and m.get("input", {}).get("shape") == [1, *deploy_cfg.input_size]):
                return _size(existing), f"existing fp32 artifact {existing.name}"
        except (OSError, ValueError):
            pass
    from ..export import capture as cap

    t = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="mvd_fp32_baseline_"))
    try:
        ep = cap.capture(cap.module_for_target(model, deploy_cfg, target), deploy_cfg)
        if target == "executorch":
            from ..export import executorch as et

            program, _ = et.lower(ep, backend=backend, precision="fp32")
            out = tmp / "fp32.pte"
            et.save(program, out)
        elif target == "coreml":
            from ..export import coreml

            mlmodel = coreml.convert(ep, deploy_cfg, precision="fp32")
            out = tmp / "fp32.mlpackage"
            coreml.save(mlmodel, out)
        else:
            from ..export import onnx as ox

            proto, _ = ox.convert(ep, deploy_cfg)
            out = tmp / "fp32.onnx"
            ox.save(proto, out)
        size = _size(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if checkpoint_sha256 not in (None, "untrained"):
        _FP32_SIZES[key] = size
    log(f"quantize: fp32 reference artifact for the size ratio built ({size / 1e6:.2f} MB, "
        f"{time.perf_counter() - t:.1f} s)")
    return size, "fp32 artifact of the same model and target, built for the comparison"


def manifest_block(q: QuantizedModel, fp32_model, deploy_cfg, staged: Path, *, target: str, backend: str,
                   artifact_size: int, fp32_existing: Path | None = None, checkpoint_sha256: str | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """The manifest's `quantization` block: q.info + size ratio + accuracy against fp32."""
    block = dict(q.info)
    fp32_size, how = fp32_artifact_size(fp32_model, deploy_cfg, target=target, backend=backend,
                                        existing=fp32_existing, checkpoint_sha256=checkpoint_sha256, log=log)
    block["size_bytes"] = int(artifact_size)
    block["fp32_size_bytes"] = int(fp32_size)
    block["size_ratio_fp32"] = artifact_size / fp32_size
    block["fp32_size_source"] = how
    suffix = staged.suffix.lower()
    if suffix in (".pte", ".onnx"):
        from ..runtime import load_artifact

        runner = load_artifact(staged)
        acc = accuracy_vs_fp32(fp32_model, runner, deploy_cfg, num_images=ACCURACY_IMAGES,
                               method=f"the artifact run by {'the ExecuTorch runtime' if suffix == '.pte' else 'ONNX Runtime'}")
    else:
        acc = accuracy_vs_fp32(fp32_model, q.reference, deploy_cfg, num_images=ACCURACY_IMAGES,
                               method=q.info.get("torch_side", "torch-side"))
    calib = q.info.get("calibration")
    if calib and calib.get("shipped_samples"):
        acc["overlaps_calibration"] = True  # the shipped samples are both the calibration and the check images
    block["accuracy"] = acc
    sq = acc["sqnr_db"]
    log(f"quantize: {q.config.scheme}: {artifact_size / 1e6:.2f} MB = {block['size_ratio_fp32']:.2f} x fp32 "
        f"({fp32_size / 1e6:.2f} MB); vs fp32 on {acc['images']} sample images: SQNR {sq:.1f} dB, top-1 agreement "
        f"{acc['top1_agreement'] * 100:.1f} % ({'artifact' if suffix in ('.pte', '.onnx') else 'torch-side'})")
    return block
