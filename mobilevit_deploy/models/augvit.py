"""AugViT: Augmented Shortcuts for Vision Transformers.

Paper: `Augmented Shortcuts for Vision Transformers` - Yehui Tang, Kai Han, Chang Xu, An Xiao, Yiping
    Deng, Chao Xu, Yunhe Wang, NeurIPS 2021 - https://arxiv.org/abs/2106.15941
Official code: huawei-noah/Efficient-AI-Backbones, folder `augvit_pytorch` (`models/augvit.py`),
model `augvit_small_circulant2` (the one its README trains), re-implemented here without timm.

A DeiT/ViT block whose attention and MLP each get augmented shortcuts in parallel with the identity
shortcut: T(z) = GELU(z Theta + b), Theta a block-circulant matrix (4 x 4 blocks of b x b circulant
matrices, b = dim / 4, so dim * dim / b = 16 * b weights instead of dim^2). As in the official
`circulant2` mode, each module has two augmented shortcuts on its normalised input and the sum is
scaled by 3/4:
    x = (x + MSA(LN1(x)) + T_a1(LN1(x)) + T_a2(LN1(x))) * 3/4
    x = (x + MLP(LN2(x)) + T_m1(LN2(x)) + T_m2(LN2(x))) * 3/4
State-dict keys are the official ones (`augs_attn.0.weight_list`, `augs_attn.0.bias`,
`augs_attn.0.index_matrix` (a persistent buffer there, kept so official checkpoints load strictly),
`augs`, `augs_attn2`, `augs2`; the rest as DeiT / timm). LayerNorm eps 1e-6, qkv bias, DeiT dims:
`augvit_tiny_patch16_224` (DeiT-Ti dims, 5,763,496 params) and `augvit_small_patch16_224` (= official
`augvit_small_circulant2`, 22,142,824 params). No official weights are published.

Export: the circulant weight is built by an index (gather) of `weight_list`, an op XNNPACK does not
delegate. `fold_for_export()` (alias `reparameterize()`) replaces every circulant projection by a
dense `nn.Linear` with the same weight and bias (same outputs, test_plain_vit_models.py); export the
folded model. Token reduction (EViT, `keep_rate`/`keep_layers`/`gather`) works as on DeiT: between
the attention module and the MLP module of the chosen blocks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model
from .deit import Block as _DeiTBlock
from .deit import VisionTransformer, _deploy_cfg

__all__ = ["AugViT", "AugBlock", "CirculantLinear", "AugViTCfg", "model_cfgs"]


@dataclass(frozen=True)
class AugViTCfg:
    """One AugViT variant: DeiT dims + the number of circulant blocks per side."""

    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_cir: int = 4


model_cfgs: dict[str, AugViTCfg] = dict(
    augvit_tiny_patch16_224=AugViTCfg(embed_dim=192, num_heads=3),
    augvit_small_patch16_224=AugViTCfg(embed_dim=384, num_heads=6),
)


def circulant_index(in_features: int, out_features: int, num_cir: int) -> torch.Tensor:
    """[out, in] long: which entry of `weight_list` each weight is (official `Circulant_Linear`).

    Block (I, J) of size b x b (b = min(in, out) / num_cir) is circulant, scipy.linalg.circulant's
    convention: entry (i, j) = c_IJ[(i - j) mod b], c_IJ the block's b weights at offset (I * n_in + J) * b.
    """
    min_f = min(in_features, out_features)
    if min_f % num_cir:
        raise ValueError(f"min(in, out) = {min_f} must be divisible by num_cir {num_cir}")
    b = min_f // num_cir
    n_in, n_out = num_cir * in_features // min_f, num_cir * out_features // min_f
    i = torch.arange(b)
    circ = (i[:, None] - i[None, :]) % b  # [b, b]
    offs = (torch.arange(n_out)[:, None] * n_in + torch.arange(n_in)[None, :]) * b  # [n_out, n_in]
    idx = circ[None, None] + offs[:, :, None, None]  # [n_out, n_in, b, b]
    return idx.permute(0, 2, 1, 3).reshape(n_out * b, n_in * b)


class CirculantLinear(nn.Module):
    """Linear layer with a block-circulant weight (official `Circulant_Linear`; same keys)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, num_cir: int = 4):
        super().__init__()
        self.in_features, self.out_features, self.num_cir = in_features, out_features, num_cir
        index = circulant_index(in_features, out_features, num_cir)
        self.weight_list = nn.Parameter(torch.empty(int(index.max()) + 1))
        self.register_buffer("index_matrix", index)  # persistent: the official checkpoints carry it
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        n_in = self.num_cir * self.in_features // min(self.in_features, self.out_features)
        n_out = self.num_cir * self.out_features // min(self.in_features, self.out_features)
        nn.init.kaiming_uniform_(self.weight_list.view(n_out, n_in, -1), a=math.sqrt(5))  # as official
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def dense_weight(self) -> torch.Tensor:
        return self.weight_list[self.index_matrix]  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)  # [..., in] -> [..., out]

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear computing the same function."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin = lin.to(device=self.weight_list.device, dtype=self.weight_list.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_cir={self.num_cir}"


def _aug_shortcut(dim: int, num_cir: int, act_layer) -> nn.Sequential:
    return nn.Sequential(CirculantLinear(dim, dim, bias=True, num_cir=num_cir), act_layer())


class AugBlock(_DeiTBlock):
    """DeiT block + two augmented shortcuts beside the attention and two beside the MLP (official
    `Block(mode='circulant2')`), optionally reducing tokens between the two modules."""

    def __init__(self, dim: int, num_heads: int, num_cir: int = 4, act_layer=nn.GELU, **kwargs):
        super().__init__(dim, num_heads, act_layer=act_layer, **kwargs)
        # registration order as official: augs_attn, augs, augs_attn2, augs2
        self.augs_attn = _aug_shortcut(dim, num_cir, act_layer)
        self.augs = _aug_shortcut(dim, num_cir, act_layer)
        self.augs_attn2 = _aug_shortcut(dim, num_cir, act_layer)
        self.augs2 = _aug_shortcut(dim, num_cir, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, C] -> [B, N', C]
        xn = self.norm1(x)
        P = self.reducer.num_prefix_tokens if self.reducer is not None else 1
        y, cls_attn = self.attn(xn, need_cls_attn=self.reducer is not None, num_prefix_tokens=P)
        x = (x + self.drop_path1(y) + self.augs_attn(xn) + self.augs_attn2(xn)) * 0.75
        if self.reducer is not None:
            x = self.reducer(x, cls_attn)  # [B, P + k + 1, C]
        xn = self.norm2(x)
        x = (x + self.drop_path2(self.mlp(xn)) + self.augs(xn) + self.augs2(xn)) * 0.75
        return x


class AugViT(VisionTransformer):
    """ViT/DeiT with augmented shortcuts (class token, no distillation token)."""

    block_cls = AugBlock

    def __init__(self, num_cir: int = 4, **kwargs):
        if kwargs.get("distilled"):
            raise ValueError("AugViT has no distilled variant")
        super().__init__(num_cir=num_cir, **kwargs)
        self.folded = False

    def fold_for_export(self) -> AugViT:
        """Replace each CirculantLinear by an equal dense nn.Linear (in place; returns self).

        The folded model computes the same outputs with plain GEMMs (delegated by XNNPACK / Core ML);
        its state dict has `augs*.0.weight` instead of `weight_list` / `index_matrix`.
        """
        for m in self.modules():
            for name, child in list(m.named_children()):
                if isinstance(child, CirculantLinear):
                    setattr(m, name, child.to_linear())
        self.folded = True
        return self

    reparameterize = fold_for_export


def _create_augvit(variant: str, **kwargs) -> AugViT:
    return AugViT(**{**asdict(model_cfgs[variant]), **kwargs})


@register_model(cfg=_deploy_cfg())
def augvit_tiny_patch16_224(**kwargs) -> AugViT:
    """AugViT on DeiT-Ti dims (192, 3 heads, 12 blocks)."""
    return _create_augvit("augvit_tiny_patch16_224", **kwargs)


@register_model(cfg=_deploy_cfg())
def augvit_small_patch16_224(**kwargs) -> AugViT:
    """Aug-ViT-S (official `augvit_small_circulant2`): DeiT-S dims (384, 6 heads, 12 blocks)."""
    return _create_augvit("augvit_small_patch16_224", **kwargs)
