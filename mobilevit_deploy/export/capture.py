"""One `torch.export` capture per export; every target lowers from the ExportedProgram it returns.

The graph is captured at batch 1 with the DeployCfg's input size (static shapes: what a phone runs).
For Core ML the captured module is `CoreMLClassifier(model)`: it ends in a softmax (so the
classifier's `classLabel_probs` are probabilities, as Vision and Xcode expect) and, when the std is
not the same for all channels, applies the per-channel part of the normalisation inside the graph,
because a Core ML ImageType has only one scalar scale (see `channel_scale`).
"""
from __future__ import annotations

import torch
from torch import nn


def channel_scale(deploy_cfg) -> list[float] | None:
    """`DeployCfg.channel_scale`: the per-channel part of the normalisation the Core ML graph applies."""
    return deploy_cfg.channel_scale


class CoreMLClassifier(nn.Module):
    """`softmax(model(x * channel_scale))`: what the Core ML classifier wraps. A model that returns a tuple
    (a depth cascade's exit branch: logits, features) gets the softmax on its first output only."""

    def __init__(self, model: nn.Module, deploy_cfg):
        super().__init__()
        self.model = model
        cs = channel_scale(deploy_cfg)
        self.has_channel_scale = cs is not None
        self.register_buffer("channel_scale", torch.tensor(cs or [1.0, 1.0, 1.0]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        if self.has_channel_scale:
            x = x * self.channel_scale
        out = self.model(x)
        if isinstance(out, tuple):  # (logits [B, classes], features ...)
            return (torch.softmax(out[0], dim=-1), *out[1:])
        return torch.softmax(out, dim=-1)


class Softmax(nn.Module):
    """`softmax(module(x))`: a depth cascade's rest branch for Core ML (features in, probabilities out)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return torch.softmax(self.module(x), dim=-1)


def module_for_target(model: nn.Module, deploy_cfg, target: str) -> nn.Module:
    """The module to capture for `target`: the model itself, or `CoreMLClassifier(model)` for coreml."""
    if target == "coreml":
        return CoreMLClassifier(model, deploy_cfg).eval()
    return model


def capture(module: nn.Module, deploy_cfg, *, batch: int = 1) -> torch.export.ExportedProgram:
    """`torch.export.export(module.eval(), (deploy_cfg.example_input(),))`: the DeployCfg's static shape."""
    module = module.eval()
    return torch.export.export(module, (deploy_cfg.example_input(batch),))


def describe_wrapper(deploy_cfg, target: str) -> str:
    """What `module_for_target` adds around the model, for the capture line of the export."""
    if target != "coreml":
        return ""
    return " (+ softmax" + (", per-channel std" if channel_scale(deploy_cfg) else "") + " for the Core ML classifier)"
