"""Export: one `torch.export` capture -> Core ML `.mlpackage`, ExecuTorch `.pte` or `.onnx`, verified.

    from mobilevit_deploy.export import ExportConfig, export_model
    res = export_model("mobilevit_xxs", ExportConfig(target="executorch"), out_dir="artifacts")
    res.artifact, res.manifest_path, res.manifest["verification"]

`export_model(source, config)`: `source` is a registered name (its shipped weights, else untrained),
a `pretrained.ModelSource` (name + checkpoint / num_classes / deploy_cfg, or an nn.Module) or an
already `LoadedModel`; `config` an `ExportConfig` (or its dict form). The work is the stages of
`stages.py` in their declared order (capture -> quantize -> lower -> compress -> verify -> write),
on a staging directory inside `out_dir`; nothing is left behind when a stage fails. Importing this
package imports neither torch's exporters nor coremltools, executorch, onnx or onnxruntime.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..pretrained import LoadedModel, ModelSource
from .config import BACKENDS, PRECISIONS, TARGETS, ExportConfig, artifact_path

__all__ = ["export_model", "ExportResult", "ExportConfig", "ModelSource", "TARGETS", "BACKENDS", "PRECISIONS",
           "artifact_path"]


@dataclass
class ExportResult:
    artifact: Path
    manifest_path: Path
    manifest: dict
    # a quantized export: the QuantizedModel the artifact was built from; None for float exports
    quantized: object = None
    # the torch-side module with the artifact's numerics (the fp32 model for a float export; for the
    # Core ML weight schemes the module holding the compressed weights)
    reference: object = None

    @property
    def verification(self) -> dict | None:
        return self.manifest.get("verification")


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


_SOURCE_KEYS = ("model", "checkpoint", "num_classes", "deploy_cfg")


def _earlier_form(name, target: str, options: dict):
    """`export_model(name, "onnx", model=module, deploy_cfg=..., verify=False, quant=..., ...)`, the
    earlier keyword form: (ModelSource, ExportConfig)."""
    src = {k: options.pop(k) for k in _SOURCE_KEYS if k in options}
    source = ModelSource(name, src.get("checkpoint"), src.get("num_classes"), src.get("deploy_cfg"),
                         module=src.get("model"))
    return source, ExportConfig.from_dict({"target": target, **options})


def export_model(source, config: ExportConfig | dict | str, *, out_dir="artifacts",
                 log: Callable[[str], None] | None = print, **options) -> ExportResult:
    """Export one model to one target, verify it, and write the artifact and its manifest.

    `source`: a registered model name, a `ModelSource`, a `LoadedModel` or an nn.Module with a
    `.deploy_cfg`; `config`: an `ExportConfig` or its dict form. Raises UserError (CheckpointError,
    DataError) for bad input before anything is written: the config is validated, the calibration
    images listed and the output directory checked before the model is loaded and the stages run.
    (`config` may also be a target name with the options of `ExportConfig.from_dict` and `model=` /
    `checkpoint=` / `num_classes=` / `deploy_cfg=` as keywords: the earlier signature, kept for the
    callers not moved yet.)
    """
    from .stages import ExportPipeline

    log = log or (lambda s: None)
    started = time.perf_counter()
    if isinstance(config, str):
        source, config = _earlier_form(source, config, options)
    elif options:
        raise UserError(f"unexpected options {', '.join(sorted(options))}: they belong in the ExportConfig")
    config = ExportConfig.from_dict(config) if isinstance(config, dict) else config
    if not isinstance(config, ExportConfig):
        raise UserError(f"config must be an ExportConfig, got {type(config).__name__}")
    calib = config.quant.calibration_set() if config.quant is not None else None  # a bad folder fails here
    if isinstance(source, str):
        source = ModelSource(source)
    elif not isinstance(source, (ModelSource, LoadedModel)):
        source = ModelSource(None, module=source)  # an nn.Module with a .deploy_cfg
    out, created_out = _check_out_dir(out_dir)
    try:
        t = time.perf_counter()
        loaded = source if isinstance(source, LoadedModel) else source.load(log)
        if config.size is not None:
            from .size import with_input_size

            loaded = with_input_size(loaded, config.size, log)
        timings = {"load_model": time.perf_counter() - t}
        with ExportPipeline(loaded, config, out, calib=calib, log=log, timings=timings, started=started) as pipe:
            written = pipe.run()
        compressed = written.verified.compressed
        return ExportResult(written.artifact, written.manifest_path, written.manifest,
                            quantized=compressed.lowered.quantized.quantized, reference=compressed.reference)
    except BaseException:
        if created_out:
            _rmdir_quiet(out)  # only if empty: never removes anything but the directory we made
        raise
