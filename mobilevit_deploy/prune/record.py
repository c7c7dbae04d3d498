"""The architecture record of a pruned model: a JSON-able dict stored under `architecture` in the
checkpoint's sibling JSON (`DIR/model.safetensors` -> `DIR/model.json`), from which
`create_model(name, checkpoint="DIR/model.safetensors")` rebuilds the pruned model.

    {"format": "mobilevit_deploy.prune/1", "model": "mobilevit_xxs",
     "sequential": {"stages.3.1.transformer": [0, 2, 3]},       # kept layers (original indices)
     "modules": {"stages.1.0.conv1_1x1.conv": {"type": "Conv2d", "in_channels": 16, "out_channels": 24,
                                              "groups": 1}, ...},   # every module whose shape changed
     "attrs": {"stages.2.1.transformer.0.attn": {"num_heads": 3, "head_dim": 16, "scale": 0.25}, ...},
     "replaced": {"stages.3.1.transformer.1.attn": {"type": "ConvAttention", "dim": 80, "num_heads": 4,
                                                    "head_dim": 20, "kernel_size": 3, "bias": true}},
     "summary": {...}}                                              # per-block widths, for people

`replaced` (spvit) names modules of another type than the standard model's at that path (paths after
the layer removal), built from their spec (prune/modules.py) before the recorded shapes are applied.

The record is generic (per-module shapes and attributes, relative to the standard model of the same
name): `apply_architecture(model, record)` removes the recorded layers, shrinks each recorded module
to its recorded shape and sets the recorded attributes; the weights loaded next fill in the values.
Attention modules always record `scale`, so the softmax temperature of the unpruned model survives
a rebuild even when heads were removed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

FORMAT = "mobilevit_deploy.prune/1"
_ATTRS = ("num_heads", "head_dim", "scale")
_SHAPED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)


def _shape(m: nn.Module) -> dict:
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features}
    if isinstance(m, nn.BatchNorm2d):
        return {"type": "BatchNorm2d", "num_features": m.num_features}
    if isinstance(m, nn.LayerNorm):
        return {"type": "LayerNorm", "normalized_shape": list(m.normalized_shape)}
    raise TypeError(type(m).__name__)


def _kept_layers(model: nn.Module) -> dict[str, list[int]]:
    return {p: list(m._prune_kept) for p, m in model.named_modules()
            if isinstance(m, nn.Sequential) and getattr(m, "_prune_kept", None) is not None}


def _standard(name: str, model: nn.Module):
    from ..models import create_model

    cfg = getattr(model, "deploy_cfg", None)
    return create_model(name, deploy_cfg=cfg) if cfg is not None else create_model(name)


def _remove_layers(model: nn.Module, sequential: dict) -> None:
    from ..errors import CheckpointError

    for path, keep in sequential.items():
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            seq = getattr(parent, attr)
        except AttributeError:
            raise CheckpointError(f"architecture record: no module {path!r} in {type(model).__name__}") from None
        if not isinstance(seq, nn.Sequential) or any(not 0 <= int(i) < len(seq) for i in keep) or not keep:
            raise CheckpointError(f"architecture record: cannot keep layers {keep} of {path!r}")
        new = nn.Sequential(*[seq[int(i)] for i in keep])
        new._prune_kept = [int(i) for i in keep]
        setattr(parent, attr, new)


def _replaced(model: nn.Module) -> dict:
    from .modules import is_conv_attention

    return {p: m.spec() for p, m in model.named_modules() if is_conv_attention(m)}


def _replace_modules(model: nn.Module, replaced: dict) -> None:
    from ..errors import CheckpointError
    from .modules import ConvAttention

    for path, spec in replaced.items():
        if not isinstance(spec, dict) or spec.get("type") != "ConvAttention":
            raise CheckpointError(f"architecture record: cannot build {spec!r} at {path!r}")
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            getattr(parent, attr)
            mod = ConvAttention.from_spec(spec)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise CheckpointError(f"architecture record: cannot replace {path!r} by {spec}") from None
        setattr(parent, attr, mod)


def summary(model: nn.Module) -> dict:
    """Per-block widths: {"mv2_hidden": {path: n}, "vit": {path: {"width", "layers": [...]}}}."""
    from .structures import is_mobilevit_block, is_mv2

    mv2, vit = {}, {}
    for path, m in model.named_modules():
        if is_mv2(m):
            mv2[path] = m.conv1_1x1.conv.out_channels
        elif is_mobilevit_block(m):
            kept = list(getattr(m.transformer, "_prune_kept", range(len(m.transformer))))
            vit[path] = {"width": m.conv_1x1.out_channels, "kept_layers": kept,
                         "layers": [{"heads": t.attn.num_heads, "head_dim": t.attn.head_dim,
                                     "mlp_hidden": t.mlp.fc1.out_features,
                                     **({"attention": "conv"} if getattr(t.attn, "is_conv_attention", False)
                                        else {})} for t in m.transformer]}
    return {"mv2_hidden": mv2, "vit": vit}


def architecture_of(model: nn.Module, name: str) -> dict:
    """The record of `model` relative to the standard `name` (see the module docstring)."""
    std = _standard(name, model)
    sequential = _kept_layers(model)
    _remove_layers(std, sequential)
    replaced = _replaced(model)
    _replace_modules(std, replaced)
    std_mods = dict(std.named_modules())
    modules, attrs = {}, {}
    for path, m in model.named_modules():
        s = std_mods.get(path)
        if s is None or (isinstance(m, _SHAPED) and type(s) is not type(m)):
            raise ValueError(f"architecture_of: {path} ({type(m).__name__}) has no counterpart in the standard {name}")
        if isinstance(m, _SHAPED) and _shape(m) != _shape(s):
            modules[path] = _shape(m)
        own = {a: getattr(m, a) for a in _ATTRS if isinstance(getattr(m, a, None), (int, float))}
        if "scale" in own or any(own[a] != getattr(s, a, None) for a in own):
            attrs[path] = {a: (float(v) if a == "scale" else int(v)) for a, v in own.items()}
    rec = {"format": FORMAT, "model": name, "sequential": sequential, "modules": modules, "attrs": attrs}
    if replaced:
        rec["replaced"] = replaced
    rec["summary"] = summary(model)
    return rec


def apply_architecture(model: nn.Module, record: dict, name: str | None = None) -> nn.Module:
    """Shrink the standard `model` (in place) to the recorded architecture; returns it.

    Raises CheckpointError when the record is malformed, is for another model than `name`, or does
    not fit the model's modules."""
    from ..errors import CheckpointError
    from .surgery import resize_module

    if not isinstance(record, dict) or record.get("format") != FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"unknown architecture record format {got!r} (expected {FORMAT!r})")
    if name is not None and record.get("model") not in (None, name):
        raise CheckpointError(f"the checkpoint is a pruned {record['model']}, not {name} "
                              f"(pass --model {record['model']})")
    _remove_layers(model, record.get("sequential", {}))
    _replace_modules(model, record.get("replaced", {}))
    for path, spec in record.get("modules", {}).items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"architecture record: no module {path!r} in {type(model).__name__}") from None
        if type(mod).__name__ != spec.get("type"):
            raise CheckpointError(f"architecture record: {path} is a {type(mod).__name__}, "
                                  f"record says {spec.get('type')}")
        try:
            resize_module(mod, spec)
        except (ValueError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"architecture record: cannot resize {path} to {spec}: {e}") from None
    for path, values in record.get("attrs", {}).items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"architecture record: no module {path!r} in {type(model).__name__}") from None
        for a, v in values.items():
            if a not in _ATTRS:
                raise CheckpointError(f"architecture record: attribute {a!r} of {path} is not one of {_ATTRS}")
            setattr(mod, a, v)
    model.architecture = record
    return model


def sibling_jsons(checkpoint: str | os.PathLike) -> list[Path]:
    """Where a checkpoint's JSON may be: `model.safetensors` -> `model.json` (evaluate.sibling_json),
    then `model.safetensors.json` (pretrained.checkpoint_metadata also looks there)."""
    p = Path(checkpoint)
    return [p.with_suffix(".json"), p.with_name(p.name + ".json")]


def recorded_architecture(checkpoint: str | os.PathLike) -> dict | None:
    """The `architecture` of a checkpoint's sibling JSON, or None (a standard checkpoint)."""
    for j in sibling_jsons(checkpoint):
        if j.is_file() and j != Path(checkpoint):
            try:
                meta = json.loads(j.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and "architecture" in meta:
                return meta["architecture"]
    return None


def apply_recorded_architecture(model: nn.Module, checkpoint: str | os.PathLike, name: str | None = None) -> bool:
    """The hook of `create_model`: shrink `model` to the architecture recorded beside `checkpoint`
    (if there is one) before the checkpoint is loaded. True when a record was applied."""
    record = recorded_architecture(checkpoint)
    if record is None:
        return False
    apply_architecture(model, record, name)
    return True
