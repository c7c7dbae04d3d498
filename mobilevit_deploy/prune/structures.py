"""The prunable structures of MobileViT: which units exist, and which weight slices each unit owns.

A *group* is one place in the network whose size can shrink, made of interchangeable *units*:

  kind         where (module path)                 unit                     granularity   min kept
  mv2_hidden   an inverted residual (MV2) block   one expansion channel    8 channels    8
  vit_width    a MobileViT block                  one transformer channel  8 channels    16
  heads        a transformer layer's attention    one attention head       1 head        1
  mlp_hidden   a transformer layer's MLP          one hidden unit          8 units       8
  layers       a MobileViT block                  one transformer layer    1 layer       1
  ffn_hidden   a CMT block's IRFFN                one hidden channel       8 channels    8
               (conv1 out + BN, depthwise proj + proj_bn, conv2 in; CMT's LMHSA heads are not prunable
               here: the relative position bias is one parameter per stage, shared by its blocks)
  attn_conv    a MobileViT block                  one layer's attention    1 layer       0
               (SPViT: the attention is turned into a ConvAttention, prune/modules.py; not in KINDS,
               scored only by `spvit`)

`vit_width` is the residual stream of the block's transformer: conv_1x1's output channels, every
layer's norm1 / qkv input / proj output / norm2 / fc1 input / fc2 output, the final norm and
conv_proj's input. The unfold/fold only move pixels between the batch and token axes, so a channel
keeps its index through them. A head's units are its rows in q, k and v of the fused qkv and its
columns of proj; the attention inner width (heads * head_dim) is independent of vit_width, and the
attention `scale` (softmax temperature) is never recomputed.

`couplings(model, group)` lists, for every weight that a unit of the group owns a slice of, the
module, its role and the unit of each index along the sliced axis. Importance scoring
(importance.py) and the removal itself (surgery.py) both work from that one list, so what is scored
is exactly what is removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modules import is_conv_attention

KINDS = ("mv2_hidden", "vit_width", "heads", "mlp_hidden", "layers", "ffn_hidden")
ALL_KINDS = KINDS + ("attn_conv",)  # attn_conv: an attention layer turned into a convolution (spvit)
STEP = {"mv2_hidden": 8, "vit_width": 8, "heads": 1, "mlp_hidden": 8, "layers": 1, "attn_conv": 1, "ffn_hidden": 8}
MIN_KEEP = {"mv2_hidden": 8, "vit_width": 16, "heads": 1, "mlp_hidden": 8, "layers": 1, "attn_conv": 0,
            "ffn_hidden": 8}


@dataclass(frozen=True)
class Group:
    """One prunable place: `id` is `kind:path` (stable while a plan is computed and applied)."""

    kind: str
    path: str  # the module owning the group (MV2 block, MobileViT block, attention, MLP)
    size: int  # current number of units

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.path}"

    @property
    def step(self) -> int:
        return STEP[self.kind]

    @property
    def min_keep(self) -> int:
        return min(MIN_KEEP[self.kind], self.size)

    @property
    def block(self) -> str:
        """Path of the MV2 / MobileViT block the group belongs to."""
        return self.path.split(".transformer.")[0]


@dataclass(frozen=True)
class Coupling:
    """`module` (a Conv2d, Linear, BatchNorm2d or LayerNorm at `path`) is sliced along `role`:
    "out" (output channels: weight dim 0, bias, norm stats), "in" (weight dim 1) or "norm" (a
    norm's per-channel parameters). `unit_of[i]` is the unit owning index i along that axis."""

    path: str
    module: nn.Module
    role: str
    unit_of: torch.Tensor


# ------------------------------------------------------------------------------------- detection
def is_mv2(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv1_1x1", "conv2_kxk", "conv3_1x1"))


def is_mobilevit_block(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv_1x1", "transformer", "norm", "conv_proj", "unfold", "fold"))


def is_irffn(m: nn.Module) -> bool:
    """CMT's inverted residual FFN (models/cmt.py IRFFN: conv1 = [1x1 conv, GELU, BN], proj, proj_bn, conv2)."""
    return all(hasattr(m, a) for a in ("conv1", "proj", "proj_act", "proj_bn", "conv2"))


def is_mobilevit(model: nn.Module) -> bool:
    return any(is_mobilevit_block(m) for m in model.modules())


def check_supported(model: nn.Module, name: str | None = None) -> None:
    from ..errors import UserError

    if not any(is_mobilevit_block(m) or is_irffn(m) for m in model.modules()):
        raise UserError(f"pruning supports MobileViT (mobilevit_xxs/xs/s) and CMT (IRFFN hidden channels); "
                        f"{name or type(model).__name__} has neither MobileViT blocks nor IRFFNs")


def _sub(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


# --------------------------------------------------------------------------------------- groups
def groups(model: nn.Module, kinds=KINDS) -> list[Group]:
    """Every prunable group of `model`, in module order."""
    out = []
    for path, m in model.named_modules():
        if is_mv2(m) and "mv2_hidden" in kinds:
            out.append(Group("mv2_hidden", path, m.conv1_1x1.conv.out_channels))
        elif is_irffn(m) and "ffn_hidden" in kinds:
            out.append(Group("ffn_hidden", path, m.conv1[0].out_channels))
        elif is_mobilevit_block(m):
            if "vit_width" in kinds:
                out.append(Group("vit_width", path, m.conv_1x1.out_channels))
            for i, layer in enumerate(m.transformer):
                lp = f"{path}.transformer.{i}"
                if "heads" in kinds and not is_conv_attention(layer.attn):
                    out.append(Group("heads", f"{lp}.attn", layer.attn.num_heads))
                if "mlp_hidden" in kinds:
                    out.append(Group("mlp_hidden", f"{lp}.mlp", layer.mlp.fc1.out_features))
            if "layers" in kinds:
                out.append(Group("layers", path, len(m.transformer)))
            if "attn_conv" in kinds:
                out.append(Group("attn_conv", path, len(m.transformer)))
    return out


def group_by_id(model: nn.Module, gid: str) -> Group:
    for g in groups(model):
        if g.id == gid:
            return g
    from ..errors import UserError

    raise UserError(f"no prunable group {gid!r} in this model")


def _ar(n: int) -> torch.Tensor:
    return torch.arange(n)


def couplings(model: nn.Module, group: Group) -> list[Coupling]:
    """The weight slices owned by the units of `group` (not for `layers`: a layer owns whole modules)."""
    m = _sub(model, group.path)
    k = group.kind
    if k == "mv2_hidden":
        n = m.conv1_1x1.conv.out_channels
        p = group.path
        return [Coupling(f"{p}.conv1_1x1.conv", m.conv1_1x1.conv, "out", _ar(n)),
                Coupling(f"{p}.conv1_1x1.bn", m.conv1_1x1.bn, "norm", _ar(n)),
                Coupling(f"{p}.conv2_kxk.conv", m.conv2_kxk.conv, "out", _ar(n)),  # depthwise: in follows out
                Coupling(f"{p}.conv2_kxk.bn", m.conv2_kxk.bn, "norm", _ar(n)),
                Coupling(f"{p}.conv3_1x1.conv", m.conv3_1x1.conv, "in", _ar(n))]
    if k == "vit_width":
        n = m.conv_1x1.out_channels
        p = group.path
        cs = [Coupling(f"{p}.conv_1x1", m.conv_1x1, "out", _ar(n))]
        for i, layer in enumerate(m.transformer):
            lp = f"{p}.transformer.{i}"
            a_in = ("v", layer.attn.v) if is_conv_attention(layer.attn) else ("qkv", layer.attn.qkv)
            cs += [Coupling(f"{lp}.norm1", layer.norm1, "norm", _ar(n)),
                   Coupling(f"{lp}.attn.{a_in[0]}", a_in[1], "in", _ar(n)),
                   Coupling(f"{lp}.attn.proj", layer.attn.proj, "out", _ar(n)),
                   Coupling(f"{lp}.norm2", layer.norm2, "norm", _ar(n)),
                   Coupling(f"{lp}.mlp.fc1", layer.mlp.fc1, "in", _ar(n)),
                   Coupling(f"{lp}.mlp.fc2", layer.mlp.fc2, "out", _ar(n))]
        cs += [Coupling(f"{p}.norm", m.norm, "norm", _ar(n)),
               Coupling(f"{p}.conv_proj.conv", m.conv_proj.conv, "in", _ar(n))]
        return cs
    if k == "heads":
        h, e = m.num_heads, m.head_dim
        # fused qkv rows: [q heads | k heads | v heads], each head_dim long (layers.split_heads)
        qkv_units = (_ar(3 * h * e) // e) % h
        return [Coupling(f"{group.path}.qkv", m.qkv, "out", qkv_units),
                Coupling(f"{group.path}.proj", m.proj, "in", _ar(h * e) // e)]
    if k == "ffn_hidden":
        n = m.conv1[0].out_channels
        p = group.path
        return [Coupling(f"{p}.conv1.0", m.conv1[0], "out", _ar(n)),
                Coupling(f"{p}.conv1.2", m.conv1[2], "norm", _ar(n)),
                Coupling(f"{p}.proj", m.proj, "out", _ar(n)),  # depthwise: in follows out
                Coupling(f"{p}.proj_bn", m.proj_bn, "norm", _ar(n)),
                Coupling(f"{p}.conv2.0", m.conv2[0], "in", _ar(n))]
    if k == "mlp_hidden":
        n = m.fc1.out_features
        return [Coupling(f"{group.path}.fc1", m.fc1, "out", _ar(n)),
                Coupling(f"{group.path}.fc2", m.fc2, "in", _ar(n))]
    raise ValueError(f"couplings: {k} has no channel couplings")


def layer_modules(model: nn.Module, group: Group) -> list[nn.Module]:
    """`layers` group: the transformer layer modules (unit i = layer i)."""
    return list(_sub(model, group.path).transformer)


def coupled_tensors(c: Coupling) -> list[tuple[torch.Tensor, int]]:
    """(tensor, axis) pairs of a coupling: the parameters sliced along the unit axis."""
    mod, role = c.module, c.role
    out = []
    if role == "out":
        out.append((mod.weight, 0))
        if getattr(mod, "bias", None) is not None:
            out.append((mod.bias, 0))
    elif role == "in":
        out.append((mod.weight, 1))
    elif role == "norm":
        if getattr(mod, "weight", None) is not None:
            out.append((mod.weight, 0))
        if getattr(mod, "bias", None) is not None:
            out.append((mod.bias, 0))
    return out
