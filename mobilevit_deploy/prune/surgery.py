"""Structured removal on module instances: slice Conv2d / BatchNorm2d / Linear / LayerNorm weights in
place and keep every attribute that the forward reads consistent. The result is a smaller dense model
(plain nn modules, nothing masked), which exports like the original.

`apply_plan(model, plan)` takes `{group_id: kept unit indices}` (structures.Group ids of the model as
it is now) and removes the other units. Layers are removed last, so every path in a plan refers to
the model before any layer of it went away.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .structures import Coupling, Group, couplings, groups

# ------------------------------------------------------------------------------ module slicing


def _param(t: torch.Tensor, idx: torch.Tensor, dim: int) -> nn.Parameter:
    p = nn.Parameter(t.detach().index_select(dim, idx).clone(), requires_grad=t.requires_grad)
    return p


def _buffer(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.detach().index_select(0, idx).clone()


def shrink_conv(conv: nn.Conv2d, out_keep: torch.Tensor | None = None, in_keep: torch.Tensor | None = None) -> None:
    """Keep output channels `out_keep` / input channels `in_keep`. A depthwise conv
    (groups == in == out) keeps its input channels with its output channels."""
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if conv.groups > 1 and not depthwise:
        raise ValueError("shrink_conv: grouped (non-depthwise) convolutions are not supported")
    if out_keep is not None:
        conv.weight = _param(conv.weight, out_keep, 0)
        if conv.bias is not None:
            conv.bias = _param(conv.bias, out_keep, 0)
        conv.out_channels = len(out_keep)
        if depthwise:
            conv.in_channels = conv.groups = len(out_keep)
    if in_keep is not None:
        if depthwise:
            raise ValueError("shrink_conv: a depthwise conv's inputs follow its outputs")
        conv.weight = _param(conv.weight, in_keep, 1)
        conv.in_channels = len(in_keep)


def shrink_linear(lin: nn.Linear, out_keep: torch.Tensor | None = None, in_keep: torch.Tensor | None = None) -> None:
    if out_keep is not None:
        lin.weight = _param(lin.weight, out_keep, 0)
        if lin.bias is not None:
            lin.bias = _param(lin.bias, out_keep, 0)
        lin.out_features = len(out_keep)
    if in_keep is not None:
        lin.weight = _param(lin.weight, in_keep, 1)
        lin.in_features = len(in_keep)


def shrink_batchnorm(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    if bn.weight is not None:
        bn.weight = _param(bn.weight, keep, 0)
        bn.bias = _param(bn.bias, keep, 0)
    if bn.running_mean is not None:
        bn.running_mean = _buffer(bn.running_mean, keep)
        bn.running_var = _buffer(bn.running_var, keep)
    bn.num_features = len(keep)


def shrink_layernorm(ln: nn.LayerNorm, keep: torch.Tensor) -> None:
    if len(ln.normalized_shape) != 1:
        raise ValueError("shrink_layernorm: only LayerNorms over the last dimension")
    if ln.weight is not None:
        ln.weight = _param(ln.weight, keep, 0)
    if ln.bias is not None:
        ln.bias = _param(ln.bias, keep, 0)
    ln.normalized_shape = (len(keep),)


def shrink_module(mod: nn.Module, role: str, keep: torch.Tensor) -> None:
    """Slice one module along `role` ("out", "in" or "norm") to the indices `keep`."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if isinstance(mod, nn.Conv2d):
        shrink_conv(mod, out_keep=keep if role == "out" else None, in_keep=keep if role == "in" else None)
    elif isinstance(mod, nn.Linear):
        shrink_linear(mod, out_keep=keep if role == "out" else None, in_keep=keep if role == "in" else None)
    elif isinstance(mod, nn.BatchNorm2d):
        shrink_batchnorm(mod, keep)
    elif isinstance(mod, nn.LayerNorm):
        shrink_layernorm(mod, keep)
    else:
        raise TypeError(f"cannot shrink a {type(mod).__name__}")


def resize_module(mod: nn.Module, spec: Mapping) -> None:
    """Shrink `mod` to the shape in `spec` (record.py's per-module form), keeping the first indices
    (the values are overwritten by the checkpoint that is loaded next)."""
    if isinstance(mod, nn.Conv2d):
        out_c, in_c = int(spec["out_channels"]), int(spec["in_channels"])
        if out_c != mod.out_channels:
            shrink_conv(mod, out_keep=torch.arange(out_c))
        if in_c != mod.in_channels:
            shrink_conv(mod, in_keep=torch.arange(in_c))
        if int(spec.get("groups", mod.groups)) != mod.groups:
            raise ValueError(f"groups {spec['groups']} != {mod.groups} after resizing")
    elif isinstance(mod, nn.Linear):
        shrink_linear(mod, out_keep=torch.arange(int(spec["out_features"])),
                      in_keep=torch.arange(int(spec["in_features"])))
    elif isinstance(mod, nn.BatchNorm2d):
        shrink_batchnorm(mod, torch.arange(int(spec["num_features"])))
    elif isinstance(mod, nn.LayerNorm):
        shrink_layernorm(mod, torch.arange(int(spec["normalized_shape"][-1])))
    else:
        raise TypeError(f"cannot resize a {type(mod).__name__}")


# --------------------------------------------------------------------------- structure removal


def _keep_indices(c: Coupling, keep_units: torch.Tensor) -> torch.Tensor:
    mask = torch.isin(c.unit_of, keep_units)
    return torch.nonzero(mask).flatten()


def _renumber_heads(attn: nn.Module, keep_units: torch.Tensor) -> None:
    # head count shrinks; head_dim and the softmax scale stay those of the unpruned model
    attn.num_heads = len(keep_units)
    m = getattr(attn, "_spvit_map", None)  # spvit's head-to-position mapping follows the kept heads
    if m is not None and m.shape[1] > len(keep_units):
        m = m[:, keep_units]
        attn._spvit_map = m / m.sum(1, keepdim=True).clamp_min(1e-12)


def prune_group(model: nn.Module, group: Group, keep_units: Sequence[int]) -> None:
    """Remove every unit of `group` not in `keep_units` (a channel / head group; see prune_layers)."""
    keep = torch.as_tensor(sorted(int(u) for u in keep_units), dtype=torch.long)
    if len(keep) == 0:
        raise ValueError(f"{group.id}: cannot remove every unit")
    if len(keep) == group.size:
        return
    for c in couplings(model, group):
        shrink_module(c.module, c.role, _keep_indices(c, keep))
    if group.kind == "heads":
        _renumber_heads(model.get_submodule(group.path), keep)


def prune_layers(model: nn.Module, block_path: str, keep_layers: Sequence[int]) -> None:
    """Keep only the transformer layers `keep_layers` (indices) of the MobileViT block at `block_path`.

    The kept layers' original indices (relative to the unpruned model) are remembered on the new
    Sequential as `_prune_kept`, for the architecture record."""
    block = model.get_submodule(block_path)
    old = block.transformer
    keep = sorted(int(i) for i in keep_layers)
    if not keep:
        raise ValueError(f"{block_path}: cannot remove every transformer layer")
    if keep == list(range(len(old))):
        return
    orig = list(getattr(old, "_prune_kept", range(len(old))))
    new = nn.Sequential(*[old[i] for i in keep])
    new._prune_kept = [orig[i] for i in keep]
    block.transformer = new


def convert_attention(model: nn.Module, attn_path: str, kernel_size: int = 3) -> None:
    """SPViT: replace the attention at `attn_path` by a ConvAttention built from its weights (prune/modules.py),
    with the head-to-position mapping learned by `spvit` scoring (`attn._spvit_map`; uniform if absent)."""
    from .modules import conv_from_attention, is_conv_attention

    parent_path, _, name = attn_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    attn = getattr(parent, name)
    if is_conv_attention(attn):
        return
    setattr(parent, name, conv_from_attention(attn, getattr(attn, "_spvit_map", None), kernel_size))


def apply_plan(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> nn.Module:
    """Apply `{group_id: kept units}` in place; groups not in the plan keep everything. Returns model.
    Order: channel / head groups, then attention -> convolution (`attn_conv`: the kept units are the
    layers that stay attention), then whole layers."""
    from .structures import ALL_KINDS

    by_id = {g.id: g for g in groups(model, ALL_KINDS)}
    unknown = [gid for gid in plan if gid not in by_id]
    if unknown:
        raise KeyError(f"plan names groups this model does not have: {unknown[:3]}")
    for gid, keep in plan.items():
        g = by_id[gid]
        if g.kind not in ("layers", "attn_conv"):
            prune_group(model, g, keep)
    for gid, keep in plan.items():
        g = by_id[gid]
        if g.kind == "attn_conv":
            block = model.get_submodule(g.path)
            for i in range(len(block.transformer)):
                if i not in set(int(k) for k in keep):
                    convert_attention(model, f"{g.path}.transformer.{i}.attn")
    for gid, keep in plan.items():
        g = by_id[gid]
        if g.kind == "layers":
            prune_layers(model, g.path, keep)
    return model
