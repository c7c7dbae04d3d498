"""TNT: Transformer in Transformer.

Paper: `Transformer in Transformer` - Kai Han, An Xiao, Enhua Wu, Jianyuan Guo, Chunjing Xu,
    Yunhe Wang, NeurIPS 2021 - https://arxiv.org/abs/2103.00112
Official code: huawei-noah/Efficient-AI-Backbones, folder `tnt_pytorch` (`tnt.py`).

Each 16x16 patch is cut into 4x4 "pixels" (visual words, a 7x7 stride-4 conv over the patch): an
inner transformer (dim 24, 4 heads) runs over the 16 pixels of every patch, its output is projected
into the patch token (outer dim 384, 6 heads), and an outer transformer runs over the patches.

Architecture, parameter count (23,768,584 for tnt_s) and state-dict keys are timm's current
`tnt_s_patch16_224` (timm >= 1.0.12, non-legacy: per-patch pixel embedding, a LayerNorm over the
flattened pixels before each block's projection and one after it, the official structure), so
timm checkpoints load with `create_model(name, checkpoint=path)`. The original Huawei release uses
other names (`patch_embed`, `outer_pos`, `inner_pos` [1, 16, 24], `inner_norm1`, `outer_attn`,
`proj_norm1`, ... and a frozen, unused `outer_tokens` parameter); `checkpoint_filter_fn` maps them to
timm's, as timm's own filter does. timm's `tnt_s_legacy_patch16_224` (the first timm port: image-level
conv, one LayerNorm) is not built here.

Written for export: the per-patch unfold is two 4-D permutes (no `nn.Unfold`/im2col), attention is
explicit `bmm` + `softmax` on 3-D tensors (heads folded into the batch, see layers.py), the class
token is concatenated without `expand` at batch 1 and read with a slice.

`img_size` is a constructor argument (e.g. `img_size=64` -> 4x4 patches of 16 px); `set_input_size`
resamples `patch_pos` (bicubic) for another size. `pixel_pos` depends only on the patch size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import UserError
from ._cfg import DeployCfg
from ._registry import register_model
from .deit import resample_abs_pos_embed
from .layers import DropPath, Mlp, attention, merge_heads, split_heads

__all__ = ["TNT", "TNTCfg", "model_cfgs", "checkpoint_filter_fn"]


@dataclass(frozen=True)
class TNTCfg:
    """One TNT variant (timm's constructor arguments)."""

    patch_size: int = 16
    embed_dim: int = 384  # outer (patch) dim
    inner_dim: int = 24  # inner (pixel) dim
    depth: int = 12
    num_heads_inner: int = 4
    num_heads_outer: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    first_stride: int = 4  # pixel grid = ceil(patch / stride) per side


model_cfgs: dict[str, TNTCfg] = dict(
    tnt_s_patch16_224=TNTCfg(),
)


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int, float)) else (int(x[0]), int(x[1]))


def _deploy_cfg(**kwargs) -> DeployCfg:
    # timm's tnt pretrained cfg: 224, Inception mean/std (0.5), crop 0.9, bicubic (the Huawei release too).
    return DeployCfg(**{
        "input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.9, "interpolation": "bicubic", **kwargs})


class Attention(nn.Module):
    """TNT attention: separate `qk` (hidden_dim * 2) and `v` projections, then `proj` (timm keys)."""

    def __init__(
            self, dim: int, hidden_dim: int, num_heads: int = 8, qkv_bias: bool = False,
            attn_drop: float = 0.0, proj_drop: float = 0.0,
    ):
        super().__init__()
        if hidden_dim % num_heads or dim % num_heads:
            raise ValueError(f"dims {dim}/{hidden_dim} must be divisible by num_heads {num_heads}")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qk = nn.Linear(dim, hidden_dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        qk = split_heads(self.qk(x), 2 * h)  # [2 * heads * B, N, d]: (q heads, k heads), timm's (2, h, d) layout
        q, k = qk[:h * B], qk[h * B:]  # each [heads * B, N, d]
        v = split_heads(self.v(x), h)  # [heads * B, N, C / heads]
        x = attention(q, k, v, self.scale, attn_drop=self.attn_drop)  # [heads * B, N, C / heads]
        return self.proj_drop(self.proj(merge_heads(x, h)))  # [B, N, C]


class Block(nn.Module):
    """TNT block: inner transformer on pixels, pixels -> patch token, outer transformer on patches."""

    def __init__(
            self,
            dim: int,
            dim_out: int,
            num_pixel: int,
            num_heads_in: int = 4,
            num_heads_out: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = False,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer=nn.GELU,
            norm_layer=nn.LayerNorm,
    ):
        super().__init__()
        # inner transformer (pixel dim)
        self.norm_in = norm_layer(dim)
        self.attn_in = Attention(dim, dim, num_heads=num_heads_in, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                 proj_drop=proj_drop)
        self.norm_mlp_in = norm_layer(dim)
        self.mlp_in = Mlp(dim, int(dim * 4), dim, act_layer=act_layer, drop=proj_drop)
        # pixels of a patch -> its patch token
        self.norm1_proj = norm_layer(dim * num_pixel)
        self.proj = nn.Linear(dim * num_pixel, dim_out, bias=False)
        self.norm2_proj = norm_layer(dim_out)
        # outer transformer (patch dim)
        self.norm_out = norm_layer(dim_out)
        self.attn_out = Attention(dim_out, dim_out, num_heads=num_heads_out, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                  proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm_mlp = norm_layer(dim_out)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), dim_out, act_layer=act_layer, drop=proj_drop)

    def forward(self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pixel_embed: [B * N, P, c] (P pixels of c dims per patch), patch_embed: [B, 1 + N, C]
        pixel_embed = pixel_embed + self.drop_path(self.attn_in(self.norm_in(pixel_embed)))
        pixel_embed = pixel_embed + self.drop_path(self.mlp_in(self.norm_mlp_in(pixel_embed)))  # [B * N, P, c]
        B, N1, C = patch_embed.shape
        inner = self.norm2_proj(self.proj(self.norm1_proj(pixel_embed.reshape(B, N1 - 1, -1))))  # [B, N, C]
        patch_embed = torch.cat([patch_embed[:, 0:1], patch_embed[:, 1:] + inner], dim=1)  # [B, 1 + N, C]
        patch_embed = patch_embed + self.drop_path(self.attn_out(self.norm_out(patch_embed)))
        patch_embed = patch_embed + self.drop_path(self.mlp(self.norm_mlp(patch_embed)))
        return pixel_embed, patch_embed


class PixelEmbed(nn.Module):
    """Image -> per-patch pixel tokens: cut p x p patches, 7x7 stride-s conv on each (timm key `proj`)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, in_dim: int = 48, stride: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.in_dim = in_dim
        self.new_patch_size = math.ceil(patch_size / stride)
        self.proj = nn.Conv2d(in_chans, in_dim, kernel_size=7, padding=3, stride=stride)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B * N, C, p, p] (row-major patches, as nn.Unfold); two 4-D permutes."""
        B, C, H, W = x.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        x = x[:, :, :gh * p, :gw * p] if (H, W) != (gh * p, gw * p) else x
        x = x.reshape(B * C * gh, p, gw, p).permute(0, 2, 1, 3)  # [B * C * gh, gw, p, p]
        x = x.reshape(B, C, gh * gw, p * p).permute(0, 2, 1, 3)  # [B, N, C, p * p]
        return x.reshape(B * gh * gw, C, p, p)

    def forward(self, x: torch.Tensor, pixel_pos: torch.Tensor) -> torch.Tensor:
        x = self.patchify(x)  # [B * N, 3, p, p]
        x = self.proj(x)  # [B * N, c, p / s, p / s]
        x = x + pixel_pos  # [1, c, p / s, p / s]
        BN, c = x.shape[:2]
        return x.reshape(BN, c, -1).transpose(1, 2)  # [B * N, P, c]


class TNT(nn.Module):
    """Transformer in Transformer classifier (class token on the outer sequence)."""

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 768,
            inner_dim: int = 48,
            depth: int = 12,
            num_heads_inner: int = 4,
            num_heads_outer: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = False,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            first_stride: int = 4,
            keep_rate: float | None = None,
            keep_layers=None,
            gather: str | None = None,
    ):
        super().__init__()
        if keep_rate is not None or keep_layers is not None or gather is not None:
            raise UserError("TNT has no token reduction: keep_rate/keep_layers/gather are options of the deit_* and "
                            "augvit_* models only")
        norm_layer = nn.LayerNorm  # eps 1e-5, as timm's TNT
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.img_size = _pair(img_size)
        self.patch_size = patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        if min(self.grid_size) < 1:
            raise ValueError(f"img_size {self.img_size} is smaller than the patch size {patch_size}")
        self.num_patches = num_patches = self.grid_size[0] * self.grid_size[1]

        self.pixel_embed = PixelEmbed(patch_size, in_chans, inner_dim, first_stride)
        pp = self.pixel_embed.new_patch_size
        num_pixel = pp * pp
        self.norm1_proj = norm_layer(num_pixel * inner_dim)
        self.proj = nn.Linear(num_pixel * inner_dim, embed_dim)
        self.norm2_proj = norm_layer(embed_dim)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, pp, pp))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            Block(inner_dim, embed_dim, num_pixel, num_heads_in=num_heads_inner, num_heads_out=num_heads_outer,
                  mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        for p in (self.cls_token, self.patch_pos, self.pixel_pos):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"patch_pos", "pixel_pos", "cls_token"}

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Rebuild for another input size: resample `patch_pos` (bicubic); `pixel_pos` is per patch."""
        img_size = _pair(img_size)
        grid = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
        if min(grid) < 1:
            raise ValueError(f"img_size {img_size} is smaller than the patch size {self.patch_size}")
        with torch.no_grad():
            new = resample_abs_pos_embed(self.patch_pos.data, grid, self.grid_size, 1)
        self.patch_pos = nn.Parameter(new.contiguous(), requires_grad=self.patch_pos.requires_grad)
        self.img_size, self.grid_size, self.num_patches = img_size, grid, grid[0] * grid[1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        if (H // self.patch_size, W // self.patch_size) != self.grid_size:
            raise ValueError(
                f"input {H}x{W} does not match the model's {self.img_size[0]}x{self.img_size[1]} "
                f"(build it with img_size=, or call set_input_size)")
        pixel_embed = self.pixel_embed(x, self.pixel_pos)  # [B * N, P, c]
        patch_embed = pixel_embed.reshape(B, self.num_patches, -1)  # [B, N, P * c]
        patch_embed = self.norm2_proj(self.proj(self.norm1_proj(patch_embed)))  # [B, N, C]
        cls = self.cls_token if B == 1 else self.cls_token.expand(B, -1, -1)  # no expand op at batch 1
        patch_embed = torch.cat([cls, patch_embed], dim=1) + self.patch_pos  # [B, 1 + N, C]
        patch_embed = self.pos_drop(patch_embed)
        for blk in self.blocks:
            pixel_embed, patch_embed = blk(pixel_embed, patch_embed)
        return self.norm(patch_embed)  # [B, 1 + N, C]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        B, _, C = x.shape
        x = self.head_drop(x[:, 0:1].reshape(B, C))  # class token [B, C] (slice, not select)
        return x if pre_logits else self.head(x)  # [B, num_classes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Original Huawei (tnt_pytorch) name -> timm name, applied in this order as substring replacements
# (timm's tnt.checkpoint_filter_fn).
_HUAWEI_TO_TIMM = (
    ("outer_pos", "patch_pos"),
    ("inner_pos", "pixel_pos"),
    ("patch_embed", "pixel_embed"),
    ("proj_norm1", "norm1_proj"),
    ("proj_norm2", "norm2_proj"),
    ("inner_norm1", "norm_in"),
    ("inner_attn", "attn_in"),
    ("inner_norm2", "norm_mlp_in"),
    ("inner_mlp", "mlp_in"),
    ("outer_norm1", "norm_out"),
    ("outer_attn", "attn_out"),
    ("outer_norm2", "norm_mlp"),
    ("outer_mlp", "mlp"),
)


def is_huawei_tnt(state_dict: dict) -> bool:
    """True for a state dict laid out as the original Huawei TNT release (not timm's)."""
    return "patch_pos" not in state_dict and "outer_pos" in state_dict


def checkpoint_filter_fn(state_dict: dict, model: TNT | None = None) -> dict:
    """Map an original Huawei TNT state dict to timm's layout (timm dicts pass through).

    Drops the frozen `outer_tokens`, renames modules, reshapes `inner_pos` [1, P, c] to `pixel_pos`
    [1, c, sqrt(P), sqrt(P)]; with `model`, resamples `patch_pos` to the model's token grid.
    """
    state_dict = dict(state_dict)
    state_dict.pop("outer_tokens", None)
    if is_huawei_tnt(state_dict):
        out = {}
        for k, v in state_dict.items():
            for old, new in _HUAWEI_TO_TIMM:
                k = k.replace(old, new)
            if k == "pixel_pos" and v.dim() == 3:
                B, N, C = v.shape
                s = int(round(N ** 0.5))
                if s * s != N:
                    raise ValueError(f"inner_pos has {N} pixels, not a square grid")
                v = v.permute(0, 2, 1).reshape(B, C, s, s)
            out[k] = v
        state_dict = out
    if model is not None and "patch_pos" in state_dict and state_dict["patch_pos"].shape != model.patch_pos.shape:
        state_dict["patch_pos"] = resample_abs_pos_embed(state_dict["patch_pos"], model.grid_size, None, 1)
    return state_dict


def _create_tnt(variant: str, **kwargs) -> TNT:
    return TNT(**{**asdict(model_cfgs[variant]), **kwargs})


@register_model(cfg=_deploy_cfg())
def tnt_s_patch16_224(**kwargs) -> TNT:
    """TNT-S: 23.8 M params, 5.2 G FLOPs (paper Table 2)."""
    return _create_tnt("tnt_s_patch16_224", **kwargs)
