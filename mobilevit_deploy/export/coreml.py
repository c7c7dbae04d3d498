"""Core ML: ExportedProgram -> ML program `.mlpackage` with an image input and class labels.

`convert` returns the `MLModel` before anything is saved, so a compression pass
(`coremltools.optimize.coreml`) can be inserted between `convert` and `save`. `save` builds the
`.mlpackage` directory beside the target and renames it into place. `spec_checks` is the Linux
verification (no Core ML runtime ships for Linux); `predict_compare` runs the model on macOS.

Measured with coremltools 9.0 (docs/../measured-facts.md): `ct.convert` needs
`ep.run_decompositions({})`; the `torch.jit.trace` path fails with numpy 2.4.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import UserError

PRECISIONS = ("fp16", "fp32")
# Float ML programs need iOS 16 / macOS 13 (Core ML spec 7, MIL opset CoreML6); W8A8 (activation
# quantize/dequantize ops) will need iOS 17.
DEFAULT_DEPLOYMENT_TARGET = "iOS16"
OUTPUT_LABEL = "classLabel"
OUTPUT_PROBS = "classLabel_probs"
OUTPUT_ARRAY_PROBS = "probabilities"  # a depth cascade's exit / rest functions: probabilities in label order


def _ct():
    import coremltools as ct

    return ct


def _fp16():
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Value("FLOAT16")


def deployment_target(name: str):
    ct = _ct()
    try:
        return getattr(ct.target, name)
    except AttributeError:
        raise UserError(f"unknown Core ML deployment target {name!r} "
                        f"(choose from: {', '.join(t.name for t in ct.target)})") from None


def convert(
    ep,
    deploy_cfg,
    *,
    precision: str = "fp16",
    minimum_deployment_target: str = DEFAULT_DEPLOYMENT_TARGET,
    model_name: str | None = None,
):
    """`ct.convert` an ExportedProgram of `CoreMLClassifier(model)` (see capture.py) to an MLModel.

    Input "image": RGB ImageType of the DeployCfg's size with the normalisation baked in
    (`DeployCfg.scale_bias`); outputs "classLabel" and "classLabel_probs" over `class_labels`.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} for coreml (choose from: {', '.join(PRECISIONS)})")
    ct = _ct()
    _, h, w = deploy_cfg.input_size
    scale, bias = deploy_cfg.scale_bias
    mlmodel = ct.convert(
        ep.run_decompositions({}),
        convert_to="mlprogram",
        inputs=[ct.ImageType(name="image", shape=(1, 3, h, w), scale=scale, bias=list(bias),
                             color_layout=ct.colorlayout.RGB)],
        classifier_config=ct.ClassifierConfig(list(deploy_cfg.class_labels)),
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=deployment_target(minimum_deployment_target),
    )
    _describe(mlmodel, deploy_cfg, precision, model_name)
    return mlmodel


def convert_arrays(
    ep,
    deploy_cfg,
    *,
    outputs: list[str],
    feature_shape: tuple | None = None,
    precision: str = "fp16",
    minimum_deployment_target: str = DEFAULT_DEPLOYMENT_TARGET,
    model_name: str | None = None,
):
    """`ct.convert` a program whose outputs are plain arrays named `outputs` (no classifier; a depth
    cascade's functions). Its input is the "image" ImageType of `convert` or, with `feature_shape`, a
    float MultiArray "features" of that shape."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} for coreml (choose from: {', '.join(PRECISIONS)})")
    ct = _ct()
    _, h, w = deploy_cfg.input_size
    if feature_shape is None:
        scale, bias = deploy_cfg.scale_bias
        inputs = [ct.ImageType(name="image", shape=(1, 3, h, w), scale=scale, bias=list(bias),
                               color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name="features", shape=tuple(int(d) for d in feature_shape))]
    mlmodel = ct.convert(
        ep.run_decompositions({}),
        convert_to="mlprogram",
        inputs=inputs,
        outputs=[ct.TensorType(name=n) for n in outputs],
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=deployment_target(minimum_deployment_target),
    )
    name = model_name or "model"
    mlmodel.short_description = f"{name} ({', '.join(outputs)}; {precision}), exported by mobilevit_deploy"
    if feature_shape is None:
        mlmodel.input_description["image"] = f"RGB image, {w}x{h}; normalisation is inside the model."
    else:
        mlmodel.input_description["features"] = "the exit function's `features` output"
    for n in outputs:
        mlmodel.output_description[n] = {OUTPUT_ARRAY_PROBS: "Probability of each class (softmax), in label order",
                                         "features": "stage features the rest function continues from"}.get(n, n)
    return mlmodel


def _describe(mlmodel, deploy_cfg, precision, model_name):
    """Descriptions Xcode shows in its model viewer, and the preprocessing as metadata."""
    from .. import __version__

    _, h, w = deploy_cfg.input_size
    name = model_name or "model"
    mlmodel.short_description = (
        f"{name} image classifier ({deploy_cfg.num_classes} classes, {h}x{w} RGB, {precision}), "
        f"exported by mobilevit_deploy {__version__}"
    )
    mlmodel.version = __version__
    mlmodel.input_description["image"] = (
        f"RGB image, {w}x{h}. Resize the shorter side to {round(min(h, w) / deploy_cfg.crop_pct)} "
        f"({deploy_cfg.interpolation}) and centre-crop; normalisation is inside the model."
    )
    mlmodel.output_description[OUTPUT_LABEL] = "Most likely class label"
    mlmodel.output_description[OUTPUT_PROBS] = "Probability of each class (softmax)"
    meta = mlmodel.user_defined_metadata
    meta["mobilevit_deploy.model"] = name
    meta["mobilevit_deploy.precision"] = precision
    meta["mobilevit_deploy.mean"] = ",".join(f"{v:g}" for v in deploy_cfg.mean)
    meta["mobilevit_deploy.std"] = ",".join(f"{v:g}" for v in deploy_cfg.std)
    meta["mobilevit_deploy.crop_pct"] = f"{deploy_cfg.crop_pct:g}"


def save(mlmodel, path: str | os.PathLike) -> Path:
    """Save to `path` (a `.mlpackage` directory) via a temporary directory beside it and a rename.

    An existing package at `path` is replaced only once the new one is complete.
    """
    path = Path(path)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_pkg = tmp_dir / path.name
        mlmodel.save(str(tmp_pkg))
        replace_dir(tmp_pkg, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` onto `dst`; an existing `dst` is moved aside first and removed after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old.{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


# ----------------------------------------------------------------------------- verification (spec)

def _ops(spec):
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    return fn.opset, list(block.operations)


def _const_floats(op):
    v = op.attributes["val"]
    return list(v.immediateValue.tensor.floats.values)


def _classify_labels(op) -> list[str]:
    arg = op.inputs["classes"].arguments[0]
    return [item.immediateValue.tensor.strings.values[0] for item in arg.value.immediateValue.list.values]


def spec_checks(path: str | os.PathLike, deploy_cfg, *, precision: str = "fp16",
                minimum_deployment_target: str = DEFAULT_DEPLOYMENT_TARGET) -> dict:
    """Structural checks of a saved `.mlpackage` without loading it (works on Linux).

    Returns {"checks": {name: bool}, "op_types": {type: count}, "spec_version": int, ...}.
    """
    import math

    ct = _ct()
    m = ct.models.MLModel(str(path), skip_model_load=True)
    spec = m.get_spec()
    desc = spec.description
    _, h, w = deploy_cfg.input_size
    scale, bias = deploy_cfg.scale_bias
    checks = {}

    checks["ml_program"] = spec.WhichOneof("Type") == "mlProgram"
    inp = list(desc.input)
    img = inp[0].type.imageType if len(inp) == 1 and inp[0].type.WhichOneof("Type") == "imageType" else None
    checks["input_image_rgb"] = img is not None and inp[0].name == "image" and img.colorSpace == img.RGB
    checks["input_size"] = img is not None and (img.height, img.width) == (h, w)
    checks["outputs"] = sorted(o.name for o in desc.output) == sorted([OUTPUT_LABEL, OUTPUT_PROBS]) and \
        desc.predictedFeatureName == OUTPUT_LABEL and desc.predictedProbabilitiesName == OUTPUT_PROBS
    target = deployment_target(minimum_deployment_target)
    checks["deployment_target"] = spec.specificationVersion == target.value

    op_types: dict[str, int] = {}
    fp16_ops = 0
    labels = None
    consts = {}
    opset = None
    if checks["ml_program"]:
        opset, ops = _ops(spec)
        for op in ops:
            op_types[op.type] = op_types.get(op.type, 0) + 1
            if op.type != "const" and any(o.type.tensorType.dataType == _fp16()
                                          for o in op.outputs if o.type.WhichOneof("type") == "tensorType"):
                fp16_ops += 1
            if op.type == "classify":
                labels = _classify_labels(op)
            if op.type == "const" and op.outputs[0].name in ("image__scaled___y_0", "image__biased___y_0"):
                consts[op.outputs[0].name] = _const_floats(op)
    checks["labels"] = labels == list(deploy_cfg.class_labels)
    checks["softmax_before_classify"] = op_types.get("softmax", 0) >= 1 and op_types.get("classify", 0) == 1
    n_compute = sum(n for t, n in op_types.items() if t != "const")
    checks["precision"] = (fp16_ops > 0) if precision == "fp16" else (fp16_ops == 0)
    # Preprocessing: Core ML inserts `mul` by the scale and `add` of the bias (skipped when 1 / 0).
    got_scale = consts.get("image__scaled___y_0", [1.0])
    got_bias = consts.get("image__biased___y_0", [0.0, 0.0, 0.0])
    if len(got_bias) == 1:
        got_bias = got_bias * 3
    checks["image_scale_bias"] = (
        len(got_scale) == 1 and math.isclose(got_scale[0], scale, rel_tol=1e-6)
        and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(got_bias, bias))
    )
    return {
        "checks": checks,
        "op_types": dict(sorted(op_types.items())),
        "compute_ops": n_compute,
        "fp16_ops": fp16_ops,
        "spec_version": spec.specificationVersion,
        "opset": opset,
        "image_scale": got_scale[0] if got_scale else None,
        "image_bias": got_bias,
    }


def tensor_to_pil(x, deploy_cfg):
    """Undo the normalisation of one [3, H, W] tensor: the RGB uint8 image Core ML is given."""
    import numpy as np
    import torch
    from PIL import Image

    mean = torch.tensor(deploy_cfg.mean).view(3, 1, 1)
    std = torch.tensor(deploy_cfg.std).view(3, 1, 1)
    pix = ((x * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(pix.permute(1, 2, 0).numpy()), mode="RGB")


def load_for_predict(path: str | os.PathLike, compute_units: str = "CPU_ONLY"):
    """An MLModel ready to predict (macOS only; raises UserError elsewhere with the reason)."""
    if sys.platform != "darwin":
        raise UserError(
            f"cannot run {Path(path).name}: Core ML prediction needs macOS (coremltools on {sys.platform} "
            "has no Core ML runtime); use the spec checks, or the ExecuTorch/ONNX artifacts here"
        )
    ct = _ct()
    return ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))


def predict_probs(mlmodel, x, deploy_cfg):
    """Class probabilities [N, C] (torch, label order) for normalised images x [N, 3, H, W]."""
    import torch

    labels = deploy_cfg.class_labels
    rows = []
    for i in range(x.shape[0]):
        out = mlmodel.predict({"image": tensor_to_pil(x[i], deploy_cfg)})
        probs = out[OUTPUT_PROBS]
        rows.append([float(probs[k]) for k in labels])
    return torch.tensor(rows, dtype=torch.float32)
