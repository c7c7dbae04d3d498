"""Loading a model with its weights: a checkpoint, the weights shipped in the package, or untrained.

`load_model(name, checkpoint=None, num_classes=None, deploy_cfg=None)` (or `ModelSource(...).load()`)
is the one place that turns "which model, which weights" into an nn.Module and the facts the
export manifest, the benchmark and the studies record about it (`LoadedModel`).

Shipped weights: `assets/weights/<model>_<tag>.safetensors` (fp16) with `<same stem>.json`:
{"model", "recipe", "data", "epochs", "val_top1", "sha256" (of the .safetensors), "deploy_cfg"}.
`deploy_cfg` (a DeployCfg dict) is the source of truth for the input size, normalisation and labels
the weights were trained with. A checkpoint may carry one the same way (`<ckpt>.json` or
`<stem>.json` beside it, or a "deploy_cfg" JSON string in the safetensors metadata).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, UserError, choices_error
from .models._cfg import DeployCfg

WEIGHTS_DIR = Path(__file__).parent / "assets" / "weights"
_REPO = Path(__file__).resolve().parents[1]

__all__ = ["ShippedWeights", "shipped_weights", "create_default_model", "ModelSource", "LoadedModel", "load_model",
           "checkpoint_metadata"]


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


def checkpoint_metadata(path: str | os.PathLike) -> tuple[dict, Path] | None:
    """The metadata stored with a checkpoint: (dict with "deploy_cfg", where it was found) from
    `<ckpt>.json` / `<stem>.json` beside it, or the safetensors metadata (a JSON string under
    "deploy_cfg"). None when there is none."""
    path = Path(path)
    for meta in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if meta.is_file():
            try:
                d = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(d, dict) and isinstance(d.get("deploy_cfg"), dict):
                return d, meta
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
            if "deploy_cfg" in md:
                return {"deploy_cfg": json.loads(md["deploy_cfg"])}, path
        except Exception:
            pass
    return None


def _repo_relative(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(_REPO))
    except ValueError:
        return str(p)


def _size(cfg: DeployCfg) -> str:
    return f"input {cfg.input_size[1]}x{cfg.input_size[2]}"


@dataclass
class LoadedModel:
    """A model ready to export or measure, and what is known about its weights."""

    module: object  # nn.Module in eval mode, with `.deploy_cfg`
    name: str
    deploy_cfg: DeployCfg
    checkpoint: dict  # the manifest's `checkpoint` block: {"path", "sha256", ...}
    meta: dict = field(default_factory=dict)  # shipped weights' / checkpoint's JSON (val_top1, data, ...)
    source: str = ""  # "shipped <file>", "checkpoint <path>", "untrained", "module"


@dataclass(frozen=True)
class ModelSource:
    """Which model with which weights. `module` exports an nn.Module as it is (its `.deploy_cfg`, or
    `deploy_cfg`); otherwise the registered `name` is built with `checkpoint`, else the shipped
    weights, else untrained (said loudly, unless `pretrained=False` asks for random weights)."""

    name: str | None = "mobilevit_xxs"
    checkpoint: str | os.PathLike | None = None
    num_classes: int | None = None
    deploy_cfg: DeployCfg | None = None
    module: object = None
    pretrained: bool = True
    model_kwargs: dict | None = None  # constructor options (--model-arg), e.g. {"keep_rate": 0.7}

    def load(self, log: Callable[[str], None] | None = None) -> LoadedModel:
        """Build (or take) the model; one `model: ...` line to `log`. Raises UserError / CheckpointError."""
        log = log or (lambda s: None)
        if self.module is not None:
            return self._from_module(log)
        from .models import list_models

        if self.name not in list_models():
            raise choices_error("model", self.name, list_models())
        if self.num_classes is not None and self.num_classes < 1:
            raise UserError(f"--num-classes must be >= 1, got {self.num_classes}")
        if self.checkpoint is not None:
            return self._from_checkpoint(log)
        sw = shipped_weights(self.name) if self.pretrained else None
        if sw is not None and self._with_classes(self.deploy_cfg or sw.deploy_cfg).num_classes == \
                sw.deploy_cfg.num_classes:
            return self._from_shipped(sw, log)
        return self._untrained(sw, log)

    def _with_classes(self, cfg: DeployCfg) -> DeployCfg:
        n = self.num_classes
        return cfg.with_classes(n) if n is not None and n != cfg.num_classes else cfg

    def _from_module(self, log) -> LoadedModel:
        from .checkpoint import file_sha256, load_checkpoint, state_dict_sha256

        model = self.module
        cfg = self.deploy_cfg or getattr(model, "deploy_cfg", None)
        if cfg is None:
            raise UserError("a module to export needs deploy_cfg= or a .deploy_cfg attribute")
        if self.num_classes is not None and self.num_classes != cfg.num_classes:
            raise UserError(f"num_classes={self.num_classes} does not match the model's deploy_cfg "
                            f"({cfg.num_classes} classes)")
        name = self.name or type(model).__name__.lower()
        if self.checkpoint is not None:
            load_checkpoint(model, self.checkpoint)
            ckpt = {"path": str(self.checkpoint), "sha256": file_sha256(self.checkpoint)}
        else:
            ckpt = {"path": None, "sha256": state_dict_sha256(model),
                    "source": "nn.Module passed to export_model (state_dict sha256)"}
        log(f"model: {name} (module passed in), {cfg.num_classes} classes, {_size(cfg)}")
        return LoadedModel(model.eval(), name, cfg, ckpt, source="module")

    def _from_checkpoint(self, log) -> LoadedModel:
        from .checkpoint import file_sha256
        from .models import create_model, get_deploy_cfg

        path = Path(self.checkpoint)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        found = None if self.deploy_cfg is not None else checkpoint_metadata(path)
        stored = DeployCfg.from_dict(found[0]["deploy_cfg"]) if found else None
        cfg = self._with_classes(self.deploy_cfg or stored or get_deploy_cfg(self.name))
        try:
            m = create_model(self.name, checkpoint=str(path), deploy_cfg=cfg, **(self.model_kwargs or {}))
        except CheckpointError as e:
            hint = ""
            if self.num_classes is None and "shape mismatch" in str(e):
                hint = " (trained on another number of classes? pass --num-classes N)"
            raise CheckpointError(f"{e}{hint}") from None
        from .models.options import recorded_model_kwargs

        opts = {**recorded_model_kwargs(path), **(self.model_kwargs or {})}
        opts = {k: v for k, v in opts.items() if k not in ("slim_order", "slim_counts")}  # long lists: see the JSON
        log(f"model: {self.name} from checkpoint {path} ({cfg.num_classes} classes, {_size(cfg)}"
            f"{', deploy_cfg from ' + str(found[1]) if found else ''}{', options ' + str(opts) if opts else ''})")
        return LoadedModel(m, self.name, cfg, {"path": str(path), "sha256": file_sha256(path)},
                           meta=found[0] if found else {}, source=f"checkpoint {path}")

    def _from_shipped(self, sw: ShippedWeights, log) -> LoadedModel:
        from .checkpoint import file_sha256
        from .models import create_model

        cfg = self._with_classes(self.deploy_cfg or sw.deploy_cfg)
        m = create_model(self.name, checkpoint=str(sw.path), deploy_cfg=cfg, **(self.model_kwargs or {}))
        top1 = sw.meta.get("val_top1")
        top1_s = f"{top1:.2f}" if isinstance(top1, (int, float)) else "?"
        log(f"model: {self.name} with shipped weights {sw.path.name} (trained on {sw.meta.get('data', '?')}, "
            f"val top-1 {top1_s} %, {cfg.num_classes} classes, {_size(cfg)})")
        ckpt = {"path": _repo_relative(sw.path), "sha256": file_sha256(sw.path), "shipped": True, "val_top1": top1}
        return LoadedModel(m, self.name, cfg, ckpt, meta=dict(sw.meta), source=f"shipped {sw.path.name}")

    def _untrained(self, sw: ShippedWeights | None, log) -> LoadedModel:
        from .models import create_model, get_deploy_cfg

        cfg = self._with_classes(self.deploy_cfg or get_deploy_cfg(self.name))
        m = create_model(self.name, deploy_cfg=cfg, **(self.model_kwargs or {}))
        if self.pretrained:
            why = (f"the shipped weights {sw.path.name} have {sw.deploy_cfg.num_classes} classes, not {cfg.num_classes}"
                   if sw is not None else f"no checkpoint given and no shipped weights for {self.name}")
            log(f"WARNING: {why}: exporting UNTRAINED random weights (pass --checkpoint PATH for a trained model)")
        log(f"model: {self.name}, untrained, {cfg.num_classes} classes, {_size(cfg)}")
        return LoadedModel(m, self.name, cfg, {"path": None, "sha256": "untrained"}, source="untrained")


def load_model(model="mobilevit_xxs", *, checkpoint=None, num_classes: int | None = None,
               deploy_cfg: DeployCfg | None = None, pretrained: bool = True,
               log: Callable[[str], None] | None = None, model_kwargs: dict | None = None) -> LoadedModel:
    """`ModelSource(...).load(log)` for a registered name or an nn.Module (see ModelSource)."""
    if isinstance(model, str) or model is None:
        src = ModelSource(model, checkpoint, num_classes, deploy_cfg, pretrained=pretrained, model_kwargs=model_kwargs)
    else:
        src = ModelSource(None, checkpoint, num_classes, deploy_cfg, module=model, pretrained=pretrained)
    return src.load(log)
