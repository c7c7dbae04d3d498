"""Modules that pruning puts into a model: `ConvAttention`, SPViT's convolutional replacement of a
self-attention layer (Pan et al., "Pruning Self-attentions into Convolutional Layers in Single Path").

In a MobileViT block the transformer runs on B * p * p sequences of N = nh * nw patch tokens laid out
row-major on the nh x nw patch grid (`MobileVitBlock.unfold`). `ConvAttention` keeps the attention's
value projection (`v`, the v rows of the fused qkv) and output projection (`proj`), and replaces the
softmax(q k^T) mixing of tokens by a depthwise k x k convolution on the token grid (`dw`): each head's
channels mix a fixed neighbourhood instead of attending. At conversion the depthwise kernel of a
head's channels is that head's column of the SPViT head-to-kernel-position mapping (softmax over heads
per position, learned in scoring; normalised per head to sum 1, as attention weights do), so the
convolution's weights come from the attention's own. Cost per token: 2 d h e + h e k^2 MACs instead
of 4 d h e + 2 N h e. Plain Linear / depthwise Conv2d / reshapes: it lowers to XNNPACK like the rest.

The token grid is taken as square (N = s * s), which is what MobileViT gives at the square deploy
sizes; a non-square grid is a ValueError.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class ConvAttention(nn.Module):
    """[B, N, dim] -> [B, N, dim]: v projection -> depthwise k x k conv on the sqrt(N) x sqrt(N) token grid -> proj."""

    is_conv_attention = True

    def __init__(self, dim: int, num_heads: int, head_dim: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kernel_size = kernel_size
        self.v = nn.Linear(dim, inner, bias=bias)
        self.dw = nn.Conv2d(inner, inner, kernel_size, padding=kernel_size // 2, groups=inner, bias=False)
        self.proj = nn.Linear(inner, dim)

    def spec(self) -> dict:
        return {"type": "ConvAttention", "dim": self.v.in_features, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "kernel_size": self.kernel_size, "bias": self.v.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> ConvAttention:
        return cls(int(spec["dim"]), int(spec["num_heads"]), int(spec["head_dim"]), int(spec["kernel_size"]),
                   bool(spec.get("bias", True)))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        s = math.isqrt(N)
        if s * s != N:
            raise ValueError(f"ConvAttention needs a square token grid, got {N} tokens")
        v = self.v(x)  # [B, N, inner]
        C = v.shape[-1]
        v = v.transpose(1, 2).reshape(B, C, s, s)  # [B, inner, s, s] (tokens are row-major on the grid)
        v = self.dw(v)
        v = v.reshape(B, C, N).transpose(1, 2)  # [B, N, inner]
        return self.proj(v)


def is_conv_attention(m: nn.Module) -> bool:
    return getattr(m, "is_conv_attention", False) is True


def head_kernels(mapping: torch.Tensor, head_dim: int, kernel_size: int) -> torch.Tensor:
    """The depthwise kernel [h * e, 1, k, k] from a head-to-position mapping [k * k, h] (rows sum to 1
    over heads): each head's column normalised to sum 1 over the positions, repeated for its e channels."""
    a = mapping / mapping.sum(0, keepdim=True).clamp_min(1e-12)  # [k*k, h], per head sums to 1
    return a.t().repeat_interleave(head_dim, 0).reshape(-1, 1, kernel_size, kernel_size)


def conv_from_attention(attn: nn.Module, mapping: torch.Tensor | None = None, kernel_size: int = 3) -> ConvAttention:
    """A ConvAttention built from `attn` (fused qkv + proj): v = the v rows of qkv, proj = proj, the depthwise
    kernel from `mapping` ([k * k, heads], softmax over heads per position; None: uniform)."""
    h, e = attn.num_heads, attn.head_dim
    inner = h * e
    dim = attn.qkv.in_features
    conv = ConvAttention(dim, h, e, kernel_size, bias=attn.qkv.bias is not None)
    if mapping is None or tuple(mapping.shape) != (kernel_size * kernel_size, h):
        mapping = torch.full((kernel_size * kernel_size, h), 1.0 / h)
    with torch.no_grad():
        conv.v.weight.copy_(attn.qkv.weight[2 * inner:3 * inner])
        if attn.qkv.bias is not None:
            conv.v.bias.copy_(attn.qkv.bias[2 * inner:3 * inner])
        conv.proj.weight.copy_(attn.proj.weight)
        conv.proj.bias.copy_(attn.proj.bias)
        conv.dw.weight.copy_(head_kernels(mapping.detach().to(conv.dw.weight.dtype), e, kernel_size))
    return conv.train(attn.training)
