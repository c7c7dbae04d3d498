"""CMT: Convolutional Neural Networks Meet Vision Transformers.

Paper: Jianyuan Guo, Kai Han, Han Wu, Yehui Tang, Xinghao Chen, Yunhe Wang, Chang Xu,
"CMT: Convolutional Neural Networks Meet Vision Transformers", CVPR 2022, https://arxiv.org/abs/2107.06263
Official code: https://github.com/huawei-noah/Efficient-AI-Backbones, folder `cmt_pytorch`
(`cmt.py`), which this file re-implements without timm.

Architecture (per block, Fig. 2 of the paper):
  LPU    local perception unit, x + DWConv3x3(x)
  LMHSA  lightweight multi-head self-attention: keys/values from a depthwise k x k, stride k conv
         (k = sr ratio) + BN, plus a learned relative position bias added to the attention logits
  IRFFN  inverted residual FFN: 1x1 expand (GELU, BN), x + DWConv3x3(x) (GELU, BN), 1x1 project (BN)
Stem: 3x3 s2 conv + two 3x3 convs (each conv -> GELU -> BN); 2x2 s2 patch-embedding convs (+ LN)
before each of the 4 stages; head: 1x1 conv to 1280 -> BN -> Swish -> global average pool ->
dropout -> linear.

State-dict compatibility with the official release: parameter and buffer names and shapes are the
official ones (`stem_conv1`, `patch_embed_a.proj`, `relative_pos_a`, `blocks_a.0.attn.sr.0`,
`blocks_a.0.mlp.conv1.0`, `_fc`, `_bn`, `head`, ...), so an official checkpoint trained at the same
input size (cmt_ti 160, cmt_xs 192, cmt_s 224, cmt_b 256) loads with `strict=True`. Checked against
a transcription of the official module: same keys in the same order, same shapes, same parameter
counts, and equal logits (max |diff| < 1e-6) with its weights; not against the released .pth files
(not downloaded). Deviations, none of which changes a key or the eval-mode logits:
  - no timm: `DropPath`, init and config are local; the custom-autograd `MemoryEfficientSwish` is
    `nn.SiLU` (same function, exportable); pooling is `mean((2, 3))` instead of AdaptiveAvgPool2d.
  - the unused `representation_size` / `pre_logits` option is dropped (it has no parameters when off).
  - `forward_features` returns the map after `_fc`/`_bn`/Swish, [B, 1280, H/32, W/32], before global
    pooling (the official one returns the pooled vector); `forward_head` pools and classifies.
  - the default `img_size` is the variant's own size (official `_create_cmt_model` defaults to 224 and
    its train.py passes `img_size=--input-size`).
  - `img_size` may be any size >= 32 (odd sizes and non-squares included); the official code asserts
    the exact constructed size. Token grids follow the conv arithmetic, which equals the official
    `img_size // 4 ...` grids for sizes divisible by 32. Dropout names follow timm
    (`drop_rate`, `attn_drop_rate`, `drop_path_rate`, `head_drop_rate`; official `dp`).

Relative position bias and input size: the official bias of stage s is a free learned tensor of
shape [heads, Hq * Wq, Hk * Wk] (query grid x spatially reduced key grid, standard-normal init), so
it is tied to the input size. Here it is built for the `img_size` constructor kwarg (default: the registered DeployCfg
size), e.g. `create_model('cmt_ti', img_size=96)` for a 96 px CIFAR recipe. Fed another size, the
model resizes each stage's bias on the fly (separable bicubic interpolation over the query grid and
the key grid) -- fine for evaluation, but export at the constructed size so the graph holds no
interpolation. `CMT.set_input_size(n)` resizes the learned biases permanently (fine-tuning at a new
size). Inputs below 31 px raise ValueError (a stage would have no key/value tokens).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._cfg import IMAGENET_MEAN, IMAGENET_STD, DeployCfg
from ._registry import register_model

__all__ = ["CMT", "model_cfgs"]

# Common to every variant (official cmt.py): heads per stage, key/value spatial reduction per stage.
_NUM_HEADS = (1, 2, 4, 8)
_SR_RATIOS = (8, 4, 2, 1)

# Official `cmt_*` constructors. `img_size` is the registered input size (official README --input-size).
# cmt_xs: the official code uses mlp_ratio 3.77 (hidden 196/392/784/1568), not the paper's rounded 3.8.
model_cfgs = dict(
    cmt_ti=dict(embed_dims=(46, 92, 184, 368), depths=(2, 2, 10, 2), stem_channel=16, mlp_ratio=3.6, img_size=160),
    cmt_xs=dict(embed_dims=(52, 104, 208, 416), depths=(3, 3, 12, 3), stem_channel=16, mlp_ratio=3.77, img_size=192),
    cmt_s=dict(embed_dims=(64, 128, 256, 512), depths=(3, 3, 16, 3), stem_channel=32, mlp_ratio=4.0, img_size=224),
    cmt_b=dict(
        embed_dims=(76, 152, 304, 608), depths=(4, 4, 20, 4), stem_channel=38, mlp_ratio=4.0, img_size=256,
        head_drop_rate=0.3,
    ),
)

_STAGES = "abcd"  # official attribute suffixes: patch_embed_a, relative_pos_a, blocks_a, ...


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int, float)) else (int(x[0]), int(x[1]))


def _feature_grids(img_size: tuple[int, int], sr_ratios) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per stage ((Hq, Wq), (Hk, Wk)): token grid and spatially reduced key/value grid.

    Same arithmetic as the convs: stem 3x3 s2 p1 -> ceil(n / 2); each 2x2 s2 patch embed and each
    sr x sr s=sr reduction -> floor.
    """
    h, w = (img_size[0] + 1) // 2, (img_size[1] + 1) // 2
    grids = []
    for sr in sr_ratios:
        h, w = h // 2, w // 2
        grids.append(((h, w), (h // sr, w // sr)))
    return grids


def resize_rel_pos(
    rel_pos: torch.Tensor, q_grid: tuple[int, int], k_grid: tuple[int, int],
    new_q_grid: tuple[int, int], new_k_grid: tuple[int, int],
) -> torch.Tensor:
    """Bicubic resize of a relative position bias [heads, Hq*Wq, Hk*Wk] to new query/key grids."""
    nh = rel_pos.shape[0]
    x = rel_pos
    if tuple(new_k_grid) != tuple(k_grid):
        x = x.reshape(nh, q_grid[0] * q_grid[1], k_grid[0], k_grid[1])  # [h, Nq, Hk, Wk]
        x = F.interpolate(x, size=new_k_grid, mode="bicubic", align_corners=False)  # [h, Nq, Hk', Wk']
        x = x.reshape(nh, q_grid[0] * q_grid[1], new_k_grid[0] * new_k_grid[1])  # [h, Nq, M']
    if tuple(new_q_grid) != tuple(q_grid):
        m = new_k_grid[0] * new_k_grid[1]
        x = x.permute(0, 2, 1).reshape(nh, m, q_grid[0], q_grid[1])  # [h, M', Hq, Wq]
        x = F.interpolate(x, size=new_q_grid, mode="bicubic", align_corners=False)  # [h, M', Hq', Wq']
        x = x.reshape(nh, m, new_q_grid[0] * new_q_grid[1]).permute(0, 2, 1)  # [h, Nq', M']
    return x


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole residual branch), identity in eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * mask


class IRFFN(nn.Module):
    """Inverted residual FFN. Official name `Mlp`; submodule names kept for checkpoint keys."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(dim, hidden_dim, 1), nn.GELU(), nn.BatchNorm2d(hidden_dim))
        self.proj = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim)
        self.proj_act = nn.GELU()
        self.proj_bn = nn.BatchNorm2d(hidden_dim)
        self.conv2 = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1), nn.BatchNorm2d(dim))
        self.drop = nn.Dropout(drop)

    def forward(self, x, H: int, W: int):
        B, N, C = x.shape  # [B, N, C], N = H * W
        x = x.permute(0, 2, 1).reshape(B, C, H, W)  # [B, C, H, W]
        x = self.drop(self.conv1(x))  # [B, Ch, H, W]
        x = self.proj(x) + x  # depthwise 3x3 residual, [B, Ch, H, W]
        x = self.proj_bn(self.proj_act(x))
        x = self.conv2(x)  # [B, C, H, W]
        x = x.flatten(2).permute(0, 2, 1)  # [B, N, C]
        return self.drop(x)


class LMHSA(nn.Module):
    """Lightweight MHSA: K/V from a depthwise sr x sr stride-sr conv + BN; logits + relative position bias.

    Written as explicit matmul + softmax (no F.scaled_dot_product_attention) so that ExecuTorch's
    XNNPACK partitioner delegates it. Official name `Attention`.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, qk_ratio: int = 1, sr_ratio: int = 1,
        attn_drop: float = 0.0, proj_drop: float = 0.0,
    ):
        super().__init__()
        assert dim % num_heads == 0 and (dim // qk_ratio) % num_heads == 0
        self.num_heads = num_heads
        self.qk_dim = dim // qk_ratio
        self.scale = (dim // num_heads) ** -0.5  # official: head_dim of v, also when qk_ratio > 1
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, self.qk_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, groups=dim), nn.BatchNorm2d(dim)
            )
        else:
            self.sr = nn.Identity()  # no parameters: same keys as the official (absent) module

    def forward(self, x, H: int, W: int, rel_pos):
        B, N, C = x.shape  # [B, N, C], N = H * W
        nh, dqk, dv = self.num_heads, self.qk_dim // self.num_heads, C // self.num_heads
        M = (H // self.sr_ratio) * (W // self.sr_ratio)  # key/value tokens after spatial reduction
        # 3-D bmm on [B*h, ...]: a 4-D matmul decomposes with expand_copy, which XNNPACK leaves out.
        q = self.q(x).reshape(B, N, nh, dqk).permute(0, 2, 1, 3).reshape(B * nh, N, dqk)  # [B*h, N, dqk]
        kv = self.sr(x.permute(0, 2, 1).reshape(B, C, H, W))  # [B, C, H/sr, W/sr]
        kv = kv.reshape(B, C, M).permute(0, 2, 1)  # [B, M, C]
        k = self.k(kv).reshape(B, M, nh, dqk).permute(0, 2, 3, 1).reshape(B * nh, dqk, M)  # [B*h, dqk, M]
        v = self.v(kv).reshape(B, M, nh, dv).permute(0, 2, 1, 3).reshape(B * nh, M, dv)  # [B*h, M, dv]
        attn = torch.bmm(q, k).reshape(B, nh, N, M) * self.scale + rel_pos  # [B, h, N, M] (+ bias [h, N, M])
        attn = self.attn_drop(attn.softmax(dim=-1)).reshape(B * nh, N, M)  # [B*h, N, M]
        x = torch.bmm(attn, v).reshape(B, nh, N, dv)  # [B, h, N, dv]
        x = x.permute(0, 2, 1, 3).reshape(B, N, C)  # [B, N, C]
        return self.proj_drop(self.proj(x))


class CMTBlock(nn.Module):
    """LPU -> LMHSA -> IRFFN, pre-norm residuals. Official name `Block`; `proj` is the LPU conv."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True, qk_ratio: int = 1,
        sr_ratio: int = 1, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
    ):
        super().__init__()
        # Registration order as official (LPU conv last), so state_dict keys come in the same order.
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LMHSA(dim, num_heads, qkv_bias, qk_ratio, sr_ratio, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = IRFFN(dim, int(dim * mlp_ratio), drop)
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)  # LPU

    def forward(self, x, H: int, W: int, rel_pos):
        B, N, C = x.shape  # [B, N, C]
        img = x.permute(0, 2, 1).reshape(B, C, H, W)  # [B, C, H, W]
        x = (self.proj(img) + img).flatten(2).permute(0, 2, 1)  # LPU, [B, N, C]
        x = x + self.drop_path(self.attn(self.norm1(x), H, W, rel_pos))  # [B, N, C]
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W))  # [B, N, C]
        return x


class PatchEmbed(nn.Module):
    """2x2 stride-2 conv + LayerNorm; returns tokens and the new grid."""

    def __init__(self, in_chs: int, embed_dim: int, patch_size: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)  # eps 1e-5 as official

    def forward(self, x):
        x = self.proj(x)  # [B, C, H, W]
        H, W = x.shape[2], x.shape[3]
        x = self.norm(x.flatten(2).permute(0, 2, 1))  # [B, N, C]
        return x, H, W


class CMT(nn.Module):
    """CMT backbone + classifier. Variants differ only by the arguments (see `model_cfgs`)."""

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dims=(46, 92, 184, 368),
        depths=(2, 2, 10, 2),
        num_heads=_NUM_HEADS,
        sr_ratios=_SR_RATIOS,
        mlp_ratio: float = 3.6,
        stem_channel: int = 16,
        fc_dim: int = 1280,
        qkv_bias: bool = True,
        qk_ratio: int = 1,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_drop_rate: float = 0.1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = fc_dim
        self.embed_dims = tuple(embed_dims)
        self.num_heads = tuple(num_heads)
        self.sr_ratios = tuple(sr_ratios)
        self.img_size = _pair(img_size)
        self.grids = self._check_grids(self.img_size)

        stem = stem_channel
        self.stem_conv1 = nn.Conv2d(in_chans, stem, 3, 2, 1)
        self.stem_act1 = nn.GELU()
        self.stem_norm1 = nn.BatchNorm2d(stem)
        self.stem_conv2 = nn.Conv2d(stem, stem, 3, 1, 1)
        self.stem_act2 = nn.GELU()
        self.stem_norm2 = nn.BatchNorm2d(stem)
        self.stem_conv3 = nn.Conv2d(stem, stem, 3, 1, 1)
        self.stem_act3 = nn.GELU()
        self.stem_norm3 = nn.BatchNorm2d(stem)

        # Same registration order as the official module (patch embeds, biases, blocks): same key order.
        in_chs = (stem,) + tuple(embed_dims[:-1])
        for i, s in enumerate(_STAGES):
            setattr(self, f"patch_embed_{s}", PatchEmbed(in_chs[i], embed_dims[i]))
        for i, s in enumerate(_STAGES):
            (hq, wq), (hk, wk) = self.grids[i]
            # Learned bias [heads, Hq*Wq, Hk*Wk]; the official init is a standard normal.
            setattr(self, f"relative_pos_{s}", nn.Parameter(torch.randn(num_heads[i], hq * wq, hk * wk)))
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth decay rule
        cur = 0
        for i, s in enumerate(_STAGES):
            blocks = nn.ModuleList([
                CMTBlock(
                    embed_dims[i], num_heads[i], mlp_ratio, qkv_bias=qkv_bias, qk_ratio=qk_ratio,
                    sr_ratio=sr_ratios[i], drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur + j],
                )
                for j in range(depths[i])
            ])
            setattr(self, f"blocks_{s}", blocks)
            cur += depths[i]

        self._fc = nn.Conv2d(embed_dims[-1], fc_dim, kernel_size=1)
        self._bn = nn.BatchNorm2d(fc_dim)
        self._swish = nn.SiLU()
        self._drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(fc_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_grids(self, img_size: tuple[int, int]):
        grids = _feature_grids(img_size, self.sr_ratios)
        if any(min(k) < 1 for _, k in grids):
            raise ValueError(
                f"input size {img_size[0]}x{img_size[1]} is too small for CMT: each stage needs at least one "
                f"key/value token after spatial reduction by {self.sr_ratios} (use H, W >= 32)"
            )
        return grids

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Resize the learned relative position biases (bicubic) for a new input size, in place."""
        img_size = _pair(img_size)
        new_grids = self._check_grids(img_size)
        for i, s in enumerate(_STAGES):
            old = getattr(self, f"relative_pos_{s}")
            with torch.no_grad():
                new = resize_rel_pos(old, *self.grids[i], *new_grids[i])
            setattr(self, f"relative_pos_{s}", nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))
        self.img_size, self.grids = img_size, new_grids

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f"relative_pos_{s}" for s in _STAGES}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _rel_pos(self, i: int, H: int, W: int):
        """Stage i's bias for a token grid H x W; resized when the grid differs from the built one."""
        rel_pos = getattr(self, f"relative_pos_{_STAGES[i]}")
        q_grid, k_grid = self.grids[i]
        sr = self.sr_ratios[i]
        new_k = (H // sr, W // sr)
        if min(new_k) < 1:
            raise ValueError(
                f"input too small for CMT: stage {i + 1} token grid {H}x{W} is smaller than its key/value "
                f"reduction {sr}x{sr} (use H, W >= 32)"
            )
        if (H, W) == q_grid:
            return rel_pos  # [h, N, M]
        return resize_rel_pos(rel_pos, q_grid, k_grid, (H, W), new_k)  # [h, N', M']

    def forward_features(self, x):
        # x: [B, 3, H, W]
        x = self.stem_norm1(self.stem_act1(self.stem_conv1(x)))  # [B, stem, H/2, W/2]
        x = self.stem_norm2(self.stem_act2(self.stem_conv2(x)))
        x = self.stem_norm3(self.stem_act3(self.stem_conv3(x)))
        B = x.shape[0]
        for i, s in enumerate(_STAGES):
            x, H, W = getattr(self, f"patch_embed_{s}")(x)  # [B, N, C_i], N = H*W, H = H_in / 2**(i+2)
            rel_pos = self._rel_pos(i, H, W)  # [h_i, N, N / sr_i**2]
            for blk in getattr(self, f"blocks_{s}"):
                x = blk(x, H, W, rel_pos)  # [B, N, C_i]
            x = x.permute(0, 2, 1).reshape(B, -1, H, W)  # [B, C_i, H, W]
        x = self._swish(self._bn(self._fc(x)))  # [B, fc_dim, H_in/32, W_in/32]
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3), keepdim=True).flatten(1)  # [B, fc_dim]; keepdim: XNNPACK global avg pool
        x = self._drop(x)
        return x if pre_logits else self.head(x)  # [B, num_classes]

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _deploy_cfg(variant: str) -> DeployCfg:
    # Official eval transform (datasets.py): Resize(int(256 / 224 * size), bicubic) + CenterCrop(size).
    size = model_cfgs[variant]["img_size"]
    return DeployCfg(
        input_size=(3, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bicubic"
    )


def _create_cmt(variant: str, num_classes: int = 1000, **kwargs) -> CMT:
    return CMT(num_classes=num_classes, **{**model_cfgs[variant], **kwargs})


@register_model(cfg=_deploy_cfg("cmt_ti"))
def cmt_ti(num_classes: int = 1000, **kwargs) -> CMT:
    """CMT-Ti, 160 px: 9.49 M params, 0.65 G multiply-adds (paper Table 2)."""
    return _create_cmt("cmt_ti", num_classes, **kwargs)


@register_model(cfg=_deploy_cfg("cmt_xs"))
def cmt_xs(num_classes: int = 1000, **kwargs) -> CMT:
    """CMT-XS, 192 px."""
    return _create_cmt("cmt_xs", num_classes, **kwargs)


@register_model(cfg=_deploy_cfg("cmt_s"))
def cmt_s(num_classes: int = 1000, **kwargs) -> CMT:
    """CMT-S, 224 px."""
    return _create_cmt("cmt_s", num_classes, **kwargs)


@register_model(cfg=_deploy_cfg("cmt_b"))
def cmt_b(num_classes: int = 1000, **kwargs) -> CMT:
    """CMT-B, 256 px."""
    return _create_cmt("cmt_b", num_classes, **kwargs)
