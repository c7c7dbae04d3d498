"""Model options (constructor kwargs) from the command line and from a checkpoint's JSON.

`--model-arg KEY=VALUE` (repeatable) on export / evaluate / bench: VALUE is parsed as YAML
(`keep_rate=0.7`, `keep_layers=[3,6,9]`, `gather=topk`, `token_reduction=dynamicvit`). A trained
checkpoint's sibling JSON (`DIR/model.safetensors` -> `DIR/model.json`, written by the trainer) records
the options it was trained with under `model_kwargs` (e.g. `img_size`, `patch_size`, the DynamicViT /
Patch Slimming settings); `create_model(name, checkpoint=...)` applies them, explicit options win.
The models validate the values themselves (a keep rate outside (0, 1], an option the model does not
take: one UserError line naming the allowed values).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError

__all__ = ["parse_model_args", "recorded_model_kwargs"]


def parse_model_args(items: Sequence[str] | None) -> dict:
    """["keep_rate=0.7", "keep_layers=[3,6,9]"] -> {"keep_rate": 0.7, "keep_layers": [3, 6, 9]} (YAML values)."""
    import yaml

    out: dict = {}
    for item in items or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"--model-arg expects KEY=VALUE (e.g. keep_rate=0.7), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--model-arg {key}: cannot parse {raw!r} (a YAML value: 0.7, [3, 6, 9], topk)") from None
        if key in out:
            raise UserError(f"--model-arg {key} given twice")
        out[key] = value
    return out


def recorded_model_kwargs(checkpoint: str | os.PathLike) -> dict:
    """`model_kwargs` of a checkpoint's sibling JSON (`<ckpt>.json` or `<stem>.json`), {} when there is none."""
    p = Path(checkpoint)
    for meta in (p.with_name(p.name + ".json"), p.with_suffix(".json")):
        if meta.is_file() and meta != p:
            try:
                d = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(d, dict) and isinstance(d.get("model_kwargs"), dict):
                return dict(d["model_kwargs"])
    return {}
