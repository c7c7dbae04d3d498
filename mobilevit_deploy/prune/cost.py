"""MACs of a model, counted (FlopCounterMode) and predicted for any pruning state (analytic).

Convention as bench/flops.py: MACs = FLOPs / 2 with FlopCounterMode's counting (conv, mm, addmm, bmm;
not norms, activations or softmax). `count_macs(model, (H, W))` counts one forward.

`CostModel(model, (H, W))` measures the geometry once (each block's input / output size at the
deploy input size) and then gives the MACs of any `State` -- the size of every prunable group and
the removed transformer layers -- without building the model:

  MV2 block, hidden m:        m * (HW_in * C_in + HW_out * k^2 + HW_out * C_out)
  MobileViT block, width d:   2 * HW * C * d  (conv_1x1, conv_proj)
    + per kept layer (h heads of head_dim e, MLP hidden m, T = tokens of all p*p sequences,
      N = T / p^2 tokens per sequence):
      qkv + proj 4 T d h e,  q k^T and attn v  2 T N h e,  fc1 + fc2  2 T d m
      (a layer whose attention is a ConvAttention (spvit): v + proj 2 T d h e, depthwise T h e k^2,
      counted with the depthwise convolutions of the "mv2" term)

plus a constant (stem, local convs, fusion, final conv, head) = counted MACs - the variable part of
the unpruned state. `terms(state)` splits the MACs by op class ("mv2", "linear", "attn") and counts
the kept layers ("layers"), the features of the latency model (latency.py).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .modules import is_conv_attention
from .structures import ALL_KINDS, Group, groups, is_irffn, is_mobilevit_block, is_mv2


def count_macs(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one forward of `model` on [1, 3, H, W] (FlopCounterMode FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, int(input_size[0]), int(input_size[1]))
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was)
    return int(fc.get_total_flops()) // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class State:
    """Group sizes ({group id: units}), removed layers ({MobileViT block path: {layer index}}) and
    layers whose attention is a convolution ({MobileViT block path: {layer index}}, spvit)."""

    sizes: dict
    dropped: dict = field(default_factory=dict)
    conv: dict = field(default_factory=dict)

    def copy(self) -> State:
        return State(dict(self.sizes), {k: set(v) for k, v in self.dropped.items()},
                     {k: set(v) for k, v in self.conv.items()})


class CostModel:
    def __init__(self, model: nn.Module, input_size: tuple[int, int]):
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.groups: list[Group] = groups(model, ALL_KINDS)
        self.mv2: dict[str, dict] = {}
        self.vit: dict[str, dict] = {}
        self.ffn: dict[str, dict] = {}
        hooks = []
        for path, m in model.named_modules():
            if is_mv2(m) or is_mobilevit_block(m) or is_irffn(m):
                hooks.append(m.register_forward_hook(self._hook(path, m)))
        try:
            total = count_macs(model, self.input_size)
        finally:
            for h in hooks:
                h.remove()
        self.const = total - self.macs(self.initial_state())
        self.total0 = total

    def _hook(self, path: str, m: nn.Module):
        def hook(mod, inputs, output):
            if is_irffn(mod):  # CMT: [B, N, C] in, N = H * W
                self.ffn[path] = {"hw": inputs[0].shape[1], "c": mod.conv1[0].in_channels,
                                  "k2": mod.proj.kernel_size[0] * mod.proj.kernel_size[1]}
                return
            _, _, hi, wi = inputs[0].shape
            _, _, ho, wo = output.shape
            if is_mv2(mod):
                k = mod.conv2_kxk.conv.kernel_size
                self.mv2[path] = {"hw_in": hi * wi, "hw_out": ho * wo, "k2": k[0] * k[1],
                                  "c_in": mod.conv1_1x1.conv.in_channels, "c_out": mod.conv3_1x1.conv.out_channels}
            else:
                p = mod.patch_size
                nh, nw = math.ceil(hi / p) * p, math.ceil(wi / p) * p
                T = nh * nw
                self.vit[path] = {"hw": hi * wi, "c": mod.conv_1x1.in_channels, "T": T, "N": T // (p * p),
                                  "head_dim": [layer.attn.head_dim for layer in mod.transformer],
                                  "heads": [layer.attn.num_heads for layer in mod.transformer],
                                  "conv": {i for i, layer in enumerate(mod.transformer)
                                           if is_conv_attention(layer.attn)},
                                  "k2": [layer.attn.kernel_size ** 2 if is_conv_attention(layer.attn) else 9
                                         for layer in mod.transformer],
                                  "n_layers": len(mod.transformer)}
        return hook

    def initial_state(self) -> State:
        return State({g.id: g.size for g in self.groups}, {p: set() for p in self.vit},
                     {p: set(g["conv"]) for p, g in self.vit.items()})

    def terms(self, s: State) -> dict:
        mv2 = lin = att = 0
        n_layers = 0
        for path, g in self.mv2.items():
            m = s.sizes.get(f"mv2_hidden:{path}", 0)
            mv2 += m * (g["hw_in"] * g["c_in"] + g["hw_out"] * g["k2"] + g["hw_out"] * g["c_out"])
        for path, g in self.ffn.items():  # CMT IRFFN: 1x1 in, depthwise, 1x1 out
            m = s.sizes.get(f"ffn_hidden:{path}", 0)
            mv2 += m * g["hw"] * (2 * g["c"] + g["k2"])
        for path, g in self.vit.items():
            d = s.sizes[f"vit_width:{path}"]
            lin += 2 * g["hw"] * g["c"] * d
            T, N = g["T"], g["N"]
            for i in range(g["n_layers"]):
                if i in s.dropped.get(path, ()):
                    continue
                n_layers += 1
                h = s.sizes.get(f"heads:{path}.transformer.{i}.attn", g["heads"][i])
                e = g["head_dim"][i]
                m = s.sizes[f"mlp_hidden:{path}.transformer.{i}.mlp"]
                lin += 2 * T * d * m
                if i in s.conv.get(path, ()):
                    lin += 2 * T * d * h * e
                    mv2 += T * h * e * g["k2"][i]
                else:
                    lin += 4 * T * d * h * e
                    att += 2 * T * N * h * e
        return {"mv2": mv2, "linear": lin, "attn": att, "layers": n_layers}

    def macs(self, s: State) -> int:
        t = self.terms(s)
        return int(getattr(self, "const", 0) + t["mv2"] + t["linear"] + t["attn"])


def state_of_plan(cost: CostModel, plan: dict) -> State:
    """The State after `plan` ({group id: kept units}) on the model `cost` was measured on."""
    s = cost.initial_state()
    for gid, keep in plan.items():
        kind, _, path = gid.partition(":")
        if kind == "layers":
            n = cost.vit[path]["n_layers"]
            s.dropped[path] = set(range(n)) - {int(i) for i in keep}
            s.sizes[gid] = len(keep)
        elif kind == "attn_conv":
            n = cost.vit[path]["n_layers"]
            s.conv[path] = s.conv.get(path, set()) | (set(range(n)) - {int(i) for i in keep})
            s.sizes[gid] = len(keep)
        else:
            s.sizes[gid] = len(keep)
    return s


def pruned_copy(model: nn.Module, plan: dict) -> nn.Module:
    from .surgery import apply_plan

    return apply_plan(copy.deepcopy(model), plan)
