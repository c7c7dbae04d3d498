"""The pruning stage: load -> score -> allocate -> remove -> fine-tune (KD) -> write DIR/model.safetensors + model.json.

    from mobilevit_deploy.prune import PruneConfig, prune
    res = prune(PruneConfig(data="data/cifar10", out="runs/pruned", target_macs=0.7))
    res.weights, res.meta["prune"]

Every input is checked before anything is written (UserError / DataError / CheckpointError). The
fine-tuning is the project's trainer (`train.loop.train`): the student is built by the trainer as
`create_model(name, checkpoint=<pruned weights>)`, which applies the architecture recorded beside
them; the teacher is the unpruned model (`distill.teacher` = the same name, `teacher_checkpoint` =
the source checkpoint).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, UserError


@dataclass
class PruneConfig:
    data: str  # ImageFolder root with train/ and val/
    out: str  # output directory: model.safetensors + model.json (+ finetune/ metrics of the fine-tuning)
    model: str = "mobilevit_xxs"
    checkpoint: str | None = None  # None: the shipped default weights of `model`
    target_macs: float | None = None  # keep this fraction of the unpruned MACs ...
    target_latency: float | None = None  # ... or of its (predicted) .pte latency
    method: str = "taylor"
    epochs: int = 1  # KD fine-tuning epochs (0: none)
    distill: bool = True  # fine-tune with KD from the unpruned model (else labels only)
    calib_batches: int = 4  # scoring batches (taylor, nvit, slim, vtp)
    batch_size: int = 32  # scoring and fine-tuning batch
    mask_steps: int = 30  # slim / vtp: soft-mask training steps
    mask_l1: float = 0.5  # slim / vtp: L1 weight
    lr: float = 5e-4  # fine-tuning peak learning rate (AdamW, cosine)
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    limit_train: int | None = None  # use only N train images (spread over the classes)
    limit_val: int | None = None
    latency_table: str = "measure"  # measure (ExecuTorch .pte table, cached) | macs (MACs-proportional)
    latency_threads: int = 1
    train_overrides: Sequence[str] = ()  # `section.key=value` for the fine-tuning TrainConfig
    threads: int | None = None  # torch threads
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        from .importance import check_method

        targets = [t for t in (self.target_macs, self.target_latency) if t is not None]
        if len(targets) != 1:
            raise UserError("give exactly one of --target-macs R or --target-latency R")
        r = targets[0]
        flag = "--target-macs" if self.target_macs is not None else "--target-latency"
        if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or not 0 < r <= 1:
            raise UserError(f"{flag} must be a fraction in (0, 1], got {r}")
        check_method(self.method)
        for k in ("epochs",):
            if getattr(self, k) < 0:
                raise UserError(f"--{k} must be >= 0, got {getattr(self, k)}")
        for k in ("calib_batches", "batch_size", "latency_threads"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        for k in ("limit_train", "limit_val"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
        if self.mask_steps < 1 or self.mask_l1 < 0 or self.lr <= 0:
            raise UserError("--mask-steps must be >= 1, --mask-l1 >= 0 and --lr > 0")
        if self.latency_table not in ("measure", "macs"):
            raise UserError(f"--latency-table must be measure or macs, got {self.latency_table!r}")

    @property
    def target(self) -> float:
        return float(self.target_macs if self.target_macs is not None else self.target_latency)

    @property
    def target_kind(self) -> str:
        return "macs" if self.target_macs is not None else "latency"


@dataclass
class PruneResult:
    out_dir: Path
    weights: Path
    meta_path: Path
    meta: dict
    model: object = None  # the pruned (fine-tuned) nn.Module
    lines: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------- helpers
def _check_data(cfg: PruneConfig):
    from ..train.config import TrainConfig
    from ..train.loop import check_splits

    tc = TrainConfig()
    tc.data.limit_train, tc.data.limit_val = cfg.limit_train, cfg.limit_val
    return check_splits(Path(cfg.data), tc)  # DataError: missing root / split, differing or empty classes


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UserError(f"--out {out}: {probe} is not writable")


def _finetune_config(cfg: PruneConfig, name: str, dcfg, init_ckpt: Path, teacher_ckpt: str | None):
    from ..train.config import apply_overrides, config_from_dict

    s = int(dcfg.input_size[1])
    d = {
        "model": {"name": name, "init_checkpoint": str(init_ckpt)},
        "data": {"root": str(cfg.data), "train_sizes": [s], "eval_size": s, "size_divisor": 32 if s % 32 == 0 else 1,
                 "batch_size": cfg.batch_size, "val_batch_size": max(cfg.batch_size, 64),
                 "mean": list(dcfg.mean), "std": list(dcfg.std), "crop_pct": float(dcfg.crop_pct),
                 "interpolation": dcfg.interpolation, "limit_train": cfg.limit_train, "limit_val": cfg.limit_val},
        "optim": {"name": "adamw", "lr": cfg.lr, "weight_decay": 0.01},
        "schedule": {"epochs": max(cfg.epochs, 1), "warmup_epochs": 0.0, "warmup_init_lr": cfg.lr,
                     "min_lr": cfg.lr * 0.01, "kind": "cosine"},
        "seed": cfg.seed, "progress": cfg.progress, "threads": cfg.threads,
        "name": f"prune-{cfg.method}-{cfg.target_kind}{cfg.target:g}-finetune",
    }
    if cfg.distill and teacher_ckpt is not None:
        d["distill"] = {"teacher": name, "teacher_checkpoint": str(teacher_ckpt), "kd_weight": cfg.kd_weight,
                        "kd_temperature": cfg.kd_temperature, "ce_weight": 1.0}
    apply_overrides(d, list(cfg.train_overrides))
    return config_from_dict(d)


def _loader(samples, dcfg, batch_size: int, shuffle_seed: int | None = None):
    import torch

    from ..data import eval_transform
    from ..train.dataset import EvalDataset

    ds = EvalDataset(samples, eval_transform(dcfg))
    g = None
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=g is not None, generator=g, num_workers=0)


def calibration_batches(train_samples, dcfg, n_batches: int, batch_size: int, seed: int = 0):
    """`n_batches` labelled batches [B, 3, H, W] of train images (eval preprocessing, shuffled, classes mixed)."""
    import random

    rnd = random.Random(seed)
    samples = list(train_samples)
    rnd.shuffle(samples)
    samples = samples[:n_batches * batch_size]
    out = []
    for x, y, _ in _loader(samples, dcfg, batch_size):
        out.append((x, y))
    return out


def top1(model, samples, dcfg, batch_size: int = 100, progress: bool = False) -> float:
    from ..train.loop import evaluate_loader

    return evaluate_loader(model, _loader(samples, dcfg, batch_size), progress=progress, desc="val").top1


def _teacher_checkpoint(cfg: PruneConfig) -> str | None:
    if cfg.checkpoint is not None:
        return str(cfg.checkpoint)
    from ..pretrained import shipped_weights

    sw = shipped_weights(cfg.model)
    return str(sw.path) if sw is not None else None


def write_pruned(model, name: str, out_dir: str | os.PathLike, meta: dict | None = None,
                 stem: str = "model") -> tuple[Path, Path, dict]:
    """`out_dir/<stem>.safetensors` + `<stem>.json` (model, deploy_cfg, architecture, sha256, + meta), each
    written atomically (temporary file, then rename), weights first."""
    from ..checkpoint import atomic_write, file_sha256, save_safetensors
    from .record import architecture_of

    out = Path(out_dir)
    rec = architecture_of(model, name)
    w = save_safetensors(model.state_dict(), out / f"{stem}.safetensors")
    m = {"model": name, **(meta or {}), "sha256": file_sha256(w), "deploy_cfg": model.deploy_cfg.to_dict(),
         "architecture": rec}
    j = atomic_write(out / f"{stem}.json", lambda tmp: Path(tmp).write_text(json.dumps(m, indent=1)))
    return w, j, m


# ------------------------------------------------------------------------------------------ stage
def _load_checked(cfg: PruneConfig, say):
    """Every check first, so that nothing is written when one fails: the config, --out, the data splits,
    the source model (supported, labels matching the class folders) and the fine-tuning config.
    Returns (out, train_samples, val_samples, loaded model source, teacher checkpoint)."""
    import torch

    from ..pretrained import ModelSource
    from .structures import check_supported

    cfg.validate()
    out = Path(cfg.out)
    _check_out(out)
    train_s, val_s, classes = _check_data(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = ModelSource(cfg.model, cfg.checkpoint).load(say)
    model, dcfg, name = loaded.module, loaded.deploy_cfg, loaded.name
    check_supported(model, name)
    from .structures import is_mobilevit

    if cfg.target_kind == "latency" and not is_mobilevit(model):
        raise UserError(f"--target-latency needs the MobileViT latency table; prune {name} with --target-macs")
    labels = list(dcfg.class_labels)
    if labels != list(classes):
        raise DataError(f"the class folders of {cfg.data} ({', '.join(classes)}) are not the labels of the model "
                        f"({', '.join(labels)}): pruning scores and fine-tunes on the model's own classes")
    teacher_ckpt = _teacher_checkpoint(cfg)
    # a bad --set fails here, before anything is written
    _finetune_config(cfg, name, dcfg, out / ".prune-work" / "pruned.safetensors", teacher_ckpt)
    return out, train_s, val_s, loaded, teacher_ckpt


def _score_units(cfg: PruneConfig, model, train_s, dcfg, say) -> dict:
    """Raw importance scores of the prunable units (calibration batches of train images if the method needs data)."""
    from .importance import CALIB_BATCHES_MIN, NEEDS_DATA, score

    t = time.perf_counter()
    batches = []
    if cfg.method in NEEDS_DATA:
        n = max(cfg.calib_batches, CALIB_BATCHES_MIN.get(cfg.method, 0))
        batches = calibration_batches(train_s, dcfg, n, cfg.batch_size, cfg.seed)
    raw = score(model, cfg.method, batches, steps=cfg.mask_steps, l1=cfg.mask_l1, log=say)
    what = f"{len(batches)} batch(es) of {len(batches[0][1])} train images" if batches else "the weights"
    say(f"score: {cfg.method} on {what}, {sum(v.numel() for v in raw.values())} units in {len(raw)} groups "
        f"({time.perf_counter() - t:.1f} s)")
    return raw


def _allocate_units(cfg: PruneConfig, model, name: str, cost, raw: dict, say):
    """Cost model (MACs, or a latency model for a latency target) and the global allocation of removals.
    Returns (allocation, latency model or None, cost unit)."""
    from .budget import allocate, unit_costs
    from .importance import global_scores

    lat = None
    if cfg.target_kind == "latency":
        from .latency import latency_model

        lat = latency_model(model, name, cost, threads=cfg.latency_threads, table=cfg.latency_table, log=say)

        def cost_fn(s):
            return lat.predict(cost.terms(s))
        unit = lat.unit
    else:
        cost_fn, unit = cost.macs, "MACs"
    gscores = global_scores(cfg.method, raw, unit_costs(cost, raw, cost_fn))
    alloc = allocate(cost, gscores, cfg.target, cost_fn, what="latency" if lat else "MACs")
    return alloc, lat, unit


def _remove_units(model, alloc, cost, size, p0: int, lat, unit: str, say):
    """A pruned copy of `model` following `alloc.plan`; checks its counted MACs against the prediction.
    Returns (pruned model, its MACs, its parameter count)."""
    from .budget import describe_removed
    from .cost import count_macs, count_params
    from .surgery import apply_plan

    pruned = apply_plan(copy.deepcopy(model), alloc.plan)
    macs1 = count_macs(pruned, size)
    if macs1 != cost.macs(alloc.state):
        raise RuntimeError(f"internal: counted MACs {macs1} != predicted {cost.macs(alloc.state)}")
    p1 = count_params(pruned)
    say(f"remove: {describe_removed(alloc.removed)} in {alloc.steps} steps; MACs {cost.total0 / 1e6:.2f} M -> "
        f"{macs1 / 1e6:.2f} M ({macs1 / cost.total0:.3f} x), params {p0 / 1e6:.3f} M -> {p1 / 1e6:.3f} M")
    if lat is not None:
        say(f"latency ({lat.source}): predicted {alloc.cost_before:.4g} -> {alloc.cost_after:.4g} {unit} "
            f"({alloc.cost_after / alloc.cost_before:.3f} x)")
    return pruned, macs1, p1


def prune(cfg: PruneConfig, log: Callable[[str], None] | None = print) -> PruneResult:
    """Run the pruning stage (see the module docstring). Raises UserError / DataError / CheckpointError
    for bad input before anything is written."""
    import torch

    from .cost import CostModel, count_params

    lines: list[str] = []

    def say(s: str):
        lines.append(s)
        if log:
            log(s)

    # -- every check first: nothing is written when one fails
    out, train_s, val_s, loaded, teacher_ckpt = _load_checked(cfg, say)
    model, dcfg, name = loaded.module, loaded.deploy_cfg, loaded.name
    size = tuple(dcfg.image_size)
    torch.manual_seed(cfg.seed)

    # -- measure the unpruned model
    cost = CostModel(model, size)
    p0 = count_params(model)
    say(f"prune: {name} at {size[0]}x{size[1]}: {p0 / 1e6:.3f} M params, {cost.total0 / 1e6:.1f} M MACs; "
        f"{len(cost.groups)} prunable groups; method {cfg.method}, target {cfg.target:g} x {cfg.target_kind}")
    t = time.perf_counter()
    top1_0 = top1(model, val_s, dcfg, progress=cfg.progress)
    say(f"val: unpruned top-1 {top1_0:.2f} % on {len(val_s)} images ({time.perf_counter() - t:.1f} s)")

    # -- scores, cost and allocation, removal
    raw = _score_units(cfg, model, train_s, dcfg, say)
    alloc, lat, unit = _allocate_units(cfg, model, name, cost, raw, say)
    pruned, macs1, p1 = _remove_units(model, alloc, cost, size, p0, lat, unit, say)
    t = time.perf_counter()
    top1_p = top1(pruned, val_s, dcfg, progress=cfg.progress)
    say(f"val: pruned top-1 {top1_p:.2f} % before fine-tuning ({time.perf_counter() - t:.1f} s)")

    # -- fine-tuning with the project's trainer (KD from the unpruned model)
    out.mkdir(parents=True, exist_ok=True)
    top1_f, ft = top1_p, None
    if cfg.epochs:
        ft = _finetune(cfg, pruned, name, dcfg, out, teacher_ckpt, say)
        t = time.perf_counter()
        top1_f = top1(pruned, val_s, dcfg, progress=cfg.progress)
        say(f"val: fine-tuned top-1 {top1_f:.2f} % ({time.perf_counter() - t:.1f} s)")

    # -- write
    info = {"method": cfg.method, "target": {"kind": cfg.target_kind, "ratio": cfg.target},
            "source": loaded.checkpoint.get("path"), "macs_before": cost.total0, "macs_after": macs1,
            "macs_ratio": macs1 / cost.total0, "params_before": p0, "params_after": p1,
            "removed": alloc.removed, "plan": alloc.plan, "input_size": list(size),
            "val_top1_unpruned": top1_0, "val_top1_pruned": top1_p, "val_images": len(val_s),
            "finetune": ft}
    if lat is not None:
        info["latency"] = {"model": lat.source, "predicted_before": alloc.cost_before,
                           "predicted_after": alloc.cost_after, "unit": unit,
                           "predicted_ratio": alloc.cost_after / alloc.cost_before}
    meta = {"recipe": "prune", "data": str(cfg.data), "epochs": cfg.epochs, "val_top1": top1_f,
            "val_top1_note": "measured by the pruning stage on the val split with data.eval_transform(deploy_cfg), "
                             "fp32",
            "weights": "raw", "prune": info}
    w, j, meta = write_pruned(pruned, name, out, meta)
    say(f"wrote {w} + {j.name} (MACs {macs1 / cost.total0:.3f} x, "
        f"top-1 {top1_0:.2f} -> {top1_p:.2f} -> {top1_f:.2f} %)")
    return PruneResult(out, w, j, meta, pruned, lines)


def _finetune(cfg: PruneConfig, pruned, name: str, dcfg, out: Path, teacher_ckpt: str | None, say) -> dict:
    from ..checkpoint import load_checkpoint
    from ..train.loop import train

    work = out / ".prune-work"
    ft_dir = out / "finetune"
    for d in (work, ft_dir):
        if d.exists():
            shutil.rmtree(d)
    try:
        init, _, _ = write_pruned(pruned, name, work, {"note": "pruned, before fine-tuning"}, stem="pruned")
        tc = _finetune_config(cfg, name, dcfg, init, teacher_ckpt)
        kd = tc.distill.teacher is not None
        if cfg.distill and not kd:
            say("fine-tune: no unpruned checkpoint to distil from (untrained source): labels only")
        how = "KD from the unpruned model + labels" if kd else "labels"
        say(f"fine-tune: {cfg.epochs} epoch(s) with the trainer ({how}), "
            f"lr {tc.optim.lr:g}, batch {tc.data.batch_size} at {tc.data.train_sizes[0]} px -> {ft_dir}")
        res = train(tc, data=cfg.data, out=ft_dir, recipe_path=None)
        load_checkpoint(pruned, res.weights)  # the trainer's final weights, same (pruned) shapes
        pruned.eval()
        return {"epochs": res.epochs_done, "distill": kd, "lr": tc.optim.lr, "batch_size": tc.data.batch_size,
                "trainer_val_top1": res.val_top1, "metrics": str(ft_dir / "metrics.csv")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # the trainer's own model.safetensors/json lack the architecture record and its resume state
        # is not needed: keep only its metrics, curves and config beside the pruned model
        for f in ("model.safetensors", "model.json"):
            (ft_dir / f).unlink(missing_ok=True)
        shutil.rmtree(ft_dir / "checkpoint", ignore_errors=True)
