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

`token_reduction` picks the method (all static at export, see docs/plain_vit.md):
  "evit"        (default) as above, no parameters.
  "dynamicvit"  DynamicViT (Rao et al., NeurIPS 2021, https://arxiv.org/abs/2106.02034): before blocks
                `keep_layers` a prediction module (`score_predictor.{s}`, the official PredictorLG: MLP on
                [local feature, policy-weighted global mean]) scores the patch tokens. Training: Gumbel-
                softmax hard keep masks, multiplied through the stages, mask the attention (all tokens
                stay; the official `softmax_with_policy`); the ratio and distillation losses are in
                train/token_losses.py. Eval / export: stage s keeps the top int(N * keep_rate^(s+1)) tokens
                by keep score (the official inference rule), with the same one-hot gather, no fused token.
  "patch_slim"  Patch Slimming (Tang et al., CVPR 2022, https://arxiv.org/abs/2106.02852): static per-layer
                sets of kept patches, nested top-down, computed from calibration images by
                models/patch_slim.py (`slim_order`, `slim_counts`); the patches are put in that order once
                (a constant one-hot GEMM) and every reduction is then a slice.
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
           "token_schedule", "dynamicvit_schedule", "GATHER_MODES", "TOKEN_REDUCTIONS", "PredictorLG"]

GATHER_MODES = ("topk", "onehot")
TOKEN_REDUCTIONS = ("evit", "dynamicvit", "patch_slim")


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


def dynamicvit_schedule(num_patches: int, keep_rate: float, num_stages: int) -> list[int]:
    """Patch tokens kept by each DynamicViT stage at inference: int(N * keep_rate^(s+1)) (official rule), >= 1."""
    return [max(1, int(num_patches * keep_rate ** (s + 1))) for s in range(num_stages)]


def softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor, num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's masked softmax (official `softmax_with_policy`): attn [heads * B, N, N] logits, policy
    [B, N, 1] keep mask; a dropped key gets no attention except from itself (the eye term)."""
    HB, N, _ = attn.shape
    p = policy.reshape(1, -1, 1, N).expand(num_heads, -1, -1, -1).reshape(HB, 1, N)  # head-major as split_heads
    eye = torch.eye(N, dtype=attn.dtype, device=attn.device).reshape(1, N, N)
    p = p + (1.0 - p) * eye  # [HB, N, N]
    attn = (attn - attn.max(dim=-1, keepdim=True)[0]).exp() * p
    return (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)


class Attention(_Attention):
    """layers.Attention (timm keys qkv, proj) that can also return the class token's attention, and
    mask keys with a DynamicViT policy (training only)."""

    def forward(
            self, x: torch.Tensor, need_cls_attn: bool = False, num_prefix_tokens: int = 1,
            policy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        h = self.num_heads
        qkv = split_heads(self.qkv(x), 3 * h)  # [3 * heads * B, N, d], (q heads, k heads, v heads)
        q, k, v = qkv[:h * B], qkv[h * B:2 * h * B], qkv[2 * h * B:]  # each [heads * B, N, d]
        attn = torch.bmm(q * self.scale, k.transpose(1, 2))  # [heads * B, N, N]
        attn = attn.softmax(dim=-1) if policy is None else softmax_with_policy(attn, policy, h)
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

    def __init__(self, num_tokens: int, keep: int, num_prefix_tokens: int = 1, gather: str = "onehot",
                 fuse: bool = True):
        super().__init__()
        self.fuse = fuse  # False (DynamicViT): the M - k others are dropped, no fused token
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
        return (f"tokens={self.num_tokens}, keep={self.keep}, prefix={self.num_prefix_tokens}, gather={self.gather!r}, "
                f"fuse={self.fuse}")

    def ranks(self, cls_attn: torch.Tensor) -> torch.Tensor:
        """[B, 1, M] attention -> [B, 1, M] float ranks (0 = most attended), via pairwise comparison."""
        a_j = cls_attn  # [B, 1, M]
        a_i = cls_attn.transpose(1, 2)  # [B, M, 1]
        gt = torch.ceil(torch.clamp(a_j - a_i, 0.0, 1.0))  # [B, M, M]: [i, j] = [a_j > a_i], exact 0/1
        eq = 1.0 - (gt + gt.transpose(1, 2))  # [a_j == a_i]
        before = gt + eq * self.tie_before  # j is ranked before i
        return F.linear(before, self.ones).transpose(1, 2)  # [B, 1, M]: row sums as a GEMM (static weight)

    def forward(self, x: torch.Tensor, cls_attn: torch.Tensor) -> torch.Tensor:
        # x: [B, P + M, C], cls_attn: [B, 1, M] (any score: larger = kept first) -> [B, P + k (+ 1 fused), C]
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
            if not self.fuse:
                return torch.cat([prefix, kept], dim=1)
            rest = torch.gather(tokens, 1, rest_idx.unsqueeze(-1).expand(B, M - k, C))  # [B, M - k, C]
            w = torch.gather(a, 1, rest_idx)  # [B, M - k]
            fused = (rest * w.unsqueeze(-1)).sum(dim=1, keepdim=True)  # [B, 1, C]
        else:
            rank = self.ranks(cls_attn)  # [B, 1, M]
            d = rank - self.positions  # [B, k, M]
            select = torch.relu(1.0 - d * d)  # [B, k, M], one-hot rows: S[p, i] = [rank_i == p]
            kept = torch.bmm(select, tokens)  # [B, k, C]
            if not self.fuse:
                return torch.cat([prefix, kept], dim=1)
            rest = torch.clamp(rank - float(k - 1), 0.0, 1.0)  # [B, 1, M]: [rank_i >= k] (float scalar: no cast op)
            fused = torch.bmm(cls_attn * rest, tokens)  # [B, 1, C]
        return torch.cat([prefix, kept, fused], dim=1)


class SliceReducer(nn.Module):
    """Patch Slimming between attention and MLP: keep the first `keep` patch tokens (the tokens are in
    the static top-down order, so a nested kept set is a prefix). A slice: no ranking, no gather."""

    needs_attn = False

    def __init__(self, num_tokens: int, keep: int, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_tokens, self.keep, self.num_prefix_tokens = num_tokens, keep, num_prefix_tokens

    def extra_repr(self) -> str:
        return f"tokens={self.num_tokens}, keep={self.keep}, prefix={self.num_prefix_tokens}"

    def forward(self, x: torch.Tensor, cls_attn: torch.Tensor | None = None) -> torch.Tensor:
        return x[:, :self.num_prefix_tokens + self.keep]  # [B, P + keep, C]


class PredictorLG(nn.Module):
    """DynamicViT's prediction module (official `PredictorLG`, same keys): per patch token, log-probabilities
    of (keep, drop) from an MLP on [local half of the features, policy-weighted mean of the global half].

    At inference (`consts`, DynamicViTStage's constant buffers for the stage's M tokens) the policy is all
    ones: the mean is a GEMM with a constant 1/M row, the broadcast back to the tokens a multiply by a
    constant ones column (no `expand`, which XNNPACK does not delegate), and the output is the keep score
    z_keep - z_drop (one GEMM with a constant [1, -1]): the same order as log p_keep without the
    log-softmax, which XNNPACK does not delegate either.
    """

    def __init__(self, embed_dim: int = 384):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(), nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None, consts=None) -> torch.Tensor:
        # x: [B, M, C] patch tokens, policy: [B, M, 1] keep mask or None (all kept) -> [B, M, 2] log (keep, drop);
        # with consts (inference): [B, M, 1] keep score
        x = self.in_conv(x)
        B, M, C = x.shape
        local_x, global_x = x[:, :, :C // 2], x[:, :, C // 2:]
        if consts is not None:
            g = F.linear(global_x.transpose(1, 2), consts.mean_w).transpose(1, 2)  # [B, 1, C/2]: mean as a GEMM
            x = torch.cat([local_x, consts.ones_col * g], dim=-1)  # [B, M, C]
            z = self.out_conv[:-1](x)  # [B, M, 2] logits
            return F.linear(z, consts.diff_w)  # [B, M, 1]: z_keep - z_drop
        if policy is None:
            g = global_x.mean(dim=1, keepdim=True)
        else:
            g = (global_x * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)  # [B, 1, C/2]
        x = torch.cat([local_x, g.expand(B, M, C // 2)], dim=-1)  # [B, M, C]
        return self.out_conv(x)


class DynamicViTStage(nn.Module):
    """Inference of one DynamicViT stage: constants for PredictorLG (mean row, ones column, [1, -1]) sized
    for the stage's M tokens, and the reducer keeping the top k by keep score (no fused token).
    Non-persistent buffers only: no state-dict keys."""

    def __init__(self, num_tokens: int, keep: int, num_prefix_tokens: int = 1, gather: str = "onehot"):
        super().__init__()
        M = num_tokens
        self.register_buffer("mean_w", torch.full((1, M), 1.0 / M), persistent=False)
        self.register_buffer("ones_col", torch.ones(1, M, 1), persistent=False)
        self.register_buffer("diff_w", torch.tensor([[1.0, -1.0]]), persistent=False)
        self.reducer = TokenReducer(M, keep, num_prefix_tokens, gather, fuse=False) if keep < M else None

    def forward(self, x: torch.Tensor, predictor: PredictorLG) -> torch.Tensor:
        # [B, P + M, C] -> [B, P + k, C]
        if self.reducer is None:
            return x
        P = self.reducer.num_prefix_tokens
        score = predictor(x[:, P:], consts=self)  # [B, M, 1]
        return self.reducer(x, score.transpose(1, 2))


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

    def attend(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(attention branch on norm1(x), class attention [B, 1, M] if this block's reducer ranks by it)."""
        P = self.reducer.num_prefix_tokens if self.reducer is not None else 1
        need = self.reducer is not None and getattr(self.reducer, "needs_attn", True)
        return self.attn(self.norm1(x), need_cls_attn=need, num_prefix_tokens=P, policy=policy)

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        # [B, N, C] -> [B, N', C] (N' = N unless this block reduces tokens); policy: DynamicViT training mask
        y, cls_attn = self.attend(x, policy)
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
            token_reduction: str = "evit",
            slim_order: Sequence[int] | None = None,
            slim_counts: Sequence[int] | None = None,
            **block_kwargs,
    ):
        super().__init__()
        keep_rate = check_keep_rate(keep_rate)
        if gather not in GATHER_MODES:
            raise choices_error("gather", gather, GATHER_MODES)
        if token_reduction not in TOKEN_REDUCTIONS:
            raise choices_error("token_reduction", token_reduction, TOKEN_REDUCTIONS)
        if token_reduction != "evit" and self.block_cls is not Block:
            raise UserError(f"token_reduction={token_reduction!r} is offered on the deit_* models only "
                            f"(choose from: evit)")
        if token_reduction == "dynamicvit" and keep_rate >= 1.0:
            raise UserError("token_reduction='dynamicvit' needs a keep_rate in (0, 1), e.g. 0.7")
        if token_reduction == "patch_slim" and (slim_order is None or slim_counts is None):
            raise UserError("token_reduction='patch_slim' needs slim_order and slim_counts (from calibration images: "
                            "mobilevit_deploy.models.patch_slim.calibrate_patch_slimming)")
        if token_reduction != "patch_slim" and (slim_order is not None or slim_counts is not None):
            raise UserError("slim_order / slim_counts are options of token_reduction='patch_slim'")
        self.token_reduction = token_reduction
        self.slim_order = None if slim_order is None else [int(i) for i in slim_order]
        self.slim_counts = None if slim_counts is None else [int(i) for i in slim_counts]
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
        if token_reduction == "dynamicvit":
            self.score_predictor = nn.ModuleList([PredictorLG(embed_dim) for _ in self.keep_layers])
        self.dvit_out = None  # DynamicViT training: (decisions per stage, final tokens, final mask) of the last forward
        self._build_reducers(num_patches)
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _build_reducers(self, num_patches: int):
        P, depth = self.num_prefix_tokens, len(self.blocks)
        self.dvit_reducers = None
        self._buffers.pop("slim_select", None)
        self.slim_select = None
        if self.token_reduction == "dynamicvit":
            for blk in self.blocks:
                blk.reducer = None
            keeps = dynamicvit_schedule(num_patches, self.keep_rate, len(self.keep_layers))
            ins = [num_patches] + keeps[:-1]
            self.dvit_reducers = nn.ModuleList([DynamicViTStage(m, k, P, self.gather) for m, k in zip(ins, keeps)])
            counts, m, stage = [], num_patches, {b: s for s, b in enumerate(self.keep_layers)}
            for i in range(depth):
                if i in stage:
                    m = keeps[stage[i]]
                counts.append(m)
            self.token_counts = counts + [counts[-1]]
            return
        if self.token_reduction == "patch_slim":
            self._build_patch_slim(num_patches)
            return
        sched = token_schedule(num_patches, depth, self.keep_rate, self.keep_layers)
        for blk, (m, k) in zip(self.blocks, sched):
            blk.reducer = TokenReducer(m, k, self.num_prefix_tokens, self.gather) if k < m else None
        # patch tokens entering each block, then leaving the last one
        self.token_counts = [m for m, _ in sched] + [sched[-1][1] + 1 if sched[-1][1] < sched[-1][0] else sched[-1][0]]

    def _build_patch_slim(self, num_patches: int):
        order, counts, depth = self.slim_order, self.slim_counts, len(self.blocks)
        if sorted(order) != list(range(num_patches)):
            raise UserError(f"slim_order must be a permutation of the {num_patches} patch indices "
                            f"(it has {len(order)} entries); recalibrate for this input size")
        if len(counts) != depth + 1 or any(not 0 <= c <= num_patches for c in counts) or \
                any(a < b for a, b in zip(counts, counts[1:])):
            raise UserError(f"slim_counts must be {depth + 1} non-increasing patch counts in 0..{num_patches} "
                            f"(tokens entering each block, then leaving the last), got {counts}")
        n0 = counts[0]
        if n0 < num_patches or order != list(range(num_patches)):
            sel = torch.zeros(n0, num_patches)
            sel[torch.arange(n0), torch.tensor(order[:n0], dtype=torch.long)] = 1.0
            del self.slim_select  # the None placeholder
            self.register_buffer("slim_select", sel, persistent=False)  # [n0, N] one-hot rows, a constant GEMM
        for i, blk in enumerate(self.blocks):
            blk.reducer = SliceReducer(counts[i], counts[i + 1], self.num_prefix_tokens) \
                if counts[i + 1] < counts[i] else None
        self.token_counts = list(counts)

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
        if self.token_reduction == "patch_slim" and grid != self.grid_size:
            raise UserError(f"Patch Slimming masks were calibrated for a {self.grid_size[0]}x{self.grid_size[1]} patch "
                            f"grid; recalibrate for {img_size[0]}x{img_size[1]} input")
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
        if self.token_reduction == "dynamicvit":
            return self._forward_dynamicvit(x)
        if self.slim_select is not None:  # Patch Slimming: the static top-down order, unused patches dropped
            P = self.num_prefix_tokens
            t = F.linear(x[:, P:].transpose(1, 2), self.slim_select).transpose(1, 2)  # [B, n0, C]: one-hot GEMM
            x = torch.cat([x[:, :P], t], dim=1)
        x = self.blocks(x)  # [B, P + N', C] (N' < N with token reduction)
        return self.norm(x)

    def _forward_dynamicvit(self, x: torch.Tensor) -> torch.Tensor:
        """DynamicViT: training keeps every token and masks attention with Gumbel-softmax decisions (stored
        in `self.dvit_out` for the losses); eval drops tokens to the static per-stage counts."""
        B, P = x.shape[0], self.num_prefix_tokens
        N = x.shape[1] - P
        stage = {b: s for s, b in enumerate(self.keep_layers)}
        train = self.training
        prev = x.new_ones(B, N, 1) if train else None
        policy, decisions = None, []
        for i, blk in enumerate(self.blocks):
            if i in stage:
                s = stage[i]
                if train:
                    score = self.score_predictor[s](x[:, P:], prev)  # [B, N, 2] log (keep, drop)
                    hard = F.gumbel_softmax(score, hard=True)[:, :, 0:1] * prev  # [B, N, 1], straight-through
                    decisions.append(hard.reshape(B, N))
                    policy = torch.cat([x.new_ones(B, P, 1), hard], dim=1)  # prefix tokens always kept
                    prev = hard
                else:
                    x = self.dvit_reducers[s](x, self.score_predictor[s])  # [B, P + k_s, C]
            x = blk(x, policy) if train else blk(x)
        x = self.norm(x)
        self.dvit_out = (decisions, x[:, P:], prev.reshape(B, N)) if train else None
        return x

    @property
    def dvit_keep_ratios(self) -> list[float]:
        """DynamicViT's target keep ratio of each stage relative to all patches (keep_rate^(s+1))."""
        return [self.keep_rate ** (s + 1) for s in range(len(self.keep_layers))]

    def optional_state_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes a dense checkpoint may lack (load_checkpoint: new modules keep their init)."""
        return ("score_predictor.",) if self.token_reduction == "dynamicvit" else ()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        B, _, C = x.shape
        cls = self.head_drop((x[:, 0:1] if x.shape[1] > 1 else x).reshape(B, C))  # [B, C]; a slice, not a select
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
