"""DeiT: Data-efficient image Transformers (plain ViT), with optional EViT-style static token reduction.

Paper: `Training data-efficient image transformers & distillation through attention`
    - Hugo Touvron, Matthieu Cord, Matthijs Douze, Francisco Massa, Alexandre Sablayrolles,
      Hervé Jégou, ICML 2021 - https://arxiv.org/abs/2012.12877
Token reduction: `Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations` (EViT) - Youwei Liang et al., ICLR 2022 - https://arxiv.org/abs/2202.07800

Architecture, parameter counts and state-dict keys are timm's `vision_transformer.VisionTransformer`
(and `deit.VisionTransformerDistilled`) for `deit_tiny/small[_distilled]_patch16_224`: `cls_token`,
`pos_embed`, [`dist_token`], `patch_embed.proj`, `blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 /
mlp.fc1 / mlp.fc2`, `norm`, `head`, [`head_dist`]. The original facebookresearch/deit checkpoints use
the same names, so timm and FB checkpoints load with `create_model(name, checkpoint=path)`.

Written for export (see layers.py): attention is explicit `bmm` + `softmax` on 3-D tensors, the
class token is concatenated without `expand` at batch 1, and the head reads token 0 with a slice.

`img_size` (and `patch_size`) are constructor arguments, e.g. `create_model("deit_tiny_patch16_224",
img_size=32, patch_size=4)` for a 64-token CPU study. `set_input_size(n)` resamples `pos_embed`
(bicubic, as timm's `resample_abs_pos_embed`) for another input size.

Static token reduction (EViT, `keep_rate < 1`): after the attention of each layer in `keep_layers`
(0-based; default (3, 6, 9) = EViT's layers 4, 7, 10), the patch tokens are ranked by the class
token's attention to them (mean over heads); the top `ceil(keep_rate * M)` are kept (in descending
attention order) and the others are fused into one token, their sum weighted by that attention; the
MLP then runs on [prefix tokens, kept, fused]. Token counts are fixed at construction, so every shape
is static. Two formulations of the selection (same outputs; see `TokenReducer`):
  gather="topk"    torch.topk + torch.gather (the textbook one; not in XNNPACK's delegate set)
  gather="onehot"  ranks by pairwise comparison (elementwise ops + a GEMM) and a one-hot selection
                   matrix applied with bmm: every op is one XNNPACK delegates.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, choices_error
from ._cfg import IMAGENET_MEAN, IMAGENET_STD, DeployCfg
from ._registry import register_model
from .layers import Attention as _Attention
from .layers import TransformerBlock, merge_heads, split_heads

__all__ = ["VisionTransformer", "ViTCfg", "TokenReducer", "Block", "model_cfgs", "resample_abs_pos_embed",
           "token_schedule", "GATHER_MODES"]

GATHER_MODES = ("topk", "onehot")


@dataclass(frozen=True)
class ViTCfg:
    """One plain-ViT variant (timm's constructor arguments)."""

    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    distilled: bool = False  # DeiT distillation token + head_dist


model_cfgs: dict[str, ViTCfg] = dict(
    deit_tiny_patch16_224=ViTCfg(embed_dim=192, num_heads=3),
    deit_small_patch16_224=ViTCfg(embed_dim=384, num_heads=6),
    deit_tiny_distilled_patch16_224=ViTCfg(embed_dim=192, num_heads=3, distilled=True),
    deit_small_distilled_patch16_224=ViTCfg(embed_dim=384, num_heads=6, distilled=True),
)


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int, float)) else (int(x[0]), int(x[1]))


def _deploy_cfg(**kwargs) -> DeployCfg:
    # timm's deit pretrained cfg: 224, ImageNet mean/std, crop 0.875, bicubic.
    return DeployCfg(**{
        "input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "crop_pct": 0.875, "interpolation": "bicubic", **kwargs})


def resample_abs_pos_embed(
        posemb: torch.Tensor,
        new_size: Sequence[int],
        old_size: Sequence[int] | None = None,
        num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """[1, P + Ho*Wo, C] -> [1, P + Hn*Wn, C]: bicubic (antialiased) resize of the grid part, as timm."""
    new_size = _pair(new_size)
    n_grid = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        s = int(math.sqrt(n_grid))
        old_size = (s, s)
    old_size = _pair(old_size)
    if old_size[0] * old_size[1] != n_grid:
        raise ValueError(f"pos_embed has {n_grid} grid tokens, not {old_size[0]}x{old_size[1]}")
    if tuple(new_size) == tuple(old_size):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    C = posemb.shape[-1]
    grid = grid.reshape(1, old_size[0], old_size[1], C).permute(0, 3, 1, 2).float()  # [1, C, Ho, Wo]
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], C).to(posemb.dtype)  # [1, Hn*Wn, C]
    return torch.cat([prefix, grid], dim=1)


def check_keep_rate(keep_rate) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < float(keep_rate) <= 1.0:
        raise UserError(f"keep_rate must be a number in (0, 1] (1 = no token reduction, e.g. 0.7), got {keep_rate!r}")
    return float(keep_rate)


def token_schedule(num_patches: int, depth: int, keep_rate: float, keep_layers: Sequence[int]) -> list[tuple[int, int]]:
    """Per layer (patch tokens in, patch tokens kept before its MLP); kept == in means no reduction.

    EViT: a reducing layer keeps ceil(keep_rate * M) of its M patch tokens and appends one fused token,
    which later layers treat as a patch token.
    """
    out, m = [], num_patches
    for i in range(depth):
        k = math.ceil(keep_rate * m) if i in keep_layers else m
        if k >= m:
            out.append((m, m))
        else:
            out.append((m, k))
            m = k + 1
    return out


class Attention(_Attention):
    """layers.Attention (timm keys qkv, proj) that can also return the class token's attention."""

    def forward(
            self, x: torch.Tensor, need_cls_attn: bool = False, num_prefix_tokens: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        h = self.num_heads
        qkv = split_heads(self.qkv(x), 3 * h)  # [3 * heads * B, N, d], (q heads, k heads, v heads)
        q, k, v = qkv[:h * B], qkv[h * B:2 * h * B], qkv[2 * h * B:]  # each [heads * B, N, d]
        attn = torch.bmm(q * self.scale, k.transpose(1, 2)).softmax(dim=-1)  # [heads * B, N, N]
        cls_attn = None
        if need_cls_attn:
            row = attn[:, 0:1, num_prefix_tokens:]  # [heads * B, 1, M]: class token -> patch tokens
            cls_attn = row[0:B]
            for i in range(1, h):  # mean over heads as slices + adds (no reduction op to delegate)
                cls_attn = cls_attn + row[i * B:(i + 1) * B]
            cls_attn = cls_attn * (1.0 / h)  # [B, 1, M]
        x = torch.bmm(self.attn_drop(attn), v)  # [heads * B, N, d]
        x = self.proj_drop(self.proj(merge_heads(x, h)))  # [B, N, C]
        return x, cls_attn


class TokenReducer(nn.Module):
    """EViT token reorganisation with static sizes: [prefix, M patch tokens] -> [prefix, k kept, 1 fused].

    Kept tokens come in descending order of the class attention `a` (ties: lower index first); the
    fused token is sum_i a_i x_i over the M - k others (EViT's `fuse_token=True`, weights not
    renormalised). `gather="topk"` uses torch.topk + torch.gather; `gather="onehot"` computes
      rank_i = sum_j [a_j > a_i] + [a_j == a_i][j < i]       ([a_j > a_i] = ceil(clamp(a_j - a_i, 0, 1)))
      S[p, i] = relu(1 - (rank_i - p)^2)   (one-hot, p < k)   kept = S @ x,   fused = (a * [rank >= k]) @ x
    with elementwise ops, bmm and constant buffers only. Both are exact on the kept tokens (a one-hot
    GEMM copies); the fused token differs only by summation order. No parameters, no state-dict keys.
    """

    def __init__(self, num_tokens: int, keep: int, num_prefix_tokens: int = 1, gather: str = "onehot"):
        super().__init__()
        if gather not in GATHER_MODES:
            raise choices_error("gather", gather, GATHER_MODES)
        if not 1 <= keep < num_tokens:
            raise ValueError(f"keep must be in [1, {num_tokens}), got {keep}")
        self.num_tokens, self.keep, self.num_prefix_tokens, self.gather = num_tokens, keep, num_prefix_tokens, gather
        M = num_tokens
        # [i, j] = 1 where j < i: ties are broken by index, as a stable sort
        self.register_buffer("tie_before", torch.ones(M, M).tril(-1), persistent=False)
        self.register_buffer("ones", torch.ones(1, M), persistent=False)  # row-sum weights of a Linear
        self.register_buffer("positions", torch.arange(keep, dtype=torch.float32).reshape(keep, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"tokens={self.num_tokens}, keep={self.keep}, prefix={self.num_prefix_tokens}, gather={self.gather!r}"

    def ranks(self, cls_attn: torch.Tensor) -> torch.Tensor:
        """[B, 1, M] attention -> [B, 1, M] float ranks (0 = most attended), via pairwise comparison."""
        a_j = cls_attn  # [B, 1, M]
        a_i = cls_attn.transpose(1, 2)  # [B, M, 1]
        gt = torch.ceil(torch.clamp(a_j - a_i, 0.0, 1.0))  # [B, M, M]: [i, j] = [a_j > a_i], exact 0/1
        eq = 1.0 - (gt + gt.transpose(1, 2))  # [a_j == a_i]
        before = gt + eq * self.tie_before  # j is ranked before i
        return F.linear(before, self.ones).transpose(1, 2)  # [B, 1, M]: row sums as a GEMM (static weight)

    def forward(self, x: torch.Tensor, cls_attn: torch.Tensor) -> torch.Tensor:
        # x: [B, P + M, C], cls_attn: [B, 1, M] -> [B, P + k + 1, C]
        B, N, C = x.shape
        P, M, k = self.num_prefix_tokens, self.num_tokens, self.keep
        if N != P + M:
            raise ValueError(f"TokenReducer built for {P}+{M} tokens, got {N}")
        prefix, tokens = x[:, :P], x[:, P:]  # [B, P, C], [B, M, C]
        if self.gather == "topk":
            a = cls_attn.reshape(B, M)
            _, order = torch.topk(a, M, dim=1, largest=True, sorted=True)  # [B, M], descending
            keep_idx, rest_idx = order[:, :k], order[:, k:]
            kept = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(B, k, C))  # [B, k, C]
            rest = torch.gather(tokens, 1, rest_idx.unsqueeze(-1).expand(B, M - k, C))  # [B, M - k, C]
            w = torch.gather(a, 1, rest_idx)  # [B, M - k]
            fused = (rest * w.unsqueeze(-1)).sum(dim=1, keepdim=True)  # [B, 1, C]
        else:
            rank = self.ranks(cls_attn)  # [B, 1, M]
            d = rank - self.positions  # [B, k, M]
            select = torch.relu(1.0 - d * d)  # [B, k, M], one-hot rows: S[p, i] = [rank_i == p]
            kept = torch.bmm(select, tokens)  # [B, k, C]
            rest = torch.clamp(rank - float(k - 1), 0.0, 1.0)  # [B, 1, M]: [rank_i >= k] (float scalar: no cast op)
            fused = torch.bmm(cls_attn * rest, tokens)  # [B, 1, C]
        return torch.cat([prefix, kept, fused], dim=1)


class Block(TransformerBlock):
    """Pre-norm ViT block (timm keys norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), optionally
    reducing tokens (EViT) between the attention and the MLP. The layers are layers.TransformerBlock's; the
    attention is this file's, which can also return the class token's attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            reducer: TokenReducer | None = None,
    ):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path, act_layer, norm_layer)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.reducer = reducer

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(attention branch on norm1(x), class attention [B, 1, M] if this block reduces tokens)."""
        P = self.reducer.num_prefix_tokens if self.reducer is not None else 1
        return self.attn(self.norm1(x), need_cls_attn=self.reducer is not None, num_prefix_tokens=P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, C] -> [B, N', C] (N' = N unless this block reduces tokens)
        y, cls_attn = self.attend(x)
        x = x + self.drop_path1(y)
        if self.reducer is not None:
            x = self.reducer(x, cls_attn)  # [B, P + k + 1, C]
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (timm key `proj`)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, C, H / p, W / p]
        return x.flatten(2).transpose(1, 2)  # [B, N, C]


class VisionTransformer(nn.Module):
    """Plain ViT / DeiT classifier (class token, [distillation token], learned absolute positions)."""

    block_cls = Block

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            distilled: bool = False,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            keep_rate: float = 1.0,
            keep_layers: Sequence[int] = (3, 6, 9),
            gather: str = "onehot",
            **block_kwargs,
    ):
        super().__init__()
        keep_rate = check_keep_rate(keep_rate)
        if gather not in GATHER_MODES:
            raise choices_error("gather", gather, GATHER_MODES)
        keep_layers = tuple(int(i) for i in keep_layers)
        bad = [i for i in keep_layers if not 0 <= i < depth]
        if bad and keep_rate < 1.0:
            raise UserError(f"keep_layers must be block indices in 0..{depth - 1}, got {list(keep_layers)}")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.distilled_training = False  # training returns (head, head_dist) logits when set
        self.keep_rate, self.keep_layers, self.gather = keep_rate, keep_layers, gather
        self.img_size = _pair(img_size)
        self.patch_size = patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        if min(self.grid_size) < 1:
            raise ValueError(f"img_size {self.img_size} is smaller than the patch size {patch_size}")
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        norm_layer = block_kwargs.pop("norm_layer", None) or (lambda d: nn.LayerNorm(d, eps=1e-6))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        self.blocks = nn.Sequential(*[
            self.block_cls(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)
        ])
        self._build_reducers(num_patches)
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _build_reducers(self, num_patches: int):
        sched = token_schedule(num_patches, len(self.blocks), self.keep_rate, self.keep_layers)
        for blk, (m, k) in zip(self.blocks, sched):
            blk.reducer = TokenReducer(m, k, self.num_prefix_tokens, self.gather) if k < m else None
        # patch tokens entering each block, then leaving the last one
        self.token_counts = [m for m, _ in sched] + [sched[-1][1] + 1 if sched[-1][1] < sched[-1][0] else sched[-1][0]]

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}

    def set_distilled_training(self, enable: bool = True):
        self.distilled_training = enable

    def get_classifier(self):
        return (self.head, self.head_dist) if self.distilled else self.head

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.distilled:
            self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Rebuild for another input size: resample `pos_embed` (bicubic) and the token reducers."""
        img_size = _pair(img_size)
        grid = (img_size[0] // self.patch_size, img_size[1] // self.patch_size)
        if min(grid) < 1:
            raise ValueError(f"img_size {img_size} is smaller than the patch size {self.patch_size}")
        with torch.no_grad():
            new = resample_abs_pos_embed(self.pos_embed.data, grid, self.grid_size, self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(new.contiguous(), requires_grad=self.pos_embed.requires_grad)
        self.img_size, self.grid_size = img_size, grid
        self._build_reducers(grid[0] * grid[1])

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        if B != 1:  # at batch 1 (what is exported) no expand op: XNNPACK does not delegate expand_copy
            prefix = [t.expand(B, -1, -1) for t in prefix]
        x = torch.cat(prefix + [x], dim=1)  # [B, P + N, C]
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if (H // self.patch_size, W // self.patch_size) != self.grid_size:
            raise ValueError(
                f"input {H}x{W} does not match the model's {self.img_size[0]}x{self.img_size[1]} "
                f"(build it with img_size=, or call set_input_size)")
        x = self.patch_embed(x)  # [B, N, C], N = (H / p) * (W / p)
        x = self._pos_embed(x)  # [B, P + N, C]
        x = self.blocks(x)  # [B, P + N', C] (N' < N with token reduction)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        B, _, C = x.shape
        cls = self.head_drop(x[:, 0:1].reshape(B, C))  # [B, C]; a slice, not a select (delegated)
        if not self.distilled:
            return cls if pre_logits else self.head(cls)  # [B, num_classes]
        dist = self.head_drop(x[:, 1:2].reshape(B, C))
        if pre_logits:
            return (cls + dist) / 2
        cls, dist = self.head(cls), self.head_dist(dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return cls, dist  # (class-token logits, distillation logits) for the distillation loss
        return (cls + dist) / 2  # inference: average of both heads, as timm / DeiT

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)  # [B, P + N', C]
        return self.forward_head(x)  # [B, num_classes]


def _create_deit(variant: str, **kwargs) -> VisionTransformer:
    return VisionTransformer(**{**asdict(model_cfgs[variant]), **kwargs})


@register_model(cfg=_deploy_cfg())
def deit_tiny_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT-Ti: 5.7 M params, 1.3 G FLOPs (paper Table 1)."""
    return _create_deit("deit_tiny_patch16_224", **kwargs)


@register_model(cfg=_deploy_cfg())
def deit_small_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT-S: 22 M params, 4.6 G FLOPs (paper Table 1)."""
    return _create_deit("deit_small_patch16_224", **kwargs)


@register_model(cfg=_deploy_cfg())
def deit_tiny_distilled_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT-Ti with a distillation token (DeiT-Ti⚗)."""
    return _create_deit("deit_tiny_distilled_patch16_224", **kwargs)


@register_model(cfg=_deploy_cfg())
def deit_small_distilled_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT-S with a distillation token (DeiT-S⚗)."""
    return _create_deit("deit_small_distilled_patch16_224", **kwargs)
