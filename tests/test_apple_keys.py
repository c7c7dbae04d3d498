"""Apple's original MobileViT checkpoints (ml-cvnets / corenet layout) load through `--checkpoint`.

The test builds a minimal replica of ml-cvnets' MobileViT *module tree* (same attribute names and
nesting: ConvLayer.block.{conv,norm,act}, InvertedResidual.block.{exp_1x1,conv_3x3,red_1x1},
MobileViTBlock.{local_rep,global_rep,conv_proj,fusion}, TransformerEncoder.{pre_norm_mha,pre_norm_ffn},
MultiHeadAttention.{qkv_proj,out_proj}, classifier.fc), sized from ml-cvnets' own configuration
table (not from our model), with ml-cvnets' forward (its unfolding/folding and attention). Its state
dict is what Apple's release looks like; after `apple_to_timm` every key and shape must equal our
model's, the strict load must succeed, and our model must compute what the replica computes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobilevit_deploy.checkpoint import save_safetensors
from mobilevit_deploy.models import create_model
from mobilevit_deploy.models._apple_keys import apple_key_to_timm, apple_to_timm, is_apple_mobilevit

# ml-cvnets cvnets/models/classification/config/mobilevit.py: per variant, layer_1/2 (mv2) and
# layer_3/4/5 (mobilevit): out channels, transformer dim, ffn dim, transformer blocks; expand ratio.
CVNETS_CFG = {
    "mobilevit_xxs": dict(exp=2, l1=16, l2=24, mvit=[(48, 64, 128, 2), (64, 80, 160, 4), (80, 96, 192, 3)]),
    "mobilevit_xs": dict(exp=4, l1=32, l2=48, mvit=[(64, 96, 192, 2), (80, 120, 240, 4), (96, 144, 288, 3)]),
    "mobilevit_s": dict(exp=4, l1=32, l2=64, mvit=[(96, 144, 288, 2), (128, 192, 384, 4), (160, 240, 480, 3)]),
}


def _make_divisible(v, divisor=8, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvLayer(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, use_norm=True, use_act=True):
        super().__init__()
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False))
        if use_norm:
            self.block.add_module("norm", nn.BatchNorm2d(cout))
        if use_act:
            self.block.add_module("act", nn.SiLU())

    def forward(self, x):
        return self.block(x)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand_ratio):
        super().__init__()
        hidden = _make_divisible(int(round(cin * expand_ratio)), 8)
        self.block = nn.Sequential()
        self.block.add_module("exp_1x1", ConvLayer(cin, hidden, 1))
        self.block.add_module("conv_3x3", ConvLayer(hidden, hidden, 3, stride, groups=hidden))
        self.block.add_module("red_1x1", ConvLayer(hidden, cout, 1, use_act=False))
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res_connect else self.block(x)


class LinearLayer(nn.Module):  # cvnets LinearLayer: parameters directly on the module
    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin))
        self.bias = nn.Parameter(torch.empty(cout))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MultiHeadAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.qkv_proj = LinearLayer(dim, 3 * dim)
        self.out_proj = LinearLayer(dim, dim)
        self.num_heads, self.head_dim = heads, dim // heads

    def forward(self, x):  # cvnets: reshape (b, n, 3, h, -1), transpose(1, 3), scale the query
        b, n, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, n, 3, self.num_heads, -1).transpose(1, 3).contiguous()
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = torch.matmul(q * self.head_dim ** -0.5, k.transpose(-1, -2)).softmax(-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.out_proj(out)


class TransformerEncoder(nn.Module):
    def __init__(self, dim, ffn, heads):
        super().__init__()
        self.pre_norm_mha = nn.Sequential(nn.LayerNorm(dim), MultiHeadAttention(dim, heads), nn.Dropout(0.0))
        self.pre_norm_ffn = nn.Sequential(nn.LayerNorm(dim), LinearLayer(dim, ffn), nn.SiLU(), nn.Dropout(0.0),
                                          LinearLayer(ffn, dim), nn.Dropout(0.0))

    def forward(self, x):
        x = x + self.pre_norm_mha(x)
        return x + self.pre_norm_ffn(x)


class MobileViTBlock(nn.Module):
    def __init__(self, cin, dim, ffn, n_blocks, heads=4, patch=2):
        super().__init__()
        self.local_rep = nn.Sequential()
        self.local_rep.add_module("conv_3x3", ConvLayer(cin, cin, 3))
        self.local_rep.add_module("conv_1x1", ConvLayer(cin, dim, 1, use_norm=False, use_act=False))
        layers = [TransformerEncoder(dim, ffn, heads) for _ in range(n_blocks)]
        self.global_rep = nn.Sequential(*layers, nn.LayerNorm(dim))
        self.conv_proj = ConvLayer(dim, cin, 1)
        self.fusion = ConvLayer(2 * cin, cin, 3)
        self.p = patch

    def unfolding(self, fm):  # cvnets MobileViTBlock.unfolding (sizes divisible by the patch here)
        B, C, H, W = fm.shape
        p = self.p
        nh, nw = H // p, W // p
        x = fm.reshape(B * C * nh, p, nw, p).transpose(1, 2)
        x = x.reshape(B, C, nh * nw, p * p).transpose(1, 3)
        return x.reshape(B * p * p, nh * nw, -1), (B, C, H, W)

    def folding(self, patches, shape):
        B, C, H, W = shape
        p = self.p
        nh, nw = H // p, W // p
        x = patches.contiguous().view(B, p * p, nh * nw, -1).transpose(1, 3)
        x = x.reshape(B * C * nh, nw, p, p).transpose(1, 2)
        return x.reshape(B, C, H, W)

    def forward(self, x):
        res = x
        fm = self.local_rep(x)
        patches, shape = self.unfolding(fm)
        fm = self.folding(self.global_rep(patches), shape)
        return self.fusion(torch.cat((res, self.conv_proj(fm)), dim=1))


class CvnetsMobileViT(nn.Module):
    def __init__(self, variant, num_classes=1000):
        super().__init__()
        c = CVNETS_CFG[variant]
        self.conv_1 = ConvLayer(3, 16, 3, stride=2)
        self.layer_1 = nn.Sequential(InvertedResidual(16, c["l1"], 1, c["exp"]))
        self.layer_2 = nn.Sequential(*[
            InvertedResidual(c["l1"] if i == 0 else c["l2"], c["l2"], 2 if i == 0 else 1, c["exp"]) for i in range(3)])
        prev = c["l2"]
        for i, (out, dim, ffn, n) in enumerate(c["mvit"]):
            setattr(self, f"layer_{i + 3}", nn.Sequential(InvertedResidual(prev, out, 2, c["exp"]),
                                                          MobileViTBlock(out, dim, ffn, n)))
            prev = out
        self.conv_1x1_exp = ConvLayer(prev, min(4 * prev, 960), 1)
        self.classifier = nn.Sequential()
        self.classifier.add_module("dropout", nn.Dropout(0.0))
        self.classifier.add_module("fc", LinearLayer(min(4 * prev, 960), num_classes))

    def forward(self, x):
        x = self.conv_1(x)
        for i in range(1, 6):
            x = getattr(self, f"layer_{i}")(x)
        x = self.conv_1x1_exp(x).mean((2, 3))
        return self.classifier(x)


def _randomize_(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var")
                        else torch.randn(v.shape, generator=g) * 0.2)
    return m.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models, shared 2-core machine


def test_key_examples():
    ex = {
        "conv_1.block.conv.weight": "stem.conv.weight",
        "conv_1.block.norm.running_var": "stem.bn.running_var",
        "layer_1.0.block.exp_1x1.block.conv.weight": "stages.0.0.conv1_1x1.conv.weight",
        "layer_2.2.block.conv_3x3.block.norm.bias": "stages.1.2.conv2_kxk.bn.bias",
        "layer_2.0.block.red_1x1.block.norm.num_batches_tracked": "stages.1.0.conv3_1x1.bn.num_batches_tracked",
        "layer_3.1.local_rep.conv_3x3.block.conv.weight": "stages.2.1.conv_kxk.conv.weight",
        "layer_3.1.local_rep.conv_1x1.block.conv.weight": "stages.2.1.conv_1x1.weight",
        "layer_3.1.global_rep.0.pre_norm_mha.0.weight": "stages.2.1.transformer.0.norm1.weight",
        "layer_3.1.global_rep.1.pre_norm_mha.1.qkv_proj.weight": "stages.2.1.transformer.1.attn.qkv.weight",
        "layer_4.1.global_rep.3.pre_norm_mha.1.out_proj.bias": "stages.3.1.transformer.3.attn.proj.bias",
        "layer_4.1.global_rep.3.pre_norm_ffn.0.bias": "stages.3.1.transformer.3.norm2.bias",
        "layer_5.1.global_rep.2.pre_norm_ffn.1.weight": "stages.4.1.transformer.2.mlp.fc1.weight",
        "layer_5.1.global_rep.2.pre_norm_ffn.4.bias": "stages.4.1.transformer.2.mlp.fc2.bias",
        "layer_5.1.global_rep.3.weight": "stages.4.1.norm.weight",
        "layer_5.1.conv_proj.block.norm.weight": "stages.4.1.conv_proj.bn.weight",
        "layer_5.1.fusion.block.conv.weight": "stages.4.1.conv_fusion.conv.weight",
        "conv_1x1_exp.block.norm.running_mean": "final_conv.bn.running_mean",
        "classifier.fc.weight": "head.fc.weight",
        "something.else": "something.else",  # unknown keys pass through (a strict load then names them)
    }
    for k, v in ex.items():
        assert apple_key_to_timm(k) == v, k


@pytest.mark.parametrize("variant", ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"])
def test_apple_layout_maps_to_ours_and_computes_the_same(variant, tmp_path):
    apple = _randomize_(CvnetsMobileViT(variant), seed=1)
    apple_sd = apple.state_dict()
    assert "layer_3.1.global_rep.0.pre_norm_mha.1.qkv_proj.weight" in apple_sd and "classifier.fc.weight" in apple_sd
    ours = create_model(variant)
    assert is_apple_mobilevit(apple_sd) and not is_apple_mobilevit(ours.state_dict())

    mapped = apple_to_timm(apple_sd)
    own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in mapped.items()}
    assert sorted(set(own) - set(got)) == [] and sorted(set(got) - set(own)) == []
    assert got == own
    ours.load_state_dict(mapped, strict=True)

    # through the checkpoint loader (--checkpoint): Apple layout and timm layout give the same model
    apple_path = save_safetensors(apple_sd, tmp_path / "apple.safetensors")
    timm_path = save_safetensors(mapped, tmp_path / "timm.safetensors")
    torch.save({"model": apple_sd}, tmp_path / "apple.pt")  # a wrapped .pt as ml-cvnets writes too
    from_apple = create_model(variant, checkpoint=str(apple_path))
    from_timm = create_model(variant, checkpoint=str(timm_path))
    from_pt = create_model(variant, checkpoint=str(tmp_path / "apple.pt"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = apple(x)
        out = from_apple(x)
        assert torch.equal(out, from_timm(x)) and torch.equal(out, from_pt(x))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # ml-cvnets' own forward
        assert ref.abs().max() > 0.1


def test_norm1_norm2_not_swapped():
    # the only same-shaped pair in a transformer layer: a swap would pass the shape check, so pin it
    assert apple_key_to_timm("layer_3.1.global_rep.0.pre_norm_mha.0.bias").endswith("norm1.bias")
    assert apple_key_to_timm("layer_3.1.global_rep.0.pre_norm_ffn.0.bias").endswith("norm2.bias")
