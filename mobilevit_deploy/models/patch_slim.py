"""Patch Slimming (Tang et al., CVPR 2022): static per-layer kept patches, chosen top-down from calibration images.

Paper: `Patch Slimming for Efficient Vision Transformers` - Yehui Tang, Kai Han, Yunhe Wang, Chang Xu,
    Jianyuan Guo, Chao Xu, Dacheng Tao, CVPR 2022 - https://arxiv.org/abs/2106.02852

The method (its static form; DPS-ViT, the input-dependent variant, is not built here): for a
classifier only the class token of the last layer matters. Going from the last layer down, layer l
must compute every patch the layer above still needs (its effective patches: residual path), plus
the patches whose attention contribution to those effective outputs is large; patches are added in
decreasing impact until the dropped impact is within a tolerance epsilon. The kept sets are nested
(a patch dropped at layer l stays dropped above), so the model gets a pyramid of static token counts.

Impact estimate used here, from the dense model on real calibration images (never random tensors):

    W_l[j, i] = E_images[ mean_h A_l^h[j, i] * ||v_l^h(i)|| ]      (attention of query j on key i,
                                                                    times the size of what i sends)
    s_l(i)    = sum over j in (prefix tokens + effective patches of layer l+1) of W_l[j, i]

Layer l keeps the effective patches of layer l+1 and then the highest-impact others until
sum(kept s_l) >= (1 - eps) * sum(all s_l). In this package's ViT a layer's token reduction sits between
its attention and its MLP (as EViT's), so layer l attends over its kept set and runs the MLP only on
the set layer l+1 needs; the last layer runs its MLP on the class token alone (the other outputs are
unused by the classifier: exact).

To compare with EViT / DynamicViT at a `keep_rate`, eps is found by bisection so that the schedule's
compute (a MAC model of qkv/proj/attention/MLP per token) does not exceed that of EViT's schedule at
the same keep rate at layers (3, 6, 9) on the same input. The result is a record of model options:

    {"token_reduction": "patch_slim", "slim_order": [patch indices, most durable first],
     "slim_counts": [patches entering block 0, ..., block L-1, leaving block L-1], "keep_rate": r,
     "patch_slim": {"epsilon": eps, "calibration_images": n, "calibration_data": "...", "mac_budget": ...}}

`create_model(name, **record_kwargs(record))` builds the reduced model; stored as `model_kwargs` in a
checkpoint's JSON it travels with the weights (export / evaluate / bench read it).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..errors import UserError
from .deit import VisionTransformer, token_schedule
from .layers import split_heads

__all__ = ["attention_impact", "slim_schedule", "calibrate_patch_slimming", "schedule_cost", "evit_cost",
           "record_kwargs"]


@torch.no_grad()
def attention_impact(model: VisionTransformer, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """[depth, P + N, P + N]: per layer, the mean over images and heads of A[j, i] * ||v_i|| (dense model)."""
    if model.token_reduction != "evit" or model.keep_rate < 1.0:
        raise UserError("Patch Slimming is calibrated on the dense model (keep_rate=1)")
    was = model.training
    model.eval()
    total, n = None, 0
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size]
            B = x.shape[0]
            t = model._pos_embed(model.patch_embed(x))
            per_layer = []
            for blk in model.blocks:
                a = blk.attn
                h = a.num_heads
                y = blk.norm1(t)
                qkv = split_heads(a.qkv(y), 3 * h)
                q, k, v = qkv[:h * B], qkv[h * B:2 * h * B], qkv[2 * h * B:]
                attn = torch.bmm(q * a.scale, k.transpose(1, 2)).softmax(-1)  # [h * B, N, N]
                w = attn * v.norm(dim=-1).unsqueeze(1)  # [h * B, N(query), N(key)] * ||v_key||
                per_layer.append(w.reshape(h, B, *w.shape[1:]).mean(0).sum(0))  # sum over images
                t = blk(t)
            s = torch.stack(per_layer)  # [depth, N, N]
            total = s if total is None else total + s
            n += B
    finally:
        model.train(was)
    return total / max(n, 1)


def _nested_sets(impact: torch.Tensor, num_prefix: int, eps: float) -> list[list[int]]:
    """Top-down kept patch sets (patch indices 0..N-1) per layer for tolerance eps; sets[L] = [] (after the last)."""
    L, T, _ = impact.shape
    N = T - num_prefix
    sets: list[list[int]] = [[] for _ in range(L + 1)]
    needed: list[int] = []
    for layer in range(L - 1, -1, -1):
        rows = list(range(num_prefix)) + [num_prefix + i for i in needed]
        score = impact[layer][rows][:, num_prefix:].sum(0).double()  # [N]
        total = float(score.sum())
        kept = list(needed)
        mass = float(score[kept].sum()) if kept else 0.0
        have = set(kept)
        for i in torch.argsort(score, descending=True, stable=True).tolist():
            if mass >= (1.0 - eps) * total - 1e-12 or len(kept) == N:
                break
            if i not in have:
                kept.append(i)
                have.add(i)
                mass += float(score[i])
        if not kept:  # at least one patch token reaches every attention layer
            kept = [int(torch.argmax(score))]
        sets[layer] = kept
        needed = kept
    return sets


def schedule_cost(counts: Sequence[int], embed_dim: int, num_prefix: int, mlp_ratio: float = 4.0) -> float:
    """MACs / embed_dim of the blocks for Patch Slimming counts (attention over counts[l], MLP over counts[l+1])."""
    C, P = embed_dim, num_prefix
    cost = 0.0
    for n_in, n_mlp in zip(counts[:-1], counts[1:]):
        a, m = P + n_in, P + n_mlp
        cost += 4 * C * a + 2 * a * a + 2 * mlp_ratio * C * m
    return cost


def evit_cost(num_patches: int, depth: int, keep_rate: float, keep_layers: Sequence[int], embed_dim: int,
              num_prefix: int, mlp_ratio: float = 4.0) -> float:
    """The same MAC model for EViT's schedule (the fused token counts as a patch token)."""
    C, P = embed_dim, num_prefix
    cost = 0.0
    for m, k in token_schedule(num_patches, depth, keep_rate, keep_layers):
        a, n = P + m, P + (k + 1 if k < m else m)
        cost += 4 * C * a + 2 * a * a + 2 * mlp_ratio * C * n
    return cost


def slim_schedule(impact: torch.Tensor, num_prefix: int, eps: float) -> tuple[list[int], list[int]]:
    """(slim_order, slim_counts) of the nested sets for tolerance eps."""
    sets = _nested_sets(impact, num_prefix, eps)
    N = impact.shape[-1] - num_prefix
    counts = [len(s) for s in sets]
    # order: patches by the last layer that still needs them (most durable first), then the layer's own order
    last = {}
    for layer, s in enumerate(sets):
        for i in s:
            last[i] = layer
    order = sorted(range(N), key=lambda i: (-last.get(i, -1), sets[last[i]].index(i) if i in last else i))
    return order, counts


def calibrate_patch_slimming(model: VisionTransformer, images: torch.Tensor, keep_rate: float,
                             keep_layers: Sequence[int] = (3, 6, 9), data_note: str = "") -> dict:
    """Per-layer kept patches from calibration `images` ([n, 3, H, W], preprocessed as the model expects)
    at the compute budget of EViT with `keep_rate`; returns the model-options record (module docstring)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise UserError("Patch Slimming needs calibration images as a [n, 3, H, W] tensor (n >= 1)")
    from .deit import check_keep_rate

    keep_rate = check_keep_rate(keep_rate)
    impact = attention_impact(model, images)
    P, C, L = model.num_prefix_tokens, model.embed_dim, len(model.blocks)
    N = impact.shape[-1] - P
    budget = evit_cost(N, L, keep_rate, keep_layers, C, P)
    lo, hi = 0.0, 1.0  # eps: 0 keeps every patch with any impact; 1 keeps the minimum
    order, counts = slim_schedule(impact, P, hi)
    if schedule_cost(counts, C, P) <= budget:
        for _ in range(40):
            mid = (lo + hi) / 2
            o, c = slim_schedule(impact, P, mid)
            if schedule_cost(c, C, P) <= budget:
                hi, order, counts = mid, o, c
            else:
                lo = mid
    return {"token_reduction": "patch_slim", "slim_order": order, "slim_counts": counts, "keep_rate": keep_rate,
            "patch_slim": {"epsilon": hi, "calibration_images": int(images.shape[0]),
                           "calibration_data": data_note, "mac_budget_per_dim": budget,
                           "mac_model_per_dim": schedule_cost(counts, C, P),
                           "dense_per_dim": schedule_cost([N] * (L + 1), C, P)}}


def record_kwargs(record: dict) -> dict:
    """The constructor options of a calibration record (`create_model(name, **record_kwargs(r))`)."""
    return {k: record[k] for k in ("token_reduction", "slim_order", "slim_counts")}


def load_calibration_images(data: str | os.PathLike | None, deploy_cfg, n: int = 256) -> tuple[torch.Tensor, str]:
    """(n real images [n, 3, H, W], a description): class-balanced and deterministic, from an ImageFolder or
    a folder of images (None: the 40 shipped samples), preprocessed with the model's eval transform
    (quantize/calibration.py, the loader the PTQ schemes use)."""
    from ..quantize.calibration import calibration_batches, load_calibration

    calib = load_calibration(data, n)
    x = torch.cat(list(calibration_batches(calib, deploy_cfg, progress=False)), dim=0)
    return x, f"{x.shape[0]} images of {calib.source} (class-balanced over {calib.classes} folder(s))"
