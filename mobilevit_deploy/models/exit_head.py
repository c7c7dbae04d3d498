"""Exit heads: a small classifier after stage K of a MobileViT, and the split of the model it makes.

The depth cascade (issue 14; CF-ViT's feature reuse taken to its limit, WDPruning's shallow classifier at
stage level) runs `ExitBranch` (stem, stages 1..K, the exit head) on the image; when its answer is not
confident, `RestBranch` (stages K+1.., final 1x1, classifier of the *same* weights) continues from the
exit branch's stage-K features, so the slow path costs the whole model plus the head, never two models.

    exit_b, rest_b = split_model(model, after=3, head="mv2s2")
    logits_exit, feats = exit_b(x)          # [B, classes], [B, C_3, H / 8, W / 8]
    logits = rest_b(feats)                  # == model(x)

`HEADS` are the heads the study compared (benchmarks/depth_exit_study.md); the shipped one is `mv2s2`.
Shipped head weights: `assets/exit_heads/<model>_<tag>_exit<K>.safetensors` (fp16) with `<same stem>.json`
(the backbone weights' sha256 it was trained on, K, head, training data, epochs, command).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, UserError
from .layers import ConvNormAct

__all__ = ["HEADS", "ExitBranch", "RestBranch", "split_model", "EXIT_HEADS_DIR", "ExitHeadWeights",
           "shipped_exit_head", "read_exit_head", "DEFAULT_HEAD"]

EXIT_HEADS_DIR = Path(__file__).resolve().parents[1] / "assets" / "exit_heads"
DEFAULT_HEAD = "mv2s2"


class GlobalPool(nn.Module):
    def forward(self, x):
        return x.mean((2, 3), keepdim=True).flatten(1)  # [B, C, h, w] -> [B, C] (keepdim: XNNPACK takes it)


def _pool_fc(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(GlobalPool(), nn.Linear(c, n))  # [B, n]


def _conv192(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, 192, 1, bias=False), nn.BatchNorm2d(192), nn.SiLU(),  # [B, 192, h, w]
                         GlobalPool(), nn.Dropout(0.1), nn.Linear(192, n))  # [B, n]


def _mv2(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(ConvNormAct(c, 4 * c, 1), ConvNormAct(4 * c, 4 * c, 3, groups=4 * c),  # [B, 4C, h, w]
                         ConvNormAct(4 * c, 256, 1), GlobalPool(), nn.Dropout(0.1), nn.Linear(256, n))  # [B, n]


def _mv2s2(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(ConvNormAct(c, 4 * c, 1),
                         ConvNormAct(4 * c, 4 * c, 3, stride=2, groups=4 * c),  # [B, 4C, h / 2, w / 2]
                         ConvNormAct(4 * c, 256, 1), GlobalPool(), nn.Dropout(0.1), nn.Linear(256, n))  # [B, n]


def _mv2pool(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(ConvNormAct(c, 4 * c, 1), ConvNormAct(4 * c, 4 * c, 3, groups=4 * c), GlobalPool(),  # [B, 4C]
                         nn.Linear(4 * c, 256), nn.SiLU(), nn.Dropout(0.1), nn.Linear(256, n))  # [B, n]


# name -> builder(stage-K channels, classes): the exit heads of the study
HEADS = {"pool_fc": _pool_fc, "conv192": _conv192, "mv2": _mv2, "mv2s2": _mv2s2, "mv2pool": _mv2pool}


def _check_splittable(model, after: int) -> int:
    """The number of stages; UserError when `model` has no stem/stages/final_conv/head or `after` is out of range."""
    if not all(hasattr(model, a) for a in ("stem", "stages", "final_conv", "head")):
        raise UserError(f"an exit head needs a MobileViT-style model (stem, stages, final_conv, head); "
                        f"{type(model).__name__} has no such split")
    n = len(model.stages)
    if not 1 <= int(after) < n:
        raise UserError(f"exit after stage {after}: the model has {n} stages, so the exit must be after stage "
                        f"1..{n - 1}")
    return n


class ExitBranch(nn.Module):
    """stem, stages[:after] of `model` (shared, not copied) and an exit head: x -> (exit logits, features)."""

    def __init__(self, model, after: int, head: str = DEFAULT_HEAD, num_classes: int | None = None):
        super().__init__()
        _check_splittable(model, after)
        if head not in HEADS:
            raise UserError(f"unknown exit head {head!r} (choose from: {', '.join(HEADS)})")
        self.after, self.head_name = int(after), head
        self.stem, self.stages = model.stem, model.stages[:after]
        c = _channels(self.stem, self.stages)  # stage K's output channels
        self.head = HEADS[head](c, num_classes or model.num_classes)

    def forward(self, x):
        f = self.stages(self.stem(x))  # [B, C_K, H / s_K, W / s_K]
        return self.head(f), f  # [B, classes], the features `RestBranch` continues from


class RestBranch(nn.Module):
    """stages[after:], final_conv and head of `model` (shared): stage-K features -> the model's logits."""

    def __init__(self, model, after: int):
        super().__init__()
        _check_splittable(model, after)
        self.stages, self.final_conv, self.head = model.stages[after:], model.final_conv, model.head

    def forward(self, f):
        return self.head(self.final_conv(self.stages(f)))  # [B, classes]


def _channels(stem, stages) -> int:
    with torch.no_grad():
        return int(stages(stem(torch.zeros(1, 3, 64, 64))).shape[1])


def split_model(model, after: int, head: str = DEFAULT_HEAD) -> tuple[ExitBranch, RestBranch]:
    """(ExitBranch, RestBranch) over `model`'s own modules: rest(exit(x)[1]) == model(x)."""
    return ExitBranch(model, after, head), RestBranch(model, after)


# ----------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class ExitHeadWeights:
    """An exit head's weights (safetensors) and its JSON: {"model", "after_stage", "head", "backbone_sha256",
    "train_data", "epochs", "command", ...}."""

    path: Path
    meta: dict

    @property
    def after(self) -> int:
        return int(self.meta["after_stage"])

    @property
    def head(self) -> str:
        return str(self.meta["head"])

    def load_into(self, exit_branch: ExitBranch) -> None:
        from safetensors.torch import load_file

        try:
            sd = load_file(str(self.path))
            exit_branch.head.load_state_dict({k: v.float() for k, v in sd.items()})
        except Exception as e:  # a wrong-shaped or corrupt file: one line
            raise CheckpointError(f"exit head {self.path}: cannot be loaded into head {self.head!r} after stage "
                                  f"{self.after} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    def to_manifest(self) -> dict:
        from ..checkpoint import file_sha256

        keep = ("head", "after_stage", "params", "backbone_sha256", "train_data", "epochs", "command", "loss")
        return {"path": self.path.name, "sha256": file_sha256(self.path), **{k: self.meta[k] for k in keep
                                                                             if k in self.meta}}


def read_exit_head(path) -> ExitHeadWeights:
    """An exit head's safetensors and the `<stem>.json` beside it (CheckpointError when either is missing)."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"exit head {path}: file not found")
    if not meta_path.is_file():
        raise CheckpointError(f"exit head {path}: {meta_path.name} (its after_stage, head, backbone) not found "
                              "beside it")
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["after_stage"]), str(meta["head"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"exit head {meta_path}: malformed ({type(e).__name__}: {e})") from None
    return ExitHeadWeights(path, meta)


def shipped_exit_head(model: str) -> ExitHeadWeights | None:
    """The exit head shipped for `model` (trained on its shipped weights), or None."""
    for meta_path in sorted(EXIT_HEADS_DIR.glob(f"{model}_*.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("model") == model and meta_path.with_suffix(".safetensors").is_file():
            return ExitHeadWeights(meta_path.with_suffix(".safetensors"), meta)
    return None


class DepthSplit(nn.Module):
    """The model and its two branches (sharing its modules): what a depth-cascade export captures and
    verifies against. `forward` is the whole model's (the cascade's "last stage alone")."""

    def __init__(self, model, exit_branch: ExitBranch, rest_branch: RestBranch, head: ExitHeadWeights | None = None):
        super().__init__()
        self.model, self.exit_branch, self.rest_branch = model, exit_branch, rest_branch
        self.head_weights = head
        self.deploy_cfg = getattr(model, "deploy_cfg", None)

    def forward(self, x):
        return self.model(x)  # [B, classes]


def load_depth_split(model, model_name: str, after: int, exit_head=None,
                     backbone_sha256: str | None = None) -> DepthSplit:
    """`model` split after stage `after` with trained exit-head weights: `exit_head` (a .safetensors path with
    its .json) or the head shipped for `model_name`. UserError when there is none, when it sits after another
    stage, or when it was trained on other backbone weights than `backbone_sha256` (the model's checkpoint)."""
    _check_splittable(model, after)
    hw = read_exit_head(exit_head) if exit_head is not None else shipped_exit_head(model_name)
    train = (f"python -m mobilevit_deploy.train.exit_head --model {model_name} --after {after} --data DIR "
             f"--out HEAD.safetensors")
    if hw is None:
        raise UserError(f"no exit head is shipped for {model_name}: train one ({train}) and pass --exit-head "
                        "HEAD.safetensors")
    if hw.after != int(after):
        raise UserError(f"exit head {hw.path.name} sits after stage {hw.after}, not {after}: use --cascade "
                        f"exit{hw.after}, or train one for stage {after} ({train})")
    trained_on = hw.meta.get("backbone_sha256")
    if backbone_sha256 is not None and trained_on is not None and trained_on != backbone_sha256:
        raise UserError(f"exit head {hw.path.name} was trained on other weights of {hw.meta.get('model', model_name)} "
                        f"(sha256 {trained_on[:12]}...) than these ({backbone_sha256[:12]}...): train one for them "
                        f"({train} --checkpoint CKPT)")
    model = model.eval()
    exit_b, rest_b = ExitBranch(model, after, hw.head), RestBranch(model, after)
    hw.load_into(exit_b)
    return DepthSplit(model, exit_b.eval(), rest_b.eval(), hw)
