"""Numerics of an artifact against eager PyTorch on real images, and structural checks.

`verify_artifact(path, model, deploy_cfg)` returns the manifest's `verification` block:
- `.pte` (XNNPACK) and `.onnx`: run on the shipped sample images (`data.sample_images()`, preprocessed
  by `data.load_batch` with the DeployCfg) and compared with `model(x)`: SQNR (dB), max abs difference,
  top-1 agreement.
- `.pte` with the Core ML delegate: structural only (the Linux executorch wheel has no Core ML runtime).
- `.mlpackage`: spec checks everywhere; on macOS also predicted and compared (probabilities against
  softmax of the eager logits).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from .errors import UserError

DEFAULT_NUM_IMAGES = 8
# Shipped sample images a quantized artifact is compared with fp32 on (all 40): `compare_with_fp32`.
ACCURACY_IMAGES = 40
# Pass thresholds for the numeric comparison (a float artifact; quantized schemes set their own).
MIN_SQNR_DB = {"fp32": 30.0, "fp16": 20.0}


def sqnr_db(ref, test) -> float:
    """Signal-to-quantization-noise ratio 10·log10(Σref² / Σ(ref−test)²) in dB; inf when identical."""
    import torch

    ref = torch.as_tensor(ref).double()
    test = torch.as_tensor(test).double()
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(test.shape)}")
    noise = (ref - test).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def max_abs_diff(ref, test) -> float:
    import torch

    return (torch.as_tensor(ref).double() - torch.as_tensor(test).double()).abs().max().item()


def top1_agreement(ref, test) -> float:
    """Fraction of rows whose argmax is the same."""
    import torch

    ref, test = torch.as_tensor(ref), torch.as_tensor(test)
    return (ref.argmax(-1) == test.argmax(-1)).double().mean().item()


def compare(ref, test) -> dict:
    import torch

    return {
        "sqnr_db": sqnr_db(ref, test),
        "max_abs_diff": max_abs_diff(ref, test),
        "top1_agreement": top1_agreement(ref, test),
        "ref_abs_max": torch.as_tensor(ref).abs().max().item(),  # scale for max_abs_diff
    }


def sample_batch(deploy_cfg, num_images: int = DEFAULT_NUM_IMAGES):
    """(x [N, 3, H, W], names): `num_images` shipped samples spread over the classes, preprocessed."""
    from .data import load_batch, sample_images

    samples = sample_images()
    if not samples:
        raise UserError("no sample images shipped with the package (mobilevit_deploy/assets/samples)")
    n = max(1, min(num_images, len(samples)))
    step = len(samples) / n
    picked = [samples[int(i * step)] for i in range(n)]
    paths = [p for p, _ in picked]
    return load_batch(paths, deploy_cfg), [Path(p).name for p in paths]


def eager_logits(model, x):
    import torch

    with torch.no_grad():
        return model.eval()(x).float()


def batched_logits(run, x, batch: int = 100):
    """`run(x)` (a module or an artifact's runner) over `x` in chunks of `batch`, float32, no grad."""
    import torch

    with torch.no_grad():
        return torch.cat([run(x[i:i + batch]).float() for i in range(0, x.shape[0], batch)])


def compare_with_fp32(fp32_model, run, deploy_cfg, *, num_images: int = ACCURACY_IMAGES, method: str = "") -> dict:
    """SQNR / top-1 agreement of `run(x)` (an artifact's runner or a torch-side module) against the fp32
    model's logits on the shipped sample images: the manifest's `quantization.accuracy` block."""
    import torch

    x, names = sample_batch(deploy_cfg, num_images)
    ref = eager_logits(fp32_model, x)
    with torch.no_grad():
        test = run(x).float()
    c = compare(ref, test)
    return {"images": len(names), "compared_with": "fp32 PyTorch model (logits)", "method": method,
            "sqnr_db": c["sqnr_db"], "top1_agreement": c["top1_agreement"], "max_abs_diff": c["max_abs_diff"]}


def verify_artifact(
    artifact_path: str | os.PathLike,
    model,
    deploy_cfg,
    *,
    precision: str = "fp32",
    num_images: int = DEFAULT_NUM_IMAGES,
    min_sqnr_db: float | None = None,
    minimum_deployment_target: str = "iOS16",
) -> dict:
    """Compare an artifact with eager `model` (or check it structurally); the manifest's block.

    `precision` is the compute precision the artifact was built with (Core ML checks it in the spec).
    `passed` is True when every structural check holds and, where the artifact was run, its SQNR is
    at least `min_sqnr_db` (default by precision: fp32 30 dB, fp16 20 dB).
    """
    p = Path(artifact_path)
    suffix = p.suffix.lower()
    min_sqnr = MIN_SQNR_DB.get(precision, 20.0) if min_sqnr_db is None else float(min_sqnr_db)
    if suffix == ".mlpackage":
        return _verify_coreml(p, model, deploy_cfg, precision, num_images, min_sqnr, minimum_deployment_target)
    if suffix == ".pte":
        from .export.executorch import inspect_pte, runtime_backends

        delegates = set(inspect_pte(p)["delegates"])
        missing = sorted(delegates - set(runtime_backends()))
        if "CoreMLBackend" in missing:
            from .export.executorch import coreml_delegate_checks

            res = coreml_delegate_checks(p, deploy_cfg, precision=precision,
                                         minimum_deployment_target=minimum_deployment_target)
            return {
                "images": 0,
                "method": f"structural only: the {sys.platform} executorch wheel has no Core ML runtime",
                "sqnr_db": None, "max_abs_diff": None, "top1_agreement": None,
                "checks": res["checks"],
                "delegates": res["delegates"],
                "delegate_op_types": res["op_types"],
                "passed": all(res["checks"].values()),
            }
        if missing:
            raise UserError(f"cannot verify {p.name}: delegated to {', '.join(missing)}, not available here")
        method = "executorch runtime"
    elif suffix == ".onnx":
        method = "onnxruntime"
    else:
        raise UserError(f"unknown artifact type {p.name!r} (choose from: .pte, .onnx, .mlpackage)")

    from .runtime import load_artifact

    x, names = sample_batch(deploy_cfg, num_images)
    ref = eager_logits(model, x)
    test = load_artifact(p)(x)
    res = {"images": len(names), "method": method, **compare(ref, test)}
    res["min_sqnr_db"] = min_sqnr
    res["passed"] = bool(res["sqnr_db"] >= min_sqnr)
    return res


def _verify_coreml(p, model, deploy_cfg, precision, num_images, min_sqnr, target) -> dict:
    from .export.coreml import spec_checks

    spec = spec_checks(p, deploy_cfg, precision=precision, minimum_deployment_target=target)
    res = {
        "images": 0,
        "method": "coreml spec check (Linux)" if sys.platform != "darwin" else "coreml predict (macOS)",
        "sqnr_db": None, "max_abs_diff": None, "top1_agreement": None,
        "checks": spec["checks"],
        "op_types": spec["op_types"],
        "fp16_ops": spec["fp16_ops"],
        "spec_version": spec["spec_version"],
    }
    passed = all(spec["checks"].values())
    if sys.platform == "darwin":
        import torch

        from .export.coreml import load_for_predict, predict_probs

        x, names = sample_batch(deploy_cfg, num_images)
        ref = torch.softmax(eager_logits(model, x), dim=-1)
        test = predict_probs(load_for_predict(p), x, deploy_cfg)
        res.update({"images": len(names), "compared": "probabilities", **compare(ref, test), "min_sqnr_db": min_sqnr})
        passed = passed and res["sqnr_db"] >= min_sqnr
    res["passed"] = bool(passed)
    return res
