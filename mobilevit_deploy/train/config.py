"""Typed training configuration: a recipe YAML is validated into `TrainConfig`.

A recipe is a YAML mapping of sections (`model`, `data`, `optim`, `schedule`, `ema`, `distill`,
`multisize`, `mix`) plus
top-level run fields (`seed`, `amp`, ...). Every key is checked: an unknown or mistyped key is a
`UserError` naming it and listing the valid keys, and so is a value of the wrong type. `--set
section.key=value` (value parsed as YAML) overrides any field after the recipe is read.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass
class ModelConfig:
    name: str = "mobilevit_xxs"
    kwargs: dict = field(default_factory=dict)  # passed to the constructor (e.g. img_size for CMT)
    init_checkpoint: str | None = None  # optional weights to start from (fine-tuning)


@dataclass
class DataConfig:
    root: str | None = None  # ImageFolder root holding train/ and val/ (or --data)
    train_dir: str = "train"
    val_dir: str = "val"
    # Multi-scale variable-batch sampler (MobileViT, Mehta & Rastegari 2022, "multi-scale sampler"):
    # each iteration draws one size from `train_sizes`; the global batch at size s is
    # batch_size * (base_size / s)^2, so the pixels per batch stay about constant.
    train_sizes: list = field(default_factory=lambda: [256])
    base_size: int | None = None  # size at which the global batch equals batch_size (default: max size)
    variable_batch: bool = True  # False: fixed batch_size at every size (plain multi-scale)
    batch_size: int = 128  # global batch (summed over DDP processes) at base_size
    min_batch_size: int = 1
    size_divisor: int = 32  # every train size must be a multiple (MobileViT needs 32)
    # Train augmentation (train/transforms.py): random-resized crop + horizontal flip.
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list = field(default_factory=lambda: [0.75, 1.3333333333333333])
    hflip: float = 0.5
    train_interpolation: str = "bicubic"
    # Evaluation / deployment preprocessing (recorded as the DeployCfg of the trained weights).
    eval_size: int | None = None  # default: the model's DeployCfg size
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: list | None = None  # default: the model's DeployCfg mean/std
    std: list | None = None
    val_batch_size: int = 200
    cache: bool = False  # decode every image once and keep it in memory (small datasets)
    num_workers: int = 0
    limit_train: int | None = None  # use only the first N train images (tests, smoke runs)
    limit_val: int | None = None


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 0.002  # peak learning rate (after warm-up)
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    no_weight_decay_norm_bias: bool = False  # exclude norm weights and biases from weight decay
    clip_grad_norm: float | None = None


@dataclass
class ScheduleConfig:
    epochs: int = 300
    warmup_epochs: float = 0.0  # linear warm-up length in epochs ...
    warmup_iters: int | None = None  # ... or in iterations (takes precedence)
    warmup_init_lr: float = 0.0002
    min_lr: float = 0.0002  # cosine annealing ends here
    kind: str = "cosine"  # cosine | constant


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9995  # ema = decay * ema + (1 - decay) * weights, every iteration
    warmup: bool = False  # decay ramps as min(decay, (1 + n) / (10 + n)) over the first steps
    evaluate: bool = True  # validate the EMA weights (and ship them) rather than the raw ones


@dataclass
class DistillConfig:
    teacher: str | None = None  # a registered model name; enables distillation
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict = field(default_factory=dict)
    kd_weight: float = 0.0  # logit KD (Hinton et al.): weight of T^2 * KL(teacher || student)
    kd_temperature: float = 1.0
    ce_weight: float = 1.0  # weight of the label cross-entropy
    # Fine-grained manifold distillation (Hao et al., NeurIPS 2022) on forward_features maps:
    manifold_weight: float = 0.0
    manifold_patch: float = 1.0  # intra-image (patch-level) relation term
    manifold_sample: float = 1.0  # inter-image (sample-level) relation term
    manifold_rand: float = 1.0  # randomly sampled patches across the batch
    manifold_k: int = 192  # number of randomly sampled patches
    token_weight: float = 0.0  # DynamicViT token distillation (MSE on the kept final tokens; paper 0.5)


@dataclass
class MultisizeConfig:
    """SuperViT-style multi-size training ("Super Vision Transformer", Lin et al. 2022/23): in every step the
    batch drawn at its sampled size S is also fed at each smaller size in `sizes` (the same augmented
    images, resized with antialiasing); the size-S output is supervised by the labels and every smaller
    size by in-place distillation from the size-S output (detached), so one set of weights serves every size.
    """
    enabled: bool = False
    sizes: list = field(default_factory=list)  # the smaller sizes, e.g. [48]; each < every train size
    kd_weight: float = 1.0  # weight of each smaller size's T^2 * KL(softmax(largest / T) || softmax(small / T))
    kd_temperature: float = 1.0
    eval_sizes: list = field(default_factory=list)  # also validate the final weights at these sizes (model.json)


@dataclass
class MixConfig:
    """Batch mixing (train/mix.py): mixup and/or CutMix as in DeiT; off while both alphas are 0."""
    mixup_alpha: float = 0.0  # lambda ~ Beta(a, a) for mixup (DeiT: 0.8)
    cutmix_alpha: float = 0.0  # ... for CutMix (DeiT: 1.0)
    prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # with both on: probability of CutMix rather than mixup

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    multisize: MultisizeConfig = field(default_factory=MultisizeConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    label_smoothing: float = 0.0
    token_ratio_weight: float = 2.0  # DynamicViT ratio loss (paper lambda_ratio 2); models with learned pruning only
    seed: int = 0
    amp: str = "auto"  # auto | bf16 | fp32 (bf16 autocast on CPU or GPU)
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    channels_last: bool = True  # NHWC memory format for the model and batches (CPU training ~17 % faster, measured)
    out: str | None = None  # output directory (or --out)
    eval_every: int = 1  # validate every N epochs (and always after the last)
    stop_after: int | None = None  # stop after N epochs of this invocation (simulates an interruption)
    progress: bool = True
    name: str = ""  # free text, recorded in the metrics

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_value(where: str, value, tp):
    """Validate (and lightly coerce) `value` against the annotation `tp`; raise UserError if wrong."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(where, value, a)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise UserError(f"{where}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise UserError(f"{where}: expected a mapping, got {value!r}")
    return value


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'recipe'}: expected a mapping of keys, got {type(data).__name__}")
    types_ = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        key = f"{where}.{k}" if where else str(k)
        if k not in types_:
            scope = " in " + where if where else ""
            raise UserError(f"unknown recipe key {key!r} (valid keys{scope}: {', '.join(types_)})")
        tp = types_[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, key)
        else:
            kwargs[k] = _check_value(key, v, tp)
    return cls(**kwargs)


def config_from_dict(d: dict) -> TrainConfig:
    cfg = _build(TrainConfig, d, "")
    validate(cfg)
    return cfg


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a recipe (YAML, safe-loaded), apply `key=value` overrides, validate."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe not found: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(d, dict):
        raise UserError(f"recipe {p} must be a mapping of keys, got {type(d).__name__}")
    apply_overrides(d, overrides)
    return config_from_dict(d)


def apply_overrides(d: dict, overrides: Sequence[str]) -> dict:
    """`section.key=value` strings into the nested dict `d` (value parsed as YAML)."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = d
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    return d


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks with one-line messages."""
    if cfg.amp not in ("auto", "bf16", "fp32"):
        raise UserError(f"amp must be auto, bf16 or fp32, got {cfg.amp!r}")
    d = cfg.data
    if not d.train_sizes:
        raise UserError("data.train_sizes must list at least one size")
    for s in d.train_sizes:
        if not isinstance(s, int) or s <= 0 or s % d.size_divisor:
            raise UserError(f"data.train_sizes: {s!r} is not a positive multiple of {d.size_divisor}")
    if d.eval_size is not None and d.eval_size % d.size_divisor:
        raise UserError(f"data.eval_size {d.eval_size} is not a multiple of {d.size_divisor}")
    if d.batch_size < 1 or d.min_batch_size < 1:
        raise UserError("data.batch_size and data.min_batch_size must be >= 1")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise UserError(f"data.crop_scale must be [min, max] within (0, 1], got {d.crop_scale}")
    if len(d.crop_ratio) != 2 or not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        raise UserError(f"data.crop_ratio must be [min, max] > 0, got {d.crop_ratio}")
    for k in ("mean", "std"):
        v = getattr(d, k)
        if v is not None and len(v) != 3:
            raise UserError(f"data.{k} must have 3 values, got {v}")
    for k in ("train_interpolation", "interpolation"):
        v = getattr(d, k)
        if v is not None and v not in ("bilinear", "bicubic", "nearest"):
            raise UserError(f"data.{k} must be bilinear, bicubic or nearest, got {v!r}")
    if cfg.optim.name not in ("adamw", "sgd"):
        raise UserError(f"optim.name must be adamw or sgd, got {cfg.optim.name!r}")
    if cfg.schedule.kind not in ("cosine", "constant"):
        raise UserError(f"schedule.kind must be cosine or constant, got {cfg.schedule.kind!r}")
    if cfg.schedule.epochs < 1:
        raise UserError("schedule.epochs must be >= 1")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 < cfg.ema.decay < 1:
        raise UserError(f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    mx = cfg.mix
    if mx.mixup_alpha < 0 or mx.cutmix_alpha < 0:
        raise UserError(f"mix.mixup_alpha and mix.cutmix_alpha must be >= 0 (0 = off), got {mx.mixup_alpha}, "
                        f"{mx.cutmix_alpha}")
    for k in ("prob", "switch_prob"):
        if not 0 <= getattr(mx, k) <= 1:
            raise UserError(f"mix.{k} must be in [0, 1], got {getattr(mx, k)}")
    ms = cfg.multisize
    if ms.enabled:
        if not ms.sizes:
            raise UserError("multisize.enabled needs multisize.sizes: the smaller input sizes, e.g. [48]")
        for s in ms.sizes:
            if not isinstance(s, int) or s <= 0 or s % d.size_divisor or s >= min(d.train_sizes):
                raise UserError(f"multisize.sizes: {s!r} must be a positive multiple of {d.size_divisor} below the "
                                f"smallest train size {min(d.train_sizes)}")
        if ms.kd_weight < 0 or ms.kd_temperature <= 0:
            raise UserError("multisize.kd_weight must be >= 0 and multisize.kd_temperature > 0")
    for s in ms.eval_sizes:
        if not isinstance(s, int) or s <= 0:
            raise UserError(f"multisize.eval_sizes: {s!r} is not a positive integer")
    kd = cfg.distill
    if kd.teacher is None and (kd.kd_weight or kd.manifold_weight or kd.token_weight):
        raise UserError("distill.kd_weight / manifold_weight / token_weight need distill.teacher")
