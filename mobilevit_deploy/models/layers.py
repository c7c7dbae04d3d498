"""Shared building blocks, written for `torch.export` and mobile delegates.

Parameter names follow timm (`conv`/`bn`, `qkv`/`proj`, `fc1`/`fc2`, `norm1`/`norm2`), so timm and
Apple (ml-cvnets via timm) checkpoints load unchanged.

Export notes (ExecuTorch XNNPACK, Core ML, ONNX):
- attention is explicit `bmm` + `softmax` on 3-D tensors. Fused `scaled_dot_product_attention`
  leaves ops outside the XNNPACK delegate, and 4-D `matmul` decomposes into `expand` + `view` +
  `bmm`; `torch.bmm` on 3-D tensors lowers to a single op.
- heads are split with one 3-D permute into a head-major batch `[heads * B, N, head_dim]`; q, k and
  v are then slices of the leading dim (contiguous, no copy), so no tensor exceeds 3-D.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def get_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """Symmetric 'same-ish' padding, as timm's `get_padding`."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round channels to a multiple of `divisor` (timm / MobileNet rule, never more than 10 % down)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class ConvNormAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation. Keys: `conv.weight`, `bn.*` (timm ConvNormAct)."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            groups: int = 1,
            dilation: int = 1,
            apply_act: bool = True,
            act_layer: Callable[..., nn.Module] = nn.SiLU,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=get_padding(kernel_size, stride, dilation),
            dilation=dilation, groups=groups, bias=False)
        self.bn = norm_layer(out_chs)
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, in_chs, H, W] -> [B, out_chs, H / stride, W / stride]
        return self.act(self.bn(self.conv(x)))


class ChannelLinearNormAct(nn.Module):
    """A 1x1 ConvNormAct (eval mode) as a linear over channels: NCHW -> NHWC, linear with the BatchNorm folded
    into its weight and bias, -> NCHW, activation. The same function up to float rounding; used by the
    `int8-dynamic-all` scheme, where XNNPACK's dynamic 1x1 conv fails after a reshape."""

    def __init__(self, in_chs: int, out_chs: int, act: nn.Module):
        super().__init__()
        self.fc = nn.Linear(in_chs, out_chs)
        self.act = act

    @classmethod
    def from_conv_norm_act(cls, cna: ConvNormAct) -> ChannelLinearNormAct:
        conv, bn = cna.conv, cna.bn
        if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.stride != (1, 1):
            raise ValueError(f"not a dense 1x1 stride-1 conv: {conv}")
        w = conv.weight[:, :, 0, 0]  # [out, in]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        m = cls(w.shape[1], w.shape[0], cna.act)
        with torch.no_grad():
            m.fc.weight.copy_(w * scale[:, None])
            m.fc.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (1, 1):  # [B, C_in, 1, 1] -> [B, C_in] -> [B, C_out] -> [B, C_out, 1, 1]: a plain 2-D
            # linear (XNNPACK's layout pass puts a copy between a dynamically quantized 1x1-pixel NHWC input
            # and its linear, which then fails to lower: "Weight and Input should both be quantized")
            return self.act(self.fc(x.flatten(1))[:, :, None, None])
        # [B, C_in, H, W] -> [B, H, W, C_in] -> [B, H, W, C_out] -> [B, C_out, H, W]
        return self.act(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode and when `drop_prob` is 0)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, heads * d] -> [heads * B, N, d] (head-major batch), one 3-D permute."""
    B, N, C = x.shape
    d = C // num_heads
    x = x.reshape(B * N, num_heads, d).permute(1, 0, 2)  # [heads, B * N, d]
    return x.reshape(num_heads * B, N, d)


def merge_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[heads * B, N, d] -> [B, N, heads * d], the inverse of `split_heads`."""
    HB, N, d = x.shape
    B = HB // num_heads
    x = x.reshape(num_heads, B * N, d).permute(1, 0, 2)  # [B * N, heads, d]
    return x.reshape(B, N, num_heads * d)


def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        attn_bias: torch.Tensor | None = None,
        num_heads: int = 1,
        attn_drop: nn.Module | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v with plain `bmm` (no fused SDPA, see module docstring).

    q: [heads * B, N, d], k: [heads * B, M, d], v: [heads * B, M, dv] (head-major, as `split_heads`).
    attn_bias: optional additive bias broadcastable to [heads, B, N, M] (e.g. a relative position
    bias of shape [heads, 1, N, M]); `num_heads` is needed only to apply it.
    Returns [heads * B, N, dv].
    """
    attn = torch.bmm(q * scale, k.transpose(1, 2))  # [heads * B, N, M]
    if attn_bias is not None:
        HB, N, M = attn.shape
        attn = (attn.reshape(num_heads, HB // num_heads, N, M) + attn_bias).reshape(HB, N, M)
    attn = attn.softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return torch.bmm(attn, v)  # [heads * B, N, dv]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm `Attention` keys: qkv, proj)."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        qkv = split_heads(self.qkv(x), 3 * h)  # [3 * heads * B, N, d], order (q heads, k heads, v heads)
        q, k, v = qkv[:h * B], qkv[h * B:2 * h * B], qkv[2 * h * B:]  # each [heads * B, N, d]
        x = attention(q, k, v, self.scale, attn_bias, h, self.attn_drop)  # [heads * B, N, d]
        x = merge_heads(x, h)  # [B, N, C]
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Linear -> act -> drop -> Linear -> drop on [..., C] (timm `Mlp` keys: fc1, fc2)."""

    def __init__(
            self,
            in_features: int,
            hidden_features: int | None = None,
            out_features: int | None = None,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            drop: float = 0.0,
            bias: bool = True,
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., in] -> [..., hidden] -> [..., out]
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)) (timm vision_transformer.Block keys)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = False,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            mlp_hidden: int | None = None,  # MLP hidden width; None: int(dim * mlp_ratio)
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_hidden or int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, C] -> [B, N, C]
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x
