"""Train an exit head after stage K of a frozen model (the depth cascade's first stage, models/exit_head.py).

    python -m mobilevit_deploy.train.exit_head --data ../shared/data/cifar10-50k/train \
        [--model mobilevit_xxs] [--checkpoint CKPT] [--after 3] [--head mv2s2] [--epochs 15] \
        [--out mobilevit_deploy/assets/exit_heads/mobilevit_xxs_cifar10_exit3.safetensors]

The backbone (the shipped weights, or --checkpoint) is frozen. Stage K's features of every --data image
(the deploy preprocessing) and the whole model's logits are computed once (cached in --cache if given);
the head is trained on them: random horizontal flips of the features (a flipped image's features are the
flipped features: every layer before is flip-equivariant), 0.5 x label-smoothed (0.1) cross-entropy +
0.5 x KL to the whole model's softmax, AdamW (lr 2e-3 one-cycle, weight decay 0.05), batch 256, seed 0.
Writes OUT (fp16 safetensors, what `export --cascade exitK --exit-head OUT` reads) and OUT's `.json`
(model, after_stage, head, params, backbone_sha256, train_data, epochs, loss, command). Prints one line
per epoch and the last line `wrote OUT (...)`.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from ..cli import ArgumentParser, run_cli
from ..errors import UserError

__all__ = ["stage_features", "train_exit_head", "save_exit_head", "main"]

LOSS = "0.5 x CE (label smoothing 0.1) + 0.5 x KL(whole model softmax); feature flips; AdamW 2e-3 one-cycle, batch 256"


def stage_features(exit_branch, rest_branch, data, deploy_cfg, cache=None, chunk: int = 500):
    """(features [N, C_K, h, w], teacher logits [N, classes], labels [N]) of an ImageFolder, computed once
    (or read from `cache`, a torch file written here with weights_only-loadable tensors)."""
    import torch

    from ..data import load_labeled_folder

    if cache is not None and Path(cache).is_file():
        d = torch.load(cache, weights_only=True)
        return d["features"], d["teacher"], d["labels"]
    x, y, _ = load_labeled_folder(data, deploy_cfg)
    feats, teacher = [], []
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            f = exit_branch.stages(exit_branch.stem(x[i:i + chunk]))  # [b, C_K, h, w]
            feats.append(f)
            teacher.append(rest_branch(f))  # [b, classes]: the whole model's logits
    f_all, t_all = torch.cat(feats), torch.cat(teacher)
    if cache is not None:
        torch.save({"features": f_all, "teacher": t_all, "labels": y}, cache)
    return f_all, t_all, y


def train_exit_head(head, features, teacher, labels, epochs: int, log=print, batch: int = 256, lr: float = 2e-3):
    """Train `head` (in place) on cached features; returns the seconds spent."""
    import torch
    import torch.nn.functional as F

    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    torch.manual_seed(0)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    steps_per = max(1, len(features) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per)
    t = time.perf_counter()
    for e in range(epochs):
        head.train()
        perm = torch.randperm(len(features))
        total = 0.0
        for i in range(steps_per):
            idx = perm[i * batch:(i + 1) * batch]
            f = features[idx]
            flip = torch.rand(len(idx)) < 0.5
            f = torch.where(flip[:, None, None, None], f.flip(3), f)  # flipped image -> flipped features
            out = head(f)
            loss = 0.5 * F.cross_entropy(out, labels[idx], label_smoothing=0.1) + 0.5 * F.kl_div(
                F.log_softmax(out, 1), F.softmax(teacher[idx], 1), reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        log(f"exit head epoch {e + 1}/{epochs}: loss {total / steps_per:.4f}")
    head.eval()
    return time.perf_counter() - t


def save_exit_head(exit_branch, out, meta: dict) -> Path:
    """fp16 safetensors at `out` and its `.json` (both written to a temporary path, then renamed)."""
    import torch

    from ..checkpoint import atomic_write, file_sha256, save_safetensors

    out = Path(out)
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in exit_branch.head.state_dict().items()}
    save_safetensors(sd, out)
    meta = {**meta, "sha256": file_sha256(out)}
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
    return out


def main(argv=None) -> int:
    from ..models.exit_head import DEFAULT_HEAD, HEADS

    p = ArgumentParser(prog="python -m mobilevit_deploy.train.exit_head", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder of the model's classes the head trains on")
    p.add_argument("--model", default="mobilevit_xxs")
    p.add_argument("--checkpoint", default=None, help="backbone weights (default: the shipped weights)")
    p.add_argument("--after", type=int, default=3, help="exit after this stage (default 3)")
    p.add_argument("--head", default=DEFAULT_HEAD, choices=list(HEADS), help=f"exit head (default {DEFAULT_HEAD})")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cache", default=None, help="torch file caching the features between runs")
    p.add_argument("--out", required=True, help="the head's .safetensors (its .json is written beside it)")
    args = p.parse_args(argv)
    if not str(args.out).endswith(".safetensors"):
        raise UserError(f"--out must end in .safetensors, got {args.out}")
    data = Path(args.data)
    if not data.is_dir():
        raise UserError(f"--data {data}: directory not found (expected an ImageFolder: {data}/<class>/<image>.jpg)")
    import torch

    from ..models.exit_head import split_model
    from ..pretrained import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, checkpoint=args.checkpoint)
    model = lm.module.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    exit_b, rest_b = split_model(model, args.after, args.head)
    t = time.perf_counter()
    f, teacher, y = stage_features(exit_b, rest_b, data, lm.deploy_cfg, cache=args.cache)
    print(f"features {tuple(f.shape)} of {len(y)} images of {data} ({time.perf_counter() - t:.0f} s)", flush=True)
    train_s = train_exit_head(exit_b.head, f, teacher, y, args.epochs, log=lambda s: print(s, flush=True))
    meta = {"model": args.model, "after_stage": args.after, "head": args.head,
            "params": sum(q.numel() for q in exit_b.head.parameters()),
            "backbone_sha256": lm.checkpoint.get("sha256"), "backbone": lm.source, "train_data": str(data),
            "train_images": len(y), "epochs": args.epochs, "train_s": round(train_s, 1), "loss": LOSS,
            "command": "python -m mobilevit_deploy.train.exit_head " + shlex.join(sys.argv[1:] if argv is None
                                                                                 else argv)}
    out = save_exit_head(exit_b, args.out, meta)
    print(f"wrote {out} ({meta['params']:,} parameters, {args.epochs} epochs in {train_s:.0f} s) and "
          f"{out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
