"""The training loop: one process or DDP (`torchrun`), multi-scale variable-batch sampling, AdamW with
warm-up + cosine, label smoothing, EMA, optional distillation, bf16 autocast, exact resume.

`train(cfg)` is the library entry point; `python -m mobilevit_deploy.train` only parses and calls it.
Outputs in `out/`: `metrics.csv` + `metrics.json` (one row per epoch), `curves.png`, `config.yaml`,
`checkpoint/` (see checkpointing.py) and, at the end, `model.safetensors` + `model.json` (the shipped
weights' schema: model, recipe, data, epochs, val_top1, sha256, deploy_cfg).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import DataError, UserError
from .config import TrainConfig


@dataclass
class TrainResult:
    out_dir: Path
    epochs_done: int
    finished: bool
    metrics: list = field(default_factory=list)
    weights: Path | None = None
    val_top1: float | None = None


# ----------------------------------------------------------------------------------------- helpers
def resolve_amp(amp: str, device: str) -> bool:
    """True when bf16 autocast should be used."""
    import torch

    if amp == "bf16":
        return True
    if amp == "fp32":
        return False
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:  # CPU: only where the ISA has native bf16 dot products
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def lr_at(cfg: TrainConfig, epoch_float: float, global_step: int, warmup_epochs: float) -> float:
    s, peak = cfg.schedule, cfg.optim.lr
    if s.warmup_iters:
        if global_step < s.warmup_iters:
            return s.warmup_init_lr + (peak - s.warmup_init_lr) * global_step / s.warmup_iters
    elif epoch_float < warmup_epochs:
        return s.warmup_init_lr + (peak - s.warmup_init_lr) * epoch_float / warmup_epochs
    if s.kind == "constant":
        return peak
    span = max(s.epochs - warmup_epochs, 1e-9)
    q = min(max((epoch_float - warmup_epochs) / span, 0.0), 1.0)
    return s.min_lr + 0.5 * (peak - s.min_lr) * (1 + math.cos(math.pi * q))


def param_groups(model, weight_decay: float, exclude_norm_bias: bool):
    if not exclude_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_splits(root: Path, cfg: TrainConfig):
    """(train samples, val samples, classes); DataError for a missing split or differing classes."""
    from ..data import find_classes, list_image_folder

    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    tr, va = root / cfg.data.train_dir, root / cfg.data.val_dir
    for d in (tr, va):
        if not d.is_dir():
            raise DataError(f"{root} has no {d.name}/ folder (expected {root}/{cfg.data.train_dir}/<class>/* "
                            f"and {root}/{cfg.data.val_dir}/<class>/*)")
    ct, cv = find_classes(tr), find_classes(va)
    if ct != cv:
        only_t, only_v = sorted(set(ct) - set(cv)), sorted(set(cv) - set(ct))
        raise DataError(f"class folders differ between {tr} and {va}: only in train: {only_t or '-'}; "
                        f"only in val: {only_v or '-'}")
    train_s, classes = list_image_folder(tr, ct)
    val_s, _ = list_image_folder(va, ct)
    if cfg.data.limit_train:
        train_s = _spread(train_s, cfg.data.limit_train)
    if cfg.data.limit_val:
        val_s = _spread(val_s, cfg.data.limit_val)
    return train_s, val_s, classes


def _spread(samples, n):
    """n samples taken evenly across the (class-sorted) list, so every class stays represented."""
    if n >= len(samples):
        return samples
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n)]


def build_deploy_cfg(cfg: TrainConfig, classes):
    from ..models import get_deploy_cfg

    d = cfg.data
    dc = get_deploy_cfg(cfg.model.name, num_classes=len(classes), labels=classes)
    kw = {}
    if d.eval_size:
        kw["input_size"] = (3, d.eval_size, d.eval_size)
    if d.mean is not None:
        kw["mean"] = tuple(float(v) for v in d.mean)
    if d.std is not None:
        kw["std"] = tuple(float(v) for v in d.std)
    if d.crop_pct is not None:
        kw["crop_pct"] = float(d.crop_pct)
    if d.interpolation is not None:
        kw["interpolation"] = d.interpolation
    return replace(dc, **kw)


class _WithFeatures:
    """Module wrapper returning (logits, features) so DDP sees one forward for both."""

    @staticmethod
    def wrap(model):
        import torch.nn as nn

        class WithFeatures(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                f = self.m.forward_features(x)
                return self.m.forward_head(f), f

        return WithFeatures(model)


@dataclass
class EvalStats:
    correct: float = 0.0
    total: float = 0.0
    loss: float = 0.0

    @property
    def top1(self) -> float:
        return 100.0 * self.correct / max(self.total, 1)


def evaluate_loader(model, loader, *, progress: bool = False, desc: str = "val", amp: bool = False) -> EvalStats:
    """Top-1 and mean CE of `model` over a loader of (x, target[, ...]) batches (local to this process)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    st = EvalStats()
    was = model.training
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
            x, y = batch[0], batch[1]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            logits = logits.float()
            st.correct += (logits.argmax(1) == y).sum().item()
            st.total += len(y)
            st.loss += F.cross_entropy(logits, y, reduction="sum").item()
    model.train(was)
    return st


def plot_curves(metrics: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import atomic_write

    ep = [m["epoch"] for m in metrics]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [m["train_loss"] for m in metrics], label="train loss")
    if any(m.get("val_loss") is not None for m in metrics):
        a1.plot([m["epoch"] for m in metrics if m.get("val_loss") is not None],
                [m["val_loss"] for m in metrics if m.get("val_loss") is not None], label="val loss")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.legend(), a1.grid(alpha=0.3)
    a2.plot(ep, [m["train_top1"] for m in metrics], label="train top-1 (augmented)")
    for key, lab in (("val_top1", "val top-1"), ("val_top1_raw", "val top-1 (raw weights)")):
        pts = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
        if pts:
            a2.plot(*zip(*pts), label=lab)
    a2.set_xlabel("epoch"), a2.set_ylabel("top-1 %"), a2.legend(), a2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _write_metrics(out: Path, metrics: list[dict]) -> None:
    from ..checkpoint import atomic_write

    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
    keys = []
    for m in metrics:
        keys += [k for k in m if k not in keys]

    def w(tmp):
        with open(tmp, "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=keys)
            wr.writeheader()
            wr.writerows(metrics)

    atomic_write(out / "metrics.csv", w)


# -------------------------------------------------------------------------------------------- train
@dataclass
class _Run:
    """Everything one training run holds, built once by `_setup` and advanced one epoch at a time."""
    cfg: TrainConfig
    info: object  # distributed.DistInfo
    out_dir: Path
    root: Path
    classes: list
    dcfg: object  # DeployCfg
    device: object
    mf: object  # torch memory format
    use_bf16: bool
    model: object
    net: object  # the module called for the labelled forward (feature wrapper / DDP around `model`)
    teacher: object
    crit: object
    opt: object
    ema: object
    sampler: object
    loader: object
    val_loader: object
    train_ds: object
    val_ds: object
    val_s: list
    warmup_epochs: float
    log: object
    show: bool
    start_epoch: int = 0
    global_step: int = 0
    metrics: list = field(default_factory=list)
    skipped: set = field(default_factory=set)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    @property
    def eval_model(self):
        return self.ema.module if (self.ema is not None and self.cfg.ema.evaluate) else self.model


def train(cfg: TrainConfig, *, data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          resume: bool = False, recipe_path: str | None = None) -> TrainResult:
    """Train `cfg.model.name` on the ImageFolder root `data` (or cfg.data.root) into `out`.

    Steps: `_setup` (data, model, teacher, optimiser, EMA, sampler) -> `_restore` (with --resume) ->
    per epoch `_train_epoch` -> `_validate` -> `_save_epoch` -> at the end `_finish` (weights + model.json).
    """
    import torch

    from ..models import get_deploy_cfg
    from . import distributed as dist_
    from .checkpointing import STATE

    root = data if data is not None else cfg.data.root
    if root is None:
        raise UserError("no data directory: pass --data DIR or set data.root in the recipe")
    out_dir = Path(out if out is not None else (cfg.out or f"runs/{cfg.model.name}"))
    get_deploy_cfg(cfg.model.name)  # unknown model -> UserError before any work
    if cfg.distill.teacher:
        get_deploy_cfg(cfg.distill.teacher)

    info = dist_.init_distributed()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif info.distributed and info.device == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if not resume and (out_dir / "checkpoint" / STATE).exists():
            raise UserError(f"{out_dir} already holds a checkpoint: pass --resume to continue it, "
                            "or choose another --out")
        run = _setup(cfg, info, Path(root), out_dir)
        if resume:
            _restore(run)
        _start_message(run, recipe_path)
        E, epochs_here = cfg.schedule.epochs, 0
        for epoch in range(run.start_epoch, E):
            row = _train_epoch(run, epoch)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == E:
                _validate(run, row, last=epoch + 1 == E)
            run.metrics.append(row)
            _save_epoch(run, epoch, row)
            epochs_here += 1
            if cfg.stop_after and epochs_here >= cfg.stop_after and epoch + 1 < E:
                return TrainResult(out_dir, epoch + 1, False, run.metrics)
        return _finish(run, recipe_path)
    finally:
        dist_.cleanup(info)


def _setup(cfg: TrainConfig, info, root: Path, out_dir: Path) -> _Run:
    """Data, model (+ teacher), loss, optimiser, EMA, sampler and loaders of a run."""
    import torch
    from tqdm import tqdm

    from ..data import eval_transform
    from ..models import create_model
    from .dataset import EvalDataset, TrainDataset
    from .ema import ModelEma
    from .losses import TrainLoss
    from .sampler import MultiScaleBatchSampler
    from .transforms import TrainTransform

    main = info.is_main
    train_s, val_s, classes = check_splits(root, cfg)
    dcfg = build_deploy_cfg(cfg, classes)
    device = torch.device(info.device)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, deploy_cfg=dcfg, checkpoint=cfg.model.init_checkpoint, **cfg.model.kwargs)
    model.to(device).train()
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=mf)
    k = cfg.distill
    crit = TrainLoss(cfg.label_smoothing, k.ce_weight, k.kd_weight, k.kd_temperature, k.manifold_weight,
                     k.manifold_patch, k.manifold_sample, k.manifold_rand, k.manifold_k)
    teacher = None
    if k.teacher:
        teacher = create_model(k.teacher, num_classes=len(classes), labels=classes, checkpoint=k.teacher_checkpoint,
                               **k.teacher_kwargs).to(device).eval()
        teacher.to(memory_format=mf)
        for p in teacher.parameters():
            p.requires_grad_(False)
    net = _WithFeatures.wrap(model) if crit.needs_features else model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[info.local_rank] if device.type == "cuda" else None)
    opt = _optimizer(cfg, model)
    ema = ModelEma(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None

    d, show = cfg.data, cfg.progress and main
    tt = TrainTransform(dcfg.mean, dcfg.std, d.crop_scale, d.crop_ratio, d.hflip, d.train_interpolation)
    train_ds = TrainDataset(train_s, tt, seed=cfg.seed, cache=d.cache, progress=show)
    val_ds = EvalDataset(val_s[info.rank::info.world_size], eval_transform(dcfg), cache=d.cache, progress=show)
    sampler = MultiScaleBatchSampler(len(train_ds), d.train_sizes, d.batch_size, d.base_size,
                                     variable_batch=d.variable_batch, min_batch_size=d.min_batch_size,
                                     seed=cfg.seed, world_size=info.world_size, rank=info.rank)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=d.num_workers,
                                         persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=d.val_batch_size, shuffle=False,
                                             num_workers=d.num_workers)
    s0 = len(sampler.schedule(0))
    warmup_epochs = (cfg.schedule.warmup_iters / s0) if cfg.schedule.warmup_iters else cfg.schedule.warmup_epochs
    return _Run(cfg, info, out_dir, root, classes, dcfg, device, mf, resolve_amp(cfg.amp, info.device), model, net,
                teacher, crit, opt, ema, sampler, loader, val_loader, train_ds, val_ds, val_s, warmup_epochs,
                log=tqdm.write if main else (lambda *_a, **_k: None), show=show, skipped=set(train_ds.bad))


def _optimizer(cfg: TrainConfig, model):
    import torch

    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.no_weight_decay_norm_bias)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)


def _restore(run: _Run) -> None:
    """Continue from the last complete epoch in `out/checkpoint` (model, optimiser, EMA, sampler, RNG)."""
    from .checkpointing import STATE, load_checkpoint_state, set_rng_state

    cfg, info = run.cfg, run.info
    if not (run.ckpt_dir / STATE).exists():
        run.log(f"--resume: no checkpoint in {run.ckpt_dir}, starting from scratch")
        return
    state, msd, esd = load_checkpoint_state(run.ckpt_dir)
    if state["config"]["model"]["name"] != cfg.model.name:
        raise UserError(f"cannot resume: checkpoint is {state['config']['model']['name']}, "
                        f"recipe says {cfg.model.name}")
    run.model.load_state_dict(msd)
    run.opt.load_state_dict(state["optimizer"])
    if run.ema is not None:
        if esd is None:
            raise UserError("cannot resume: the recipe enables EMA but the checkpoint has none")
        run.ema.module.load_state_dict(esd)
        run.ema.load_state_dict(state["ema"])
    run.sampler.load_state_dict(state["sampler"])
    run.start_epoch, run.global_step, run.metrics = state["epoch"] + 1, state["global_step"], list(state["metrics"])
    rngs = state["rng"]
    set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
    if info.is_main:
        run.log(f"resumed {run.out_dir} after epoch {run.start_epoch} (step {run.global_step})")


def _start_message(run: _Run, recipe_path) -> None:
    import torch
    import yaml

    from ..checkpoint import atomic_write

    if not run.info.is_main:
        return
    cfg, d, ms, mx, info = run.cfg, run.cfg.data, run.cfg.multisize, run.cfg.mix, run.info
    run.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run.out_dir / "config.yaml",
                 lambda tmp: Path(tmp).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    n_par = sum(p.numel() for p in run.model.parameters())
    run.log(f"{cfg.model.name}: {n_par / 1e6:.2f} M params, {len(run.classes)} classes, {len(run.train_ds)} train / "
            f"{len(run.val_s)} val images, sizes {run.sampler.sizes} (global batch {d.batch_size} at "
            f"{run.sampler.base_size} px{', variable' if d.variable_batch else ''})"
            f"{f', multi-size KD at {ms.sizes}' if ms.enabled else ''}"
            f"{f', mixup {mx.mixup_alpha} / CutMix {mx.cutmix_alpha} (p {mx.prob})' if mx.enabled else ''}, "
            f"{'bf16 autocast' if run.use_bf16 else 'fp32'}, "
            f"{info.world_size} process(es) ({info.backend or 'single'}), {torch.get_num_threads()} threads")


def _step_loss(run: _Run, x, y):
    """Forward pass(es) of one step: (LossOutput, logits of the labelled size)."""
    import torch

    from .losses import multisize_kd

    ms = run.cfg.multisize
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
        out_ = run.net(x)
        logits, feats = out_ if run.crit.needs_features else (out_, None)
        t_logits = t_feats = None
        if run.teacher is not None:
            with torch.no_grad():
                t_feats = run.teacher.forward_features(x)
                t_logits = run.teacher.forward_head(t_feats)
        ms_terms = multisize_kd(run.model, x, logits, ms.sizes, ms.kd_temperature) if ms.enabled else {}  # SuperViT
    lo = run.crit(logits, y, feats, t_logits, t_feats)
    from .token_losses import dynamicvit_terms

    tw = {"ratio": run.cfg.token_ratio_weight, "token_kd": run.cfg.distill.token_weight}
    for k, v in dynamicvit_terms(run.model, t_feats).items():  # DynamicViT's ratio and token distillation losses
        lo.total = lo.total + tw[k] * v
        lo.parts[k] = v.detach()
    for k, v in ms_terms.items():
        lo.total = lo.total + ms.kd_weight * v
        lo.parts[k] = v.detach()
    return lo, logits


def _train_epoch(run: _Run, epoch: int) -> dict:
    """One epoch of optimisation; returns the epoch's metrics row (losses summed over DDP processes)."""
    import torch
    from tqdm import tqdm

    from . import distributed as dist_
    from .dataset import skipped_between
    from .mix import mix_batch, mix_rng

    cfg, info, o = run.cfg, run.info, run.cfg.optim
    run.sampler.set_epoch(epoch)
    steps, E = len(run.sampler), cfg.schedule.epochs
    run.net.train()
    t0 = time.perf_counter()
    loss_sum = correct = seen = 0.0
    parts_sum: dict[str, float] = {}
    lr = run.opt.param_groups[0]["lr"]
    bar = tqdm(run.loader, total=steps, desc=f"epoch {epoch + 1}/{E}", disable=not run.show, leave=False, unit="it")
    for i, (x, y, used) in enumerate(bar):
        lr = lr_at(cfg, epoch + i / steps, run.global_step, run.warmup_epochs)
        for g in run.opt.param_groups:
            g["lr"] = lr
        x, y = x.to(run.device, non_blocking=True, memory_format=run.mf), y.to(run.device, non_blocking=True)
        target = y
        if cfg.mix.enabled:  # mixup / CutMix: soft targets; top-1 below counts the image's own label
            x, target, _ = mix_batch(x, y, len(run.classes), cfg.mix, mix_rng(cfg.seed, epoch, i))
        lo, logits = _step_loss(run, x, target)
        run.opt.zero_grad(set_to_none=True)
        lo.total.backward()
        if o.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), o.clip_grad_norm)
        run.opt.step()
        if run.ema is not None:
            run.ema.update(run.model)
        run.global_step += 1
        n = len(y)
        loss_sum += lo.total.item() * n
        correct += (logits.detach().argmax(1) == y).sum().item()
        seen += n
        for k, v in lo.parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.item() * n
        req = _requested(run.sampler, epoch, i)
        if used.tolist() != req:
            run.skipped |= skipped_between(req, used.tolist(), len(run.train_ds))
        if run.show:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.2e}", px=x.shape[-1], bs=n * info.world_size)
    bar.close()
    train_time = time.perf_counter() - t0
    keys = sorted(parts_sum)
    red = dist_.all_reduce_sum([loss_sum, correct, seen] + [parts_sum[k] for k in keys], info)
    loss_sum, correct, seen, parts = red[0], red[1], red[2], dict(zip(keys, red[3:]))
    run.skipped = set().union(*dist_.all_gather_object(sorted(run.skipped), info))
    if run.skipped:
        run.log(f"warning: {len(run.skipped)} undecodable train image(s) skipped so far")
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_top1": 100 * correct / seen,
            **{f"train_{k}": v / seen for k, v in parts.items() if k != "ce" or len(parts) > 1},
            "images": int(seen), "steps": steps, "epoch_time_s": round(train_time, 2),
            "img_per_s": round(seen / train_time, 1), "skipped_images": len(run.skipped)}


def _validate(run: _Run, row: dict, last: bool) -> None:
    """Val top-1 / loss of the evaluated weights (EMA by default) into `row`; raw weights too after the last epoch."""
    from . import distributed as dist_

    info = run.info
    t1 = time.perf_counter()
    evm = run.eval_model
    st = evaluate_loader(evm, run.val_loader, progress=run.show, desc="val")
    c, tot, ls = dist_.all_reduce_sum([st.correct, st.total, st.loss], info)
    row["val_top1"], row["val_loss"] = 100 * c / tot, ls / tot
    if evm is not run.model and last:
        st = evaluate_loader(run.model, run.val_loader, progress=run.show, desc="val (raw)")
        c2, tot2, _ = dist_.all_reduce_sum([st.correct, st.total, st.loss], info)
        row["val_top1_raw"] = 100 * c2 / tot2
    row["val_time_s"] = round(time.perf_counter() - t1, 2)
    if run.val_ds.bad:
        row["skipped_val_images"] = len(run.val_ds.bad)


def _save_epoch(run: _Run, epoch: int, row: dict) -> None:
    """Checkpoint (weights, then the atomically replaced state), metrics files and the epoch's log line."""
    from . import distributed as dist_
    from .checkpointing import rng_state, save_checkpoint

    info, ema, E = run.info, run.ema, run.cfg.schedule.epochs
    rngs = dist_.all_gather_object(rng_state(), info)
    if info.is_main:
        lr = row["lr"]
        state = {"global_step": run.global_step, "optimizer": run.opt.state_dict(),
                 "scheduler": {"global_step": run.global_step, "warmup_epochs": run.warmup_epochs, "lr": lr},
                 "ema": ema.state_dict() if ema is not None else None, "sampler": run.sampler.state_dict(),
                 "rng": rngs, "metrics": run.metrics, "config": run.cfg.to_dict()}
        ema_sd = ema.module.state_dict() if ema is not None else None
        save_checkpoint(run.ckpt_dir, epoch, run.model.state_dict(), ema_sd, state)
        _write_metrics(run.out_dir, run.metrics)
        v = f"val top-1 {row['val_top1']:.2f}%" if "val_top1" in row else "no val"
        if "val_top1_raw" in row:
            v += f" (EMA; raw {row['val_top1_raw']:.2f}%)"
        run.log(f"epoch {epoch + 1}/{E}: train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f}% | {v} | "
                f"lr {lr:.2e} | {row['epoch_time_s']:.1f} s, {row['img_per_s']:.0f} img/s")
    dist_.barrier(info)


def _finish(run: _Run, recipe_path) -> TrainResult:
    """Final weights (EMA by default) + model.json (+ top-1 per size with multisize.eval_sizes) + curves."""
    from ..checkpoint import atomic_write, file_sha256, save_safetensors
    from . import distributed as dist_

    cfg, E, metrics = run.cfg, run.cfg.schedule.epochs, run.metrics
    result = TrainResult(run.out_dir, E, True, metrics, val_top1=metrics[-1].get("val_top1") if metrics else None)
    if run.info.is_main:
        final = run.eval_model
        w = save_safetensors(final.state_dict(), run.out_dir / "model.safetensors")
        meta = {"model": cfg.model.name, "recipe": Path(recipe_path).name if recipe_path else cfg.name,
                "data": str(run.root), "epochs": E, "val_top1": result.val_top1,
                "val_top1_note": "measured during training on the val split with data.eval_transform(deploy_cfg), fp32",
                "weights": "ema" if final is not run.model else "raw", "sha256": file_sha256(w),
                "deploy_cfg": run.dcfg.to_dict()}
        if cfg.model.kwargs:  # constructor options (img_size, token reduction, ...): create_model reads them back
            meta["model_kwargs"] = cfg.model.kwargs
        if cfg.model.init_checkpoint:  # a pruned starting point: its architecture record travels with the weights
            from ..prune.record import recorded_architecture

            arch = recorded_architecture(cfg.model.init_checkpoint)
            if arch is not None:
                meta["architecture"] = arch
        ms = cfg.multisize
        if ms.eval_sizes:
            meta["val_top1_per_size"] = _top1_per_size(final, run.val_s, run.dcfg, ms.eval_sizes, cfg.data, run.show)
            per_size = meta["val_top1_per_size"]
            run.log("val top-1 per size: " + ", ".join(f"{k} px {v:.2f}%" for k, v in per_size.items()))
        atomic_write(run.out_dir / "model.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
        plot_curves(metrics, run.out_dir / "curves.png", f"{cfg.model.name} {cfg.name}".strip())
        result.weights = w
    dist_.barrier(run.info)
    return result


def _top1_per_size(model, val_samples, dcfg, sizes, d, progress: bool) -> dict:
    """{"S": top-1 %} of `model` on the val samples resized to S x S (the deploy preprocessing otherwise)."""
    import torch

    from ..data import eval_transform
    from .dataset import EvalDataset

    out = {}
    for s in sizes:
        ds = EvalDataset(val_samples, eval_transform(replace(dcfg, input_size=(3, s, s))), cache=d.cache)
        loader = torch.utils.data.DataLoader(ds, batch_size=d.val_batch_size, shuffle=False)
        out[str(s)] = round(evaluate_loader(model, loader, progress=progress, desc=f"val {s} px").top1, 2)
    return out


def _requested(sampler, epoch: int, i: int) -> list[int]:
    """The dataset indices this process asked for at iteration i of `epoch`."""
    _, idx = sampler.schedule(epoch)[i]
    share = len(idx) // sampler.world_size
    return idx[sampler.rank * share:(sampler.rank + 1) * share]
