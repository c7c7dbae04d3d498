"""Model registry: `@register_model` on a constructor, `create_model(name)`, `list_models()`.

A constructor takes `num_classes` (and architecture kwargs) and returns an `nn.Module` carrying
`model.deploy_cfg` (a DeployCfg). `create_model` adds checkpoint loading and label overrides.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import UserError, choices_error
from ._cfg import DeployCfg

_MODELS: dict[str, Callable] = {}
_DEFAULT_CFGS: dict[str, DeployCfg] = {}


def register_model(fn: Callable = None, *, cfg: DeployCfg | None = None):
    """Register a constructor under its function name, with its default DeployCfg."""

    def wrap(f):
        _MODELS[f.__name__] = f
        _DEFAULT_CFGS[f.__name__] = cfg or DeployCfg()
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_loaded():
    # Importing the architecture files runs their @register_model decorators.
    from . import augvit, cmt, deit, mobilevit, tnt  # noqa: F401


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)


def get_deploy_cfg(name: str, num_classes: int | None = None, labels: Sequence[str] | None = None) -> DeployCfg:
    _ensure_loaded()
    if name not in _MODELS:
        raise choices_error("model", name, sorted(_MODELS))
    cfg = _DEFAULT_CFGS[name]
    if num_classes is not None or labels:
        cfg = cfg.with_classes(num_classes if num_classes is not None else len(labels), labels)
    return cfg


def create_model(
    name: str,
    num_classes: int | None = None,
    checkpoint: str | None = None,
    labels: Sequence[str] | None = None,
    deploy_cfg: DeployCfg | None = None,
    **kwargs,
):
    """Build a registered model; optionally load `checkpoint` (.safetensors or .pt, weights_only).

    The returned module is in eval mode and has `.deploy_cfg`. Raises `UserError` for an unknown
    name and `CheckpointError` for a checkpoint that is missing or does not match.
    """
    _ensure_loaded()  # also when deploy_cfg is given (get_deploy_cfg would otherwise load the registry)
    cfg = deploy_cfg or get_deploy_cfg(name, num_classes, labels)
    if name not in _MODELS:
        raise choices_error("model", name, sorted(_MODELS))
    if checkpoint is not None:  # options the weights were trained with (checkpoint JSON `model_kwargs`); explicit win
        from .options import recorded_model_kwargs

        kwargs = {**recorded_model_kwargs(checkpoint), **kwargs}
    try:
        model = _MODELS[name](num_classes=cfg.num_classes, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        bad = str(e).split("unexpected keyword argument")[-1].strip(" '\"")
        raise UserError(f"{name} has no option {bad!r} (token reduction, keep_rate / keep_layers: deit_* and "
                        f"augvit_* models)") from e
    size = tuple(cfg.input_size[1:])
    if "img_size" not in kwargs and hasattr(model, "set_input_size") and tuple(model.img_size) != size:
        # Parameters tied to the input size (CMT's relative position biases): build them for the
        # DeployCfg's size, so weights trained at that size (e.g. a 64 px CPU recipe) load.
        model.set_input_size(size)
    model.deploy_cfg = cfg
    if checkpoint is not None:
        from ..checkpoint import load_checkpoint
        from ..prune.record import apply_recorded_architecture

        # Pruned checkpoints (python -m mobilevit_deploy.prune): when the checkpoint's sibling JSON
        # (model.safetensors -> model.json) holds an `architecture` record, shrink the standard model
        # to it first, so the smaller weights load. A no-op for every other checkpoint.
        apply_recorded_architecture(model, checkpoint, name)
        load_checkpoint(model, checkpoint)
    return model.eval()
