"""The pt2e (torchao `prepare_pt2e` -> calibrate -> `convert_pt2e`) flow of the calibrated W8A8 schemes.

The graph is captured with a dynamic batch dimension so calibration runs in batches (the histogram
observers cost ~0.8 s per call at batch 1 on this machine, about the same at batch 16); the
converted module is then captured again at batch 1 by the export's quantize stage.

Module paths: each op of a `torch.export` graph carries `nn_module_stack`; its *unit* is the
innermost module path (e.g. `stages.2.1.transformer.0.attn.qkv` for a Linear, or
`stages.2.1.transformer.0` for the residual adds of that block). Keep-in-float patterns are
`fnmatch` globs over units; `python -m mobilevit_deploy.quantize sensitivity` lists them.

`calibrated_pt2e(model, cfg, ...)` is the whole flow for one scheme, in named steps: capture ->
quantizable units -> (keep_float_auto: per-unit sensitivity) -> prepare, calibrate, (vit search),
convert -> the manifest's `quantization` block.
"""
from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

from ..errors import UserError
from .configs import QuantizedModel


def capture_dynamic_batch(model, deploy_cfg):
    """`torch.export.export(model, (x,), dynamic batch).module()`: the graph pt2e prepares.

    The graph is captured from a deep copy: an exported module shares its parameters with the module
    it was captured from, and BN folding or reading compressed weights back into the graph (in place)
    would otherwise change the caller's fp32 model (and every fp32 comparison made with it after)."""
    import copy

    import torch

    x = deploy_cfg.example_input(batch=2)
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
                            "sensitivity --model NAME)")


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


def prepare_observed(gm, quantizer, batches, after_observe: Callable | None = None):
    """prepare_pt2e(gm, quantizer), then every batch of `batches` run through it (the observation
    pass), then `after_observe(prepared)` if given: the observed graph, ready for `convert`."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    if after_observe is not None:
        after_observe(prepared)
    return prepared


def convert(prepared):
    """convert_pt2e of an observed graph, in eval mode, as a plain module (`QuantizedGraph`)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval, move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = move_exported_model_to_eval(convert_pt2e(prepared))
    allow_exported_model_train_eval(converted)
    return QuantizedGraph(converted)


def prepare_calibrate_convert(gm, quantizer, calib, deploy_cfg, *, batch_size: int, progress: bool = True,
                              desc: str = "calibrating", after_observe: Callable | None = None):
    """prepare_pt2e -> run the calibration images -> convert_pt2e. Returns (converted, images seen).

    `after_observe(prepared)`, when given, runs on the prepared and observed graph just before
    convert_pt2e (e.g. `vit_ptq.apply_vit_calibration`, which rewrites its observers in place)."""
    from .calibration import calibration_batches

    seen = []

    def batches():
        for x in calibration_batches(calib, deploy_cfg, batch_size=batch_size, desc=desc, progress=progress):
            seen.append(x.shape[0])
            yield x

    prepared = prepare_observed(gm, quantizer, batches(), after_observe)
    return convert(prepared), sum(seen)


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


# ----------------------------------------------------------------------------------------- the flow

@dataclass(frozen=True)
class W8A8Scheme:
    """What differs between the calibrated W8A8 schemes: the quantizer and how they are described."""

    factory: Callable  # factory(allow) -> a fresh quantizer (allow(node) False keeps the op in float)
    method: str  # the manifest's `method`
    torch_side: str  # what the torch-side module is (the manifest's `torch_side`)


@dataclass
class _KeepFloat:
    units: list[str]  # every quantizable unit
    patterns: tuple[str, ...]  # the config's patterns + the units chosen by keep_float_auto
    auto_units: list[str] = field(default_factory=list)
    report: object = None  # sensitivity.SensitivityReport with keep_float_auto
    plan: object = None  # latency_plan.LatencyPlan with latency_plan

    def kept(self) -> list[str]:
        return [u for u in self.units if matches(u, self.patterns)]


def _choose_keep_float(model, gm, cfg, scheme: W8A8Scheme, calib, deploy_cfg, progress, log, timings) -> _KeepFloat:
    """Quantizable units, the config's patterns checked against them, and keep_float_auto's choice."""
    import copy

    units = quantizable_units(gm, scheme.factory)
    check_patterns(cfg.keep_float, units)
    kf = _KeepFloat(units, tuple(cfg.keep_float))
    if getattr(cfg, "latency_plan", False):
        _plan_by_latency(model, kf, cfg, scheme, calib, deploy_cfg, log, timings)
    if not cfg.keep_float_auto:
        return kf
    from .sensitivity import rank_units

    t = time.perf_counter()
    kf.report = rank_units(model, scheme.factory, calib, deploy_cfg, scheme=f"{cfg.target} {cfg.scheme}",
                           batch_size=cfg.calib_batch_size, curve_max=cfg.keep_float_auto, progress=progress,
                           gm=copy.deepcopy(gm))
    kf.auto_units = [u for u in kf.report.ranked() if not matches(u, kf.patterns)][: cfg.keep_float_auto]
    kf.patterns += tuple(kf.auto_units)
    timings["sensitivity"] = time.perf_counter() - t
    log(f"quantize: per-layer sensitivity on {kf.report.images} calibration images; keeping in float the "
        f"{cfg.keep_float_auto} most sensitive: {', '.join(kf.auto_units)}")
    return kf


def _plan_by_latency(model, kf: _KeepFloat, cfg, scheme: W8A8Scheme, calib, deploy_cfg, log, timings) -> None:
    """latency_plan: time each conv / linear alone in fp32 and int8 on this machine (its input from the first
    calibration image) and add those whose int8 form is not faster to the keep-float patterns."""
    from .calibration import calibration_batches
    from .latency_plan import plan_int8

    t = time.perf_counter()
    x = next(iter(calibration_batches(calib, deploy_cfg, batch_size=1, desc="latency plan", progress=False)))
    kf.plan = plan_int8(model, kf.units, scheme.factory, x, threads=cfg.plan_threads, margin=cfg.plan_margin, log=log)
    slower = [u for u in kf.plan.keep_float() if not matches(u, kf.patterns)]
    kf.patterns += tuple(slower)
    timings["latency_plan"] = time.perf_counter() - t
    s = kf.plan.summary()["sum_ms"]
    log(f"quantize: int8 latency plan ({cfg.plan_threads} thread(s), {len(kf.plan.layers)} convs / linears, "
        f"{kf.plan.measured} shapes timed, {timings['latency_plan']:.0f} s): {len(slower)} kept in fp32 "
        f"({', '.join(slower) if slower else 'none'}); sum of layer times fp32 {s['fp32']:.3f} ms, all int8 "
        f"{s['int8_all']:.3f} ms, plan {s['plan']:.3f} ms")


def vit_calibration(prepared, *, calib, deploy_cfg, batch_size: int, progress: bool, out: dict) -> None:
    """`apply_vit_calibration` on the observed graph, fed the same calibration images (the first
    VitPTQConfig.search_images of them); a small summary of its report goes into `out`."""
    from .calibration import calibration_batches
    from .vit_ptq import VitPTQConfig, apply_vit_calibration, find_quant_layers

    vcfg = VitPTQConfig()
    if not find_quant_layers(prepared, vcfg.layer_kinds):
        raise UserError("--calibration vit: no conv/linear/matmul layer is quantized (all kept in float?); "
                        "use --calibration minmax or keep fewer layers in float")
    batches = calibration_batches(calib, deploy_cfg, batch_size=batch_size, desc="vit-ptq search", progress=progress)
    apply_vit_calibration(prepared, batches, vcfg, progress=False)
    out.update(vit_summary(prepared.meta["vit_ptq"]))


def vit_summary(rep: dict, top: int = 5) -> dict:
    """The manifest's `vit_ptq` block: totals, the config, and the `top` layers the search changed most."""
    layers = rep.get("layers", [])
    gains = sorted(layers, key=lambda e: e["objective_vit"] - e["objective_observer"], reverse=True)[:top]

    def mean(k):
        return round(sum(e[k] for e in layers) / len(layers), 6) if layers else None

    return {
        "layers_searched": rep["n_layers"], "observers_replaced": rep["n_observers_replaced"],
        "bias_corrected": rep["n_bias_corrected"], "search_images": rep["search_images"], "seconds": rep["seconds"],
        "config": rep["config"],
        "objective": {"what": "Pearson correlation of each layer's output with its float output (mean over layers)",
                      "mean_observer": mean("objective_observer"), "mean_vit": mean("objective_vit")},
        "largest_gains": [{"layer": e["layer"], "kind": e["kind"], "observer": e["objective_observer"],
                           "vit": e["objective_vit"]} for e in gains],
    }


VIT_METHOD = ("; then ViT-aware PTQ (Liu et al. 2021, quantize/vit_ptq.py): per-layer weight/activation steps "
              "searched for the largest output correlation (ranking loss on attention scores) and bias correction, "
              "on the calibration images")


def _quantization_info(cfg, scheme: W8A8Scheme, calib, seen: int, kf: _KeepFloat, vit: dict, qdq: dict) -> dict:
    """The manifest's `quantization` block of a calibrated W8A8 scheme (before the measured figures)."""
    info = {"scheme": cfg.scheme, "target": cfg.target, "method": scheme.method + (VIT_METHOD if vit else ""),
            "config": cfg.to_dict(),
            "calibration": {**calib.describe(), "images_seen": seen, "batch_size": cfg.calib_batch_size},
            "calibration_method": cfg.calibration}
    if vit:
        info["vit_ptq"] = vit
    info["keep_float"] = {"patterns": list(cfg.keep_float), "auto": cfg.keep_float_auto, "auto_units": kf.auto_units,
                          "units": kf.kept(), "quantizable_units": len(kf.units)}
    if kf.plan is not None:
        info["latency_plan"] = kf.plan.summary()
    if kf.report is not None:
        info["sensitivity"] = {
            "method": "per-unit SQNR of the logits vs fp32, one unit fake-quantized at a time (calibrated qparams)",
            "images": kf.report.images,
            "most_sensitive": [{"unit": u.unit, "sqnr_db": round(u.sqnr_db, 2)} for u in kf.report.units[:10]],
        }
    info["qdq_nodes"] = qdq
    info["torch_side"] = scheme.torch_side
    return info


def _log_calibrated(log, cfg, calib, seen: int, kf: _KeepFloat, vit: dict) -> None:
    kept = kf.kept()
    log(f"quantize: {cfg.scheme} calibrated ({cfg.calibration}) on {seen} images from {calib.source}"
        f"{' (shipped samples)' if calib.shipped else ''}; {len(kept)}/{len(kf.units)} quantizable units kept in float"
        f"{': ' + ', '.join(kept) if kept else ''}")
    if vit:
        o = vit["objective"]
        log(f"quantize: vit-ptq searched {vit['layers_searched']} layers on {vit['search_images']} "
            f"calibration images ({vit['observers_replaced']} observers replaced, "
            f"{vit['bias_corrected']} biases corrected; mean output correlation {o['mean_observer']:.5f} -> "
            f"{o['mean_vit']:.5f}; {vit['seconds']:.1f} s)")


def calibrated_pt2e(model, cfg, scheme: W8A8Scheme, deploy_cfg, calib, progress: bool, log) -> QuantizedModel:
    """A calibrated W8A8 scheme end to end: capture (dynamic batch) -> keep-float choice -> prepare,
    calibrate, optional ViT-aware search, convert. `calib` is a CalibrationSet (real images)."""
    timings = {}
    t = time.perf_counter()
    gm = capture_dynamic_batch(model, deploy_cfg)
    timings["capture"] = time.perf_counter() - t
    kf = _choose_keep_float(model, gm, cfg, scheme, calib, deploy_cfg, progress, log, timings)
    t = time.perf_counter()
    vit: dict = {}
    after_observe = None
    if cfg.calibration == "vit":
        after_observe = partial(vit_calibration, calib=calib, deploy_cfg=deploy_cfg,
                                batch_size=cfg.calib_batch_size, progress=progress, out=vit)
    quantizer = scheme.factory(allow_filter(kf.patterns) if kf.patterns else None)
    converted, seen = prepare_calibrate_convert(gm, quantizer, calib, deploy_cfg, batch_size=cfg.calib_batch_size,
                                                progress=progress, after_observe=after_observe)
    timings["calibrate"] = time.perf_counter() - t
    if vit:
        timings["vit_search"] = vit["seconds"]
    qdq = count_qdq(converted)
    if qdq["quantize"] == 0:
        raise UserError(f"{cfg.scheme}: nothing was quantized (every layer kept in float?)")
    info = _quantization_info(cfg, scheme, calib, seen, kf, vit, qdq)
    _log_calibrated(log, cfg, calib, seen, kf, vit)
    return QuantizedModel(cfg, converted, converted, info, sensitivity=kf.report, timings_s=timings)
