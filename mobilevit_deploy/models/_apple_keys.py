"""Apple's original MobileViT checkpoints (ml-cvnets / corenet) -> this package's (timm's) key layout.

Apple's release names modules after ml-cvnets' MobileViT; timm (and `models/mobilevit.py`) use the
byobnet names. The tensors are the same (same shapes, same qkv packing (3, heads, head_dim)), so the
map is a pure rename:

    ml-cvnets                                               timm / mobilevit.py
    conv_1.block.{conv,norm}.*                              stem.{conv,bn}.*
    layer_{s}.{j}.block.exp_1x1.block.{conv,norm}.*         stages.{s-1}.{j}.conv1_1x1.{conv,bn}.*
    layer_{s}.{j}.block.conv_3x3.block.{conv,norm}.*        stages.{s-1}.{j}.conv2_kxk.{conv,bn}.*
    layer_{s}.{j}.block.red_1x1.block.{conv,norm}.*         stages.{s-1}.{j}.conv3_1x1.{conv,bn}.*
    layer_{s}.{j}.local_rep.conv_3x3.block.{conv,norm}.*    stages.{s-1}.{j}.conv_kxk.{conv,bn}.*
    layer_{s}.{j}.local_rep.conv_1x1.block.conv.weight      stages.{s-1}.{j}.conv_1x1.weight
    layer_{s}.{j}.global_rep.{i}.pre_norm_mha.0.*           stages.{s-1}.{j}.transformer.{i}.norm1.*
    layer_{s}.{j}.global_rep.{i}.pre_norm_mha.1.qkv_proj.*  stages.{s-1}.{j}.transformer.{i}.attn.qkv.*
    layer_{s}.{j}.global_rep.{i}.pre_norm_mha.1.out_proj.*  stages.{s-1}.{j}.transformer.{i}.attn.proj.*
    layer_{s}.{j}.global_rep.{i}.pre_norm_ffn.0.*           stages.{s-1}.{j}.transformer.{i}.norm2.*
    layer_{s}.{j}.global_rep.{i}.pre_norm_ffn.1.*           stages.{s-1}.{j}.transformer.{i}.mlp.fc1.*
    layer_{s}.{j}.global_rep.{i}.pre_norm_ffn.4.*           stages.{s-1}.{j}.transformer.{i}.mlp.fc2.*
    layer_{s}.{j}.global_rep.{L}.*  (closing LayerNorm)      stages.{s-1}.{j}.norm.*
    layer_{s}.{j}.conv_proj.block.{conv,norm}.*             stages.{s-1}.{j}.conv_proj.{conv,bn}.*
    layer_{s}.{j}.fusion.block.{conv,norm}.*                stages.{s-1}.{j}.conv_fusion.{conv,bn}.*
    conv_1x1_exp.block.{conv,norm}.*                        final_conv.{conv,bn}.*
    classifier.fc.*                                         head.fc.*

(ml-cvnets' ConvLayer is `block = Sequential(conv, norm, act)`, its InvertedResidual `block =
Sequential(exp_1x1, conv_3x3, red_1x1)`, its TransformerEncoder `pre_norm_mha = Sequential(LayerNorm,
MultiHeadAttention(qkv_proj, out_proj), Dropout)` and `pre_norm_ffn = Sequential(LayerNorm, Linear,
act, Dropout, Linear, Dropout)`; a MobileViT block's `global_rep` ends with a LayerNorm.)
Keys that match no rule are passed through unchanged, so a strict load names them.
"""
from __future__ import annotations

import re

__all__ = ["is_apple_mobilevit", "apple_to_timm", "apple_key_to_timm"]

_CONV_LAYER = r"\.block\.(conv|norm)\.(.+)$"  # ConvLayer tail -> .{conv,bn}.<param>
_IR = {"exp_1x1": "conv1_1x1", "conv_3x3": "conv2_kxk", "red_1x1": "conv3_1x1"}
_MVIT_CONV = {"local_rep.conv_3x3": "conv_kxk", "conv_proj": "conv_proj", "fusion": "conv_fusion"}
_MHA = {"0": "norm1", "1.qkv_proj": "attn.qkv", "1.out_proj": "attn.proj"}
_FFN = {"0": "norm2", "1": "mlp.fc1", "4": "mlp.fc2"}


def _conv(tail: str) -> str | None:
    m = re.match(_CONV_LAYER, tail)
    if m is None:
        return None
    return f".{'conv' if m.group(1) == 'conv' else 'bn'}.{m.group(2)}"


def apple_key_to_timm(key: str) -> str:
    """One ml-cvnets MobileViT key -> its timm name (unchanged when no rule matches)."""
    for src, dst in (("conv_1", "stem"), ("conv_1x1_exp", "final_conv")):
        if key.startswith(src + ".block."):
            tail = _conv(key[len(src):])
            if tail:
                return dst + tail
    m = re.match(r"^classifier\.fc\.(.+)$", key)
    if m:
        return f"head.fc.{m.group(1)}"
    m = re.match(r"^layer_(\d+)\.(\d+)\.(.+)$", key)
    if m is None:
        return key
    stage, block, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
    prefix = f"stages.{stage}.{block}."
    # inverted residual
    m = re.match(r"^block\.(exp_1x1|conv_3x3|red_1x1)(\..+)$", rest)
    if m and _conv(m.group(2)):
        return prefix + _IR[m.group(1)] + _conv(m.group(2))
    # MobileViT block: convolutions
    for src, dst in _MVIT_CONV.items():
        if rest.startswith(src + ".block."):
            tail = _conv(rest[len(src):])
            if tail:
                return prefix + dst + tail
    if rest == "local_rep.conv_1x1.block.conv.weight":
        return prefix + "conv_1x1.weight"
    # MobileViT block: transformer layers and the closing LayerNorm
    m = re.match(r"^global_rep\.(\d+)\.(.+)$", rest)
    if m:
        i, tail = m.group(1), m.group(2)
        if tail in ("weight", "bias"):
            return prefix + f"norm.{tail}"
        m2 = re.match(r"^pre_norm_mha\.(0|1\.qkv_proj|1\.out_proj)\.(weight|bias)$", tail)
        if m2:
            return prefix + f"transformer.{i}.{_MHA[m2.group(1)]}.{m2.group(2)}"
        m2 = re.match(r"^pre_norm_ffn\.(0|1|4)\.(weight|bias)$", tail)
        if m2:
            return prefix + f"transformer.{i}.{_FFN[m2.group(1)]}.{m2.group(2)}"
    return key


def is_apple_mobilevit(sd) -> bool:
    """True for a state dict laid out as Apple's ml-cvnets / corenet MobileViT (v1)."""
    keys = set(sd)
    return ("conv_1.block.conv.weight" in keys
            and any(k.startswith("layer_1.") for k in keys)
            and any(".global_rep." in k or k.startswith("conv_1x1_exp.") for k in keys))


def apple_to_timm(sd: dict) -> dict:
    """Rename an ml-cvnets MobileViT state dict to timm's layout (tensors unchanged, order kept)."""
    out = {}
    for k, v in sd.items():
        new = apple_key_to_timm(k)
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r}")
        out[new] = v
    return out
