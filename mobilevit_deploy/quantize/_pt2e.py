"""Shared pieces of the two calibrated W8A8 schemes (torchao pt2e: prepare -> calibrate -> convert).

The graph is captured with a dynamic batch dimension so calibration runs in batches (the histogram
observers cost ~0.8 s per call at batch 1 on this machine, about the same at batch 16); the
converted module is then captured again at batch 1 by the export stage.

Module paths: each op of a `torch.export` graph carries `nn_module_stack`; its *unit* is the
innermost module path (e.g. `stages.2.1.transformer.0.attn.qkv` for a Linear, or
`stages.2.1.transformer.0` for the residual adds of that block). Keep-in-float patterns are
`fnmatch` globs over units.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

from ..errors import UserError


def capture_dynamic_batch(model, deploy_cfg):
    """`torch.export.export(model, (x,), dynamic batch).module()`: the graph pt2e prepares.

    The graph is captured from a deep copy: an exported module shares its parameters with the module
    it was captured from, and BN folding or reading compressed weights back into the graph (in place)
    would otherwise change the caller's fp32 model (and every fp32 comparison made with it after)."""
    import copy

    import torch

    from ..export.capture import example_input

    x = example_input(deploy_cfg, batch=2)
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(copy.deepcopy(model).eval(), (x,), dynamic_shapes=({0: batch},)).module()


def _normalize(path: str) -> str:
    return path[len("L['self']."):] if path.startswith("L['self'].") else path


def module_path(node) -> str | None:
    """Innermost module path of a graph node ("" for ops of the root module), None without a stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return _normalize(list(stack.values())[-1][0])


def module_paths(node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [_normalize(v[0]) for v in stack.values()]


def matches(unit: str | None, patterns: Iterable[str]) -> bool:
    return unit is not None and any(fnmatch.fnmatchcase(unit, p) for p in patterns)


def check_patterns(patterns: Iterable[str], units: Iterable[str]) -> None:
    """Every keep-float pattern must match at least one quantizable unit (a typo is an error)."""
    units = sorted(set(units))
    for p in patterns:
        if not any(fnmatch.fnmatchcase(u, p) for u in units):
            close = [u for u in units if p.split(".")[0] in u][:6] or units[:6]
            raise UserError(f"--keep-float {p!r} matches no quantizable layer of this model "
                            f"(e.g. {', '.join(close)}; list them all with python -m mobilevit_deploy.quantize "
                            "sensitivity)")


def allow_filter(patterns: tuple[str, ...]) -> Callable:
    """Quantizer filter: True (may quantize) unless the node's unit matches a keep-float pattern."""
    pats = tuple(patterns)

    def allow(node) -> bool:
        return not matches(module_path(node), pats)

    return allow


def only_filter(units: set[str]) -> Callable:
    """Quantizer filter that quantizes only ops whose unit is in `units` (get_attr etc. pass)."""

    def allow(node) -> bool:
        u = module_path(node)
        return u is None or u in units

    return allow


def quantizable_units(gm, quantizer_factory: Callable[[Callable | None], object]) -> list[str]:
    """Units the quantizer annotates in `gm` (annotation on a copy; the graph is not modified)."""
    import copy

    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    g = copy.deepcopy(gm)
    _fuse_conv_bn_(g)  # as prepare_pt2e does before annotating
    q = quantizer_factory(None)
    g = q.transform_for_annotation(g)
    q.annotate(g)
    units = set()
    for n in g.graph.nodes:
        if n.op == "call_function" and "quantization_annotation" in n.meta:
            u = module_path(n)
            if u is not None:
                units.add(u)
    return sorted(units)


def prepare_calibrate_convert(gm, quantizer, calib, deploy_cfg, *, batch_size: int, progress: bool = True,
                              desc: str = "calibrating", after_observe: Callable | None = None):
    """prepare_pt2e -> run the calibration images -> convert_pt2e. Returns (converted, images seen).

    `after_observe(prepared)`, when given, runs on the prepared and observed graph just before
    convert_pt2e (e.g. `vit_ptq.apply_vit_calibration`, which rewrites its observers in place)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval  # noqa
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from .calibration import run_calibration

    prepared = prepare_pt2e(gm, quantizer)
    n = run_calibration(prepared, calib, deploy_cfg, batch_size=batch_size, progress=progress, desc=desc)
    if after_observe is not None:
        after_observe(prepared)
    converted = move_exported_model_to_eval(convert_pt2e(prepared))
    allow_exported_model_train_eval(converted)
    return QuantizedGraph(converted), n


def _quantized_graph_cls():
    from torch import nn

    class QuantizedGraph(nn.Module):
        """A converted pt2e graph as a plain module: `.eval()` / `.train()` are no-ops (an exported
        graph refuses them), `.graph` is the converted graph."""

        def __init__(self, gm):
            super().__init__()
            self.gm = gm

        @property
        def graph(self):
            return self.gm.graph

        def train(self, mode: bool = True):
            self.training = False
            return self

        def forward(self, x):
            return self.gm(x)

    return QuantizedGraph


def QuantizedGraph(gm):  # noqa: N802 (a factory: torch is imported lazily)
    return _quantized_graph_cls()(gm)


def count_qdq(gm) -> dict:
    """{'quantize': n, 'dequantize': n} nodes of a converted graph (evidence that quantization happened)."""
    q = dq = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        s = str(n.target)
        if "dequantize_per" in s:
            dq += 1
        elif "quantize_per" in s:
            q += 1
    return {"quantize": q, "dequantize": dq}
