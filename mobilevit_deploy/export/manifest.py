"""The manifest: `<artifact>.json` beside every artifact (schema: docs/contracts.md section 1).

It is the contract between Python, the benchmark and the iOS app, so it is built in one place
(`build_manifest`, from the ExportConfig and the loaded model) and written atomically
(`write_manifest`). Readers must ignore unknown keys.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from importlib import metadata as _metadata
from pathlib import Path

SCHEMA_VERSION = 1

# Distributions whose versions go into every manifest ("tools"); missing ones are left out.
_TOOLS = ("torch", "executorch", "torchao", "coremltools", "onnx", "onnxscript", "onnxsim", "onnxruntime", "numpy")


def manifest_path_for(artifact: str | os.PathLike) -> Path:
    """`artifacts/x.pte` -> `artifacts/x.pte.json` (also for the `.mlpackage` directory)."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def tool_versions() -> dict:
    """Installed versions of the toolchain (read from package metadata: nothing heavy is imported)."""
    out = {}
    for dist in _TOOLS:
        try:
            out[dist] = _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            pass
    from .. import __version__

    out["mobilevit_deploy"] = __version__
    out["python"] = platform.python_version()
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def input_spec(deploy_cfg, *, kind: str, name: str = "image", batch: int = 1, channel_scale=None) -> dict:
    """The manifest `input` block from a DeployCfg.

    `kind` is "image" (Core ML: a pixel buffer, normalisation baked in) or "tensor" (the caller
    normalises with mean/std). `scale`/`bias` are the Core ML ImageType form
    (y = scale * pixel(0..255) + bias); `channel_scale` is set when a per-channel std could not be
    expressed by one scalar scale and is applied inside the graph instead (exact, nothing for the
    caller to do).
    """
    scale, bias = deploy_cfg.scale_bias
    c, h, w = deploy_cfg.input_size
    spec = {
        "name": name,
        "shape": [batch, c, h, w],
        "layout": "NCHW",
        "color_layout": "RGB",
        "dtype": "float32",
        "kind": kind,
        "mean": list(deploy_cfg.mean),
        "std": list(deploy_cfg.std),
        "scale": scale,
        "bias": list(bias),
        "crop_pct": deploy_cfg.crop_pct,
        "interpolation": deploy_cfg.interpolation,
    }
    if channel_scale is not None:
        spec["channel_scale_in_graph"] = list(channel_scale)
    return spec


def output_spec(target: str, num_classes: int) -> dict:
    """The manifest `output` block: Core ML classifier probabilities, or logits."""
    if target == "coreml":
        return {"name": "classLabel_probs", "shape": [1, num_classes], "kind": "probabilities",
                "label_output": "classLabel"}
    return {"name": "logits", "shape": [1, num_classes], "kind": "logits"}


def build_manifest(config, source, artifact: dict, *, verification: dict | None = None,
                   quantization: dict | None = None, ops_not_delegated=(), timings_s: dict | None = None,
                   extra: dict | None = None) -> dict:
    """Assemble the manifest dict in the order of docs/contracts.md (extra keys go after).

    `config`: the ExportConfig (target, backend, precision); `source`: the model (`pretrained.
    LoadedModel`: name, deploy_cfg, checkpoint block); `artifact`: {"file", "sha256", "size_bytes"}.
    The input and output blocks follow from the target and the DeployCfg.
    """
    cfg = source.deploy_cfg
    coreml = config.target == "coreml"
    m = {
        "schema_version": SCHEMA_VERSION,
        "model": source.name,
        "target": config.target,
        "backend": config.backend,
        "precision": config.precision,
        "quantization": quantization,
        "input": input_spec(cfg, kind="image" if coreml else "tensor",
                            channel_scale=cfg.channel_scale if coreml else None),
        "output": output_spec(config.target, cfg.num_classes),
        "labels": list(cfg.class_labels),
        "checkpoint": source.checkpoint,
        "artifact": {"file": artifact["file"], "sha256": artifact["sha256"], "size_bytes": int(artifact["size_bytes"])},
        "verification": verification,
        "ops_not_delegated": list(ops_not_delegated or []),
        "tools": tool_versions(),
        "created": utc_now(),
        "deploy_cfg": cfg.to_dict(),
        "timings_s": dict(timings_s or {}),
    }
    size = getattr(config, "size", None)
    h, w = cfg.image_size
    # the exported graph's input size and where it came from (export --size, else the weights' DeployCfg)
    m["input"]["size"] = {"height": h, "width": w, "from": "--size" if size is not None else "deploy_cfg",
                          "weights_deploy_size": list((source.meta or {}).get("weights_deploy_size") or (h, w))}
    if extra:
        m.update(extra)
    return m


def jsonable(x):
    """Plain JSON: non-finite floats become null (JSON has no Infinity; Swift's decoder rejects it)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return jsonable(x.item())
    return x


def write_manifest(path: str | os.PathLike, manifest: dict) -> Path:
    """Write `manifest` as indented JSON to `path` atomically (temporary file + rename)."""
    from ..checkpoint import atomic_write

    text = json.dumps(jsonable(manifest), indent=2, allow_nan=False) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def read_manifest(path: str | os.PathLike) -> dict:
    """Read a manifest; `path` may be the artifact or its `.json`."""
    from ..errors import UserError

    p = Path(path)
    if not p.name.endswith(".json"):
        p = manifest_path_for(p)
    if not p.is_file():
        raise UserError(f"manifest not found: {p}")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read manifest {p}: {e}") from e
    if not isinstance(m, dict) or m.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{p} is not a schema_version {SCHEMA_VERSION} manifest")
    return m
