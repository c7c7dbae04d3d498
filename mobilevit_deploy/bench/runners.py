"""Host runners: one inference on a fixed input, per target, with an explicit thread count.

Every runner is built from an artifact path (or an `nn.Module` for eager) and binds its input once,
so a timed call is the runtime's own inference call and nothing else (no tensor conversion):
- eager:      `model(x)` under `torch.inference_mode()`, `torch.set_num_threads(n)`;
- executorch: `executorch.runtime` Method.execute([x]) (XNNPACK delegate), threadpool reset to n;
- onnx:       ONNX Runtime `InferenceSession.run` on the CPU provider, intra-op threads n,
              inter-op 1, sequential execution, all graph optimisations (ORT's defaults otherwise);
- coreml:     coremltools `MLModel.predict` (macOS only; skipped elsewhere with the reason).
`runner.threads` records the thread count the runtime reports back where it can (ExecuTorch's
threadpool, torch), or the count it was configured with (ONNX Runtime, Core ML).

`make_artifact` is the one place that produces artifacts: it calls
`mobilevit_deploy.export.export_model`; a caller (tests) may pass another factory with its signature.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError

TARGETS = ("eager", "executorch", "onnx", "coreml")
QUANTS = ("fp32", "int8")
EXTENSIONS = {"executorch": ".pte", "onnx": ".onnx", "coreml": ".mlpackage"}


class SkipRow(Exception):
    """A row that cannot run here; the message is the reason printed in the report."""


@dataclass
class Runner:
    target: str
    quant: str
    fn: Callable[[], Any]  # one inference on the bound input
    output: Callable[[], Any]  # one inference, returning logits as a float32 torch.Tensor [N, classes]
    threads: int
    artifact: Path | None = None
    artifact_bytes: int | None = None
    info: dict = field(default_factory=dict)

    def __call__(self):
        return self.fn()


def artifact_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_dir():  # .mlpackage
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def state_dict_sha256(model) -> str:
    """sha256 over the sorted state dict (the export manifest's checkpoint hash for an nn.Module)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def find_reusable(out_dir, model, deploy_cfg, quant: str, target: str) -> tuple[Path, dict] | None:
    """An artifact already in `out_dir` whose manifest matches this model's weights, input and quant."""
    import json

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    sha = state_dict_sha256(model)
    for mpath in sorted(out_dir.glob("*.json")):
        try:
            m = json.loads(mpath.read_text())
        except (OSError, ValueError):
            continue
        art = out_dir / m.get("artifact", {}).get("file", "")
        q = (m.get("quantization") or {}).get("scheme", "fp32")
        if (art.exists() and art != out_dir and m.get("target") == target and m.get("backend") != "coreml"
                and m.get("checkpoint", {}).get("sha256") == sha and q == quant
                and m.get("input", {}).get("shape", [])[2:] == list(deploy_cfg.image_size)):
            return art, m
    return None


def make_artifact(model_name: str, target: str, quant: str, out_dir: str | os.PathLike, *, model=None,
                  deploy_cfg=None, reuse: bool = False) -> tuple[Path, dict]:
    """Export `model` (or the registered `model_name`) to `target` at `quant`: (artifact path, manifest).

    With `reuse`, an artifact already in `out_dir` with the same weights, input size and quant is used
    instead (only for iterating on the benchmark itself: a change to the exporter is then not seen).
    Raises SkipRow when the export stage cannot produce this combination (with its reason).
    """
    import sys

    if reuse and model is not None:
        found = find_reusable(out_dir, model, deploy_cfg, quant, target)
        if found is not None:
            return found
    try:
        from ..export import export_model
    except ImportError as e:
        raise SkipRow(f"export stage not available ({e})") from None
    try:
        res = export_model(model_name, target, out_dir=str(out_dir), quant=None if quant == "fp32" else quant,
                           model=model, deploy_cfg=deploy_cfg, verify=False,
                           log=lambda s: print(f"  export: {s}", file=sys.stderr))
    except (UserError, NotImplementedError) as e:
        raise SkipRow(f"export {target} {quant}: {e}") from None
    return Path(res.artifact), dict(res.manifest)


def set_torch_threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def eager_runner(model, x, num_threads: int, quant: str = "fp32") -> Runner:
    import torch

    if quant != "fp32":
        raise SkipRow(f"eager {quant} is not a deployment runtime (torchao's eager int8 is a simulation); "
                      "the int8 rows are the exported artifacts")
    threads = set_torch_threads(num_threads)
    model = model.eval()

    def fn():
        with torch.inference_mode():
            return model(x)

    return Runner("eager", quant, fn, fn, threads, info={"runtime": f"torch {torch.__version__}"})


def executorch_runner(path, x, num_threads: int, quant: str = "fp32") -> Runner:
    try:
        import executorch.extension.pybindings.portable_lib as et_lib
        from executorch.runtime import Runtime
    except ImportError as e:
        raise SkipRow(f"executorch runtime not importable ({e})") from None
    et_lib._unsafe_reset_threadpool(num_threads)
    threads = int(et_lib._threadpool_get_thread_count())
    method = Runtime.get().load_program(str(path)).load_method("forward")
    args = [x.contiguous()]

    def fn():
        return method.execute(args)

    def output():
        return method.execute(args)[0].clone()

    import importlib.metadata as md

    return Runner("executorch", quant, fn, output, threads, Path(path), artifact_size(path),
                  info={"runtime": f"executorch {md.version('executorch')} (xnnpack)"})


def onnx_runner(path, x, num_threads: int, quant: str = "fp32") -> Runner:
    import torch

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise SkipRow(f"onnxruntime not importable ({e})") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = num_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.contiguous().numpy()}

    def fn():
        return sess.run(None, feed)

    def output():
        return torch.from_numpy(sess.run(None, feed)[0].copy())

    return Runner("onnx", quant, fn, output, num_threads, Path(path), artifact_size(path),
                  info={"runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)"})


def coreml_unavailable_reason() -> str | None:
    """Why Core ML cannot be timed here, or None on macOS."""
    if platform.system() != "Darwin":
        return ("Core ML prediction runs only on macOS (coremltools: 'Model prediction is only supported on "
                "macOS'); the macOS workflow and the iOS app's device reports give Core ML numbers")
    return None


def coreml_runner(path, x, num_threads: int, quant: str = "fp32", manifest: dict | None = None,
                  compute_units: str = "cpuOnly") -> Runner:
    """Core ML through coremltools' predict (macOS only). `x` is the normalised tensor; an image input
    gets the same pixels back as a PIL image (the model's ImageType applies the normalisation)."""
    reason = coreml_unavailable_reason()
    if reason:
        raise SkipRow(reason)
    import numpy as np
    import torch
    import coremltools as ct

    units = {"all": ct.ComputeUnit.ALL, "cpuOnly": ct.ComputeUnit.CPU_ONLY, "cpuAndGPU": ct.ComputeUnit.CPU_AND_GPU,
             "cpuAndNeuralEngine": ct.ComputeUnit.CPU_AND_NE}[compute_units]
    mlmodel = ct.models.MLModel(str(path), compute_units=units)
    spec_in = mlmodel.get_spec().description.input[0]
    name = spec_in.name
    inp = (manifest or {}).get("input", {})
    if spec_in.type.WhichOneof("Type") == "imageType":
        from PIL import Image

        mean = torch.tensor(inp.get("mean", [0.0, 0.0, 0.0])).view(3, 1, 1)
        std = torch.tensor(inp.get("std", [1.0, 1.0, 1.0])).view(3, 1, 1)
        pixels = ((x[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        feed = {name: Image.fromarray(pixels, "RGB")}
    else:
        feed = {name: x.numpy()}
    out_name = (manifest or {}).get("output", {}).get("name")

    def fn():
        return mlmodel.predict(feed)

    def output():
        res = mlmodel.predict(feed)
        v = res[out_name] if out_name in res else next(iter(res.values()))
        if isinstance(v, dict):  # classifier probabilities {label: p}: in the manifest's label order
            labels = (manifest or {}).get("labels") or list(v)
            v = [v[k] for k in labels]
        return torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(1, -1)

    return Runner("coreml", quant, fn, output, num_threads, Path(path), artifact_size(path),
                  info={"runtime": f"coremltools {ct.__version__} predict", "compute_units": compute_units})


def artifact_runner(target: str, path, x, num_threads: int, quant: str, manifest: dict | None = None,
                    compute_units: str = "cpuOnly") -> Runner:
    if target == "executorch":
        return executorch_runner(path, x, num_threads, quant)
    if target == "onnx":
        return onnx_runner(path, x, num_threads, quant)
    if target == "coreml":
        return coreml_runner(path, x, num_threads, quant, manifest, compute_units)
    raise UserError(f"unknown target {target!r} (choose from: {', '.join(TARGETS)})")
