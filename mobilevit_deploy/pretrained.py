"""Weights shipped inside the package (trained by this project's CPU recipe), and their metadata.

`assets/weights/<model>_<tag>.safetensors` (fp16) with `<same stem>.json`:
{"model", "recipe", "data", "epochs", "val_top1", "sha256" (of the .safetensors), "deploy_cfg"}.
`deploy_cfg` (a DeployCfg dict) is the source of truth for the input size, normalisation and labels
the weights were trained with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .models._cfg import DeployCfg

WEIGHTS_DIR = Path(__file__).parent / "assets" / "weights"


@dataclass(frozen=True)
class ShippedWeights:
    model: str
    path: Path
    meta: dict

    @property
    def deploy_cfg(self) -> DeployCfg:
        return DeployCfg.from_dict(self.meta["deploy_cfg"])


def shipped_weights(model: str) -> ShippedWeights | None:
    """The default weights shipped for `model`, or None (the model is then untrained)."""
    for meta_path in sorted(WEIGHTS_DIR.glob(f"{model}_*.json")):
        meta = json.loads(meta_path.read_text())
        path = meta_path.with_suffix(".safetensors")
        if meta.get("model") == model and path.is_file():
            return ShippedWeights(model, path, meta)
    return None


def create_default_model(model: str):
    """`create_model` with the shipped weights when there are some: (model, ShippedWeights | None)."""
    from .models import create_model

    sw = shipped_weights(model)
    if sw is None:
        return create_model(model), None
    return create_model(model, checkpoint=str(sw.path), deploy_cfg=sw.deploy_cfg), sw
