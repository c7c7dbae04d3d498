"""MobileViT v1

Paper: `MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer`
    - Sachin Mehta, Mohammad Rastegari, ICLR 2022 - https://arxiv.org/abs/2110.02178

Architecture, parameter counts and state-dict keys match timm's `mobilevit_xxs/xs/s` (built there by
byobnet.py, weights ported from Apple's ml-cvnets), so timm / Apple ImageNet checkpoints load with
`create_model(name, checkpoint=path)` and give the same outputs.

Written for export: attention is plain bmm + softmax (see `layers.py`), and the unfold/fold of 2x2
patches is two 4-D permutes each way (no `F.unfold`, nothing above 4-D). Any input size works; when
a MobileViT block's feature map is not a multiple of the patch size (input H or W not a multiple of
64, e.g. 96 -> 3x3 at stride 32) the block resizes it bilinearly around the transformer, exactly as
timm and ml-cvnets do.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ._cfg import DeployCfg
from ._registry import register_model
from .layers import ConvNormAct, DropPath, TransformerBlock, make_divisible

__all__ = ["MobileViT", "MobileVitBlock", "InvertedResidual", "model_cfgs", "MobileViTCfg", "StageCfg",
           "InvertedResidualCfg", "MobileVitBlockCfg"]


def _deploy_cfg(**kwargs) -> DeployCfg:
    # timm's mobilevit pretrained cfg: 256x256, no mean/std normalisation, crop 0.9, bicubic.
    return DeployCfg(**{
        "input_size": (3, 256, 256), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
        "crop_pct": 0.9, "interpolation": "bicubic", **kwargs})


# ----------------------------------------------------------------------------------------- typed configs
# Every width of the network is a field (as timm's ByoBlockCfg / ByoModelCfg, but resolved to numbers),
# so a variant with other widths -- e.g. a structurally pruned one -- is a config, built by
# `create_model(name, stages=..., num_features=...)` or `create_model(name, cfg=MobileViTCfg.from_dict(d))`.


@dataclass(frozen=True)
class InvertedResidualCfg:
    """MobileNetV2 block: 1x1 expand to `mid_chs` -> 3x3 depthwise (`stride`) -> 1x1 project to `out_chs`."""

    out_chs: int
    mid_chs: int  # expansion channels
    stride: int = 1


@dataclass(frozen=True)
class MobileVitBlockCfg:
    """MobileViT block on a stage's channels C: kxk conv (C) -> 1x1 to `dim` -> one transformer layer per
    entry of `mlp_hidden` (its MLP width) -> 1x1 back to C -> kxk fusion of [input, that] to `out_chs`."""

    dim: int  # transformer width
    mlp_hidden: tuple[int, ...]  # MLP hidden width of each transformer layer; len = number of layers
    num_heads: int = 4
    patch_size: int = 2
    out_chs: int | None = None  # fusion output; None: the block's input channels C

    @property
    def depth(self) -> int:
        return len(self.mlp_hidden)


@dataclass(frozen=True)
class StageCfg:
    """One stage: its inverted residual blocks (the first may stride), then optionally a MobileViT block."""

    blocks: tuple[InvertedResidualCfg, ...]
    vit: MobileVitBlockCfg | None = None


@dataclass(frozen=True)
class MobileViTCfg:
    """The whole architecture: stride-2 3x3 stem to `stem_chs`, the stages, 1x1 to `num_features`, head."""

    stem_chs: int
    stages: tuple[StageCfg, ...]
    num_features: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MobileViTCfg:
        def stage(s: dict) -> StageCfg:
            vit = s.get("vit")
            if vit is not None:
                vit = MobileVitBlockCfg(**{**vit, "mlp_hidden": tuple(vit["mlp_hidden"])})
            return StageCfg(tuple(InvertedResidualCfg(**b) for b in s["blocks"]), vit)

        return cls(int(d["stem_chs"]), tuple(stage(s) for s in d["stages"]), int(d["num_features"]))


def _ir_stage(in_chs: int, out_chs: int, *, d: int, s: int, br: float, vit: MobileVitBlockCfg | None = None):
    """`d` inverted residual blocks in_chs -> out_chs (the first with stride `s`), expansion `br` x the
    block's input channels (timm's `make_divisible` rounding), then `vit`."""
    ins = (in_chs,) + (out_chs,) * (d - 1)
    blocks = tuple(InvertedResidualCfg(out_chs, mid_chs=make_divisible(c * br), stride=s if j == 0 else 1)
                   for j, c in enumerate(ins))
    return StageCfg(blocks, vit)


def _vit(dim: int, depth: int, mlp_ratio: float = 2.0, num_heads: int = 4, patch_size: int = 2) -> MobileVitBlockCfg:
    return MobileVitBlockCfg(dim, (int(dim * mlp_ratio),) * depth, num_heads, patch_size)


# Paper Table 4 / timm `model_cfgs`: strides 1, 2, 2, 2, 2 after a stride-2 stem; stages 3-5 end
# with a MobileViT block.
model_cfgs: dict[str, MobileViTCfg] = dict(
    mobilevit_xxs=MobileViTCfg(16, (
        _ir_stage(16, 16, d=1, s=1, br=2.0),
        _ir_stage(16, 24, d=3, s=2, br=2.0),
        _ir_stage(24, 48, d=1, s=2, br=2.0, vit=_vit(64, depth=2)),
        _ir_stage(48, 64, d=1, s=2, br=2.0, vit=_vit(80, depth=4)),
        _ir_stage(64, 80, d=1, s=2, br=2.0, vit=_vit(96, depth=3)),
    ), num_features=320),
    mobilevit_xs=MobileViTCfg(16, (
        _ir_stage(16, 32, d=1, s=1, br=4.0),
        _ir_stage(32, 48, d=3, s=2, br=4.0),
        _ir_stage(48, 64, d=1, s=2, br=4.0, vit=_vit(96, depth=2)),
        _ir_stage(64, 80, d=1, s=2, br=4.0, vit=_vit(120, depth=4)),
        _ir_stage(80, 96, d=1, s=2, br=4.0, vit=_vit(144, depth=3)),
    ), num_features=384),
    mobilevit_s=MobileViTCfg(16, (
        _ir_stage(16, 32, d=1, s=1, br=4.0),
        _ir_stage(32, 64, d=3, s=2, br=4.0),
        _ir_stage(64, 96, d=1, s=2, br=4.0, vit=_vit(144, depth=2)),
        _ir_stage(96, 128, d=1, s=2, br=4.0, vit=_vit(192, depth=4)),
        _ir_stage(128, 160, d=1, s=2, br=4.0, vit=_vit(240, depth=3)),
    ), num_features=640),
)


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand -> 3x3 depthwise -> 1x1 linear project (+ identity).

    Keys as timm's byobnet BottleneckBlock(bottle_in=True, linear_out=True): conv1_1x1, conv2_kxk,
    conv3_1x1. The residual exists only when stride is 1 and channels are unchanged.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            exp_ratio: float = 4.0,
            kernel_size: int = 3,
            act_layer=nn.SiLU,
            drop_path: float = 0.0,
            mid_chs: int | None = None,  # expansion channels; None: make_divisible(in_chs * exp_ratio)
    ):
        super().__init__()
        mid_chs = mid_chs or make_divisible(in_chs * exp_ratio)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1, act_layer=act_layer)
        self.conv2_kxk = ConvNormAct(mid_chs, mid_chs, kernel_size, stride=stride, groups=mid_chs, act_layer=act_layer)
        self.conv3_1x1 = ConvNormAct(mid_chs, out_chs, 1, apply_act=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def zero_init_last(self):
        if self.has_skip:
            nn.init.zeros_(self.conv3_1x1.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1_1x1(x)  # [B, mid, H, W]
        x = self.conv2_kxk(x)  # [B, mid, H / s, W / s]
        x = self.conv3_1x1(x)  # [B, out, H / s, W / s]
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class MobileVitBlock(nn.Module):
    """MobileViT block: local kxk conv -> 1x1 to d -> unfold -> transformer -> fold -> 1x1 -> kxk fusion.

    Unfold groups the pixel at the same offset (i, j) of every p x p patch into one sequence, so a
    [B, d, H, W] map becomes B * p * p sequences of N = (H / p) * (W / p) tokens; attention runs
    across patches, the local conv covers pixels inside a patch.
    """

    def __init__(
            self,
            in_chs: int,
            transformer_dim: int,
            transformer_depth: int = 2,
            num_heads: int = 4,
            patch_size: int = 2,
            mlp_ratio: float = 2.0,
            kernel_size: int = 3,
            act_layer=nn.SiLU,
            norm_layer=nn.LayerNorm,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            drop_path: float = 0.0,
            mlp_hidden: Sequence[int] | None = None,  # per layer; None: transformer_depth x dim * mlp_ratio
            out_chs: int | None = None,  # fusion output; None: in_chs
    ):
        super().__init__()
        if mlp_hidden is None:
            mlp_hidden = (int(transformer_dim * mlp_ratio),) * transformer_depth
        self.conv_kxk = ConvNormAct(in_chs, in_chs, kernel_size, act_layer=act_layer)
        self.conv_1x1 = nn.Conv2d(in_chs, transformer_dim, kernel_size=1, bias=False)
        self.transformer = nn.Sequential(*[
            TransformerBlock(
                transformer_dim, num_heads=num_heads, mlp_hidden=hidden, qkv_bias=True, proj_drop=proj_drop,
                attn_drop=attn_drop, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer)
            for hidden in mlp_hidden
        ])
        self.norm = norm_layer(transformer_dim)
        self.conv_proj = ConvNormAct(transformer_dim, in_chs, 1, act_layer=act_layer)
        self.conv_fusion = ConvNormAct(2 * in_chs, out_chs or in_chs, kernel_size, act_layer=act_layer)
        self.patch_size = patch_size

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B * p * p, N, C], N = (H / p) * (W / p); two 4-D permutes."""
        B, C, H, W = x.shape
        p = self.patch_size
        nh, nw = H // p, W // p
        x = x.reshape(B, C * nh, p, W).permute(0, 2, 1, 3)  # [B, p_h, C * nh, W]
        x = x.reshape(B * p, C, nh * nw, p).permute(0, 3, 2, 1)  # [B * p_h, p_w, N, C]
        return x.reshape(B * p * p, nh * nw, C)

    def fold(self, x: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """[B * p * p, N, C] -> [B, C, H, W], the inverse of `unfold`."""
        C = x.shape[-1]
        p = self.patch_size
        nh, nw = H // p, W // p
        x = x.reshape(B * p, p, nh * nw, C).permute(0, 3, 2, 1)  # [B * p_h, C, N, p_w]
        x = x.reshape(B, p, C * nh, W).permute(0, 2, 1, 3)  # [B, C * nh, p_h, W]
        return x.reshape(B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x  # [B, C_in, H, W]

        # local representation
        x = self.conv_kxk(x)  # [B, C_in, H, W]
        x = self.conv_1x1(x)  # [B, d, H, W]

        # resize to a multiple of the patch size if needed (static under torch.export)
        B, _, H, W = x.shape
        p = self.patch_size
        new_h, new_w = math.ceil(H / p) * p, math.ceil(W / p) * p
        resize = (new_h, new_w) != (H, W)
        if resize:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)

        # global representation over patches
        x = self.unfold(x)  # [B * p * p, N, d]
        x = self.transformer(x)  # [B * p * p, N, d]
        x = self.norm(x)
        x = self.fold(x, B, new_h, new_w)  # [B, d, new_h, new_w]
        if resize:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)

        # fusion with the block input
        x = self.conv_proj(x)  # [B, C_in, H, W]
        x = self.conv_fusion(torch.cat((shortcut, x), dim=1))  # [B, 2 * C_in, H, W] -> [B, C_in, H, W]
        return x


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> Linear (key `fc`, as timm's ClassifierHead)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3), keepdim=True).flatten(1)  # [B, C, H, W] -> [B, C]
        x = self.drop(x)
        return x if pre_logits else self.fc(x)  # [B, num_classes]


class MobileViT(nn.Module):
    """MobileViT v1: stem -> 5 stages (MobileNetV2 blocks, MobileViT blocks in stages 3-5) -> 1x1 -> head.

    Built from a `MobileViTCfg` (every width explicit); `self.arch_cfg` is the config it was built from.
    """

    def __init__(
            self,
            cfg: MobileViTCfg,
            num_classes: int = 1000,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            act_layer=nn.SiLU,
            zero_init_last: bool = True,
    ):
        super().__init__()
        self.arch_cfg = cfg
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = ConvNormAct(in_chans, cfg.stem_chs, 3, stride=2, act_layer=act_layer)

        # stochastic depth rises linearly over all blocks (a MobileViT block counts as one), as timm
        n_blocks = [len(st.blocks) + (st.vit is not None) for st in cfg.stages]
        dpr = torch.linspace(0, drop_path_rate, sum(n_blocks)).split(n_blocks)
        stages = []
        prev = cfg.stem_chs
        for st, rates in zip(cfg.stages, dpr):
            blocks = []
            for b, rate in zip(st.blocks, rates):
                blocks.append(InvertedResidual(prev, b.out_chs, stride=b.stride, mid_chs=b.mid_chs, act_layer=act_layer,
                                               drop_path=float(rate)))
                prev = b.out_chs
            if st.vit is not None:
                v = st.vit
                blocks.append(MobileVitBlock(
                    prev, v.dim, num_heads=v.num_heads, patch_size=v.patch_size, mlp_hidden=v.mlp_hidden,
                    out_chs=v.out_chs, act_layer=act_layer, drop_path=float(rates[-1])))
                prev = v.out_chs or prev
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.patch_size = cfg.stages[-1].vit.patch_size if cfg.stages and cfg.stages[-1].vit else 2
        self.final_conv = ConvNormAct(prev, cfg.num_features, 1, act_layer=act_layer)
        self.num_features = self.head_hidden_size = cfg.num_features
        self.head = ClassifierHead(cfg.num_features, num_classes, drop_rate)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool):
        # timm byobnet `_init_weights`: conv fan-out normal, linear N(0, 0.01), BN 1/0, zero last BN of residuals
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, InvertedResidual):
                    m.zero_init_last()

    def reset_classifier(self, num_classes: int):
        """Replace the classifier (e.g. ImageNet weights -> CIFAR-10 fine-tuning)."""
        self.num_classes = num_classes
        self.head = ClassifierHead(self.num_features, num_classes, self.drop_rate)
        if num_classes > 0:
            nn.init.normal_(self.head.fc.weight, 0, 0.01)
            nn.init.zeros_(self.head.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # [B, stem_chs, H / 2, W / 2]
        x = self.stages(x)  # [B, chs[-1], H / 32, W / 32]
        return self.final_conv(x)  # [B, num_features, H / 32, W / 32]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)  # [B, num_classes] (or [B, num_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)  # [B, num_features, H / 32, W / 32]
        return self.forward_head(x)  # [B, num_classes]


_ARCH_FIELDS = {f.name for f in fields(MobileViTCfg)}


def _create_mobilevit(variant: str, cfg: MobileViTCfg | dict | None = None, **kwargs) -> MobileViT:
    """The variant's config, or `cfg` (a MobileViTCfg or its dict), with architecture fields in `kwargs`
    (stem_chs, stages, num_features) replaced; the other kwargs go to MobileViT."""
    arch = model_cfgs[variant] if cfg is None else (MobileViTCfg.from_dict(cfg) if isinstance(cfg, dict) else cfg)
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _ARCH_FIELDS}
    if overrides:
        stages = overrides.get("stages")
        if isinstance(stages, (list, tuple)) and stages and isinstance(stages[0], dict):  # dict form
            overrides["stages"] = MobileViTCfg.from_dict({**arch.to_dict(), "stages": stages}).stages
        arch = replace(arch, **overrides)
    return MobileViT(arch, **kwargs)


@register_model(cfg=_deploy_cfg())
def mobilevit_xxs(**kwargs) -> MobileViT:
    return _create_mobilevit("mobilevit_xxs", **kwargs)


@register_model(cfg=_deploy_cfg())
def mobilevit_xs(**kwargs) -> MobileViT:
    return _create_mobilevit("mobilevit_xs", **kwargs)


@register_model(cfg=_deploy_cfg())
def mobilevit_s(**kwargs) -> MobileViT:
    return _create_mobilevit("mobilevit_s", **kwargs)
