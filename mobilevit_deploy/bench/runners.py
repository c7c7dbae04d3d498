"""Host runners: one inference on a fixed input, per target, with an explicit thread count.

Every runner is built from an artifact path (or an `nn.Module` for eager) and binds its input once
(`runtime.Runner.bind`), so a timed call is the runtime's own inference call and nothing else (no
tensor conversion):
- eager:      `model(x)` under `torch.inference_mode()`, `torch.set_num_threads(n)`;
- executorch: `executorch.runtime` Method.execute([x]) (XNNPACK delegate), threadpool reset to n;
- onnx:       ONNX Runtime `InferenceSession.run` on the CPU provider, intra-op threads n,
              inter-op 1, sequential execution, all graph optimisations (ORT's defaults otherwise);
- coreml:     coremltools `MLModel.predict` (macOS only; skipped elsewhere with the reason).
The artifacts are loaded by `mobilevit_deploy.runtime.load_artifact`. `BoundCall.threads` records the
thread count the runtime reports back where it can (ExecuTorch's threadpool, torch), or the count it
was configured with (ONNX Runtime, Core ML).

`make_artifact` is the one place that produces artifacts: it calls
`mobilevit_deploy.export.export_model`; a caller (tests) may pass another factory with its signature.
"""
from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import artifact_size, state_dict_sha256
from ..errors import UserError

TARGETS = ("eager", "executorch", "onnx", "coreml")
QUANTS = ("fp32", "int8")
EXTENSIONS = {"executorch": ".pte", "onnx": ".onnx", "coreml": ".mlpackage"}
# bench --compute-units names -> coremltools.ComputeUnit names
COMPUTE_UNITS = {"all": "ALL", "cpuOnly": "CPU_ONLY", "cpuAndGPU": "CPU_AND_GPU", "cpuAndNeuralEngine": "CPU_AND_NE"}


class SkipRow(Exception):
    """A row that cannot run here; the message is the reason printed in the report."""


@dataclass
class BoundCall:
    """One row's inference bound to the bench input: `fn()` is timed, `output()` checked."""

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
        from ..export import ExportConfig, ModelSource, export_model
    except ImportError as e:
        raise SkipRow(f"export stage not available ({e})") from None
    try:
        config = ExportConfig.from_dict({"target": target, "quant": None if quant == "fp32" else quant,
                                         "verify": False})
        res = export_model(ModelSource(model_name, deploy_cfg=deploy_cfg, module=model), config, out_dir=str(out_dir),
                           log=lambda s: print(f"  export: {s}", file=sys.stderr))
    except (UserError, NotImplementedError) as e:
        raise SkipRow(f"export {target} {quant}: {e}") from None
    return Path(res.artifact), dict(res.manifest)


def set_torch_threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def eager_runner(model, x, num_threads: int, quant: str = "fp32") -> BoundCall:
    import torch

    if quant != "fp32":
        raise SkipRow(f"eager {quant} is not a deployment runtime (torchao's eager int8 is a simulation); "
                      "the int8 rows are the exported artifacts")
    threads = set_torch_threads(num_threads)
    model = model.eval()

    def fn():
        with torch.inference_mode():
            return model(x)

    return BoundCall("eager", quant, fn, fn, threads, info={"runtime": f"torch {torch.__version__}"})


def executorch_runner(path, x, num_threads: int, quant: str = "fp32") -> BoundCall:
    return artifact_runner("executorch", path, x, num_threads, quant)


def onnx_runner(path, x, num_threads: int, quant: str = "fp32") -> BoundCall:
    return artifact_runner("onnx", path, x, num_threads, quant)


def coreml_unavailable_reason() -> str | None:
    """Why Core ML cannot be timed here, or None on macOS."""
    if platform.system() != "Darwin":
        return ("Core ML prediction runs only on macOS (coremltools: 'Model prediction is only supported on "
                "macOS'); the macOS workflow and the iOS app's device reports give Core ML numbers")
    return None


def _runtime_info(target: str, compute_units: str) -> dict:
    import importlib.metadata as md

    if target == "executorch":
        return {"runtime": f"executorch {md.version('executorch')} (xnnpack)"}
    if target == "onnx":
        return {"runtime": f"onnxruntime {md.version('onnxruntime')} (CPUExecutionProvider)"}
    return {"runtime": f"coremltools {md.version('coremltools')} predict", "compute_units": compute_units}


def artifact_runner(target: str, path, x, num_threads: int, quant: str, manifest: dict | None = None,
                    compute_units: str = "cpuOnly") -> BoundCall:
    """The artifact at `path` loaded by `runtime.load_artifact` with `num_threads`, bound to `x`.
    (`manifest`: unused, the runtime reads the one beside the artifact.)"""
    if target not in EXTENSIONS:
        raise UserError(f"unknown target {target!r} (choose from: {', '.join(TARGETS)})")
    if target == "coreml" and coreml_unavailable_reason():
        raise SkipRow(coreml_unavailable_reason())
    from ..runtime import load_artifact

    try:
        runner = load_artifact(path, num_threads, compute_units=COMPUTE_UNITS[compute_units])
    except ImportError as e:
        raise SkipRow(f"{target} runtime not importable ({e})") from None
    bound = runner.bind(x)
    threads = runner.num_threads if runner.num_threads is not None else num_threads
    return BoundCall(target, quant, bound.call, bound.output, threads, Path(path), artifact_size(path),
                     info=_runtime_info(target, compute_units))
