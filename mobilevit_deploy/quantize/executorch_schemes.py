"""ExecuTorch schemes, lowered to the XNNPACK delegate by the export stage. One declaration each:
the config (validated dataclass, scheme attributes) and, beside it, its registered handler.

- `int8` (Int8StaticConfig): torchao pt2e `prepare_pt2e` / `convert_pt2e` with ExecuTorch's
  `XNNPACKQuantizer` and `get_symmetric_quantization_config(is_per_channel=True)`, calibrated on
  real images. Measured facts: 1.54 MB for mobilevit_xxs against 5.2 MB fp32; lowering ~40 s.
- `int8-latency`: `int8` with a per-layer plan chosen by measured latency on this machine: each conv /
  linear whose int8 form lowered alone is not faster than its fp32 form stays fp32 (quantize/latency_plan.py).
- `int8-dynamic` (Int8DynamicConfig): torchao `quantize_(model, Int8DynamicActivationIntxWeightConfig(
  weight_dtype=torch.int8, weight_granularity=PerAxis(0)))` on nn.Linear layers.
- `int8-dynamic-all`: dynamic int8 (XNNPACK qd8) on every conv and linear, through pt2e with
  `XNNPACKQuantizer` + `get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)`; a 1x1 conv
  fed by a reshape (MobileViT's `conv_proj` after the fold) fails in XNNPACK at run time as a dynamic conv
  (benchmarks/repro_dynamic_1x1_conv.py), so those are rewritten first as a linear over channels (NHWC) with
  the BatchNorm folded in: the same function, one delegate call.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from ..errors import UserError
from .configs import (
    QuantConfig,
    QuantizedModel,
    check_calibration_method,
    check_calibration_source,
    check_keep_float,
    check_positive_int,
    register_scheme,
)
from .pt2e import W8A8Scheme, calibrated_pt2e, matches

# ----------------------------------------------------------------------------------------- int8

@dataclass(frozen=True)
class Int8StaticConfig(QuantConfig):
    """ExecuTorch `int8`: static W8A8 through torchao's pt2e flow with the XNNPACK quantizer.

    Weights int8 symmetric (per output channel by default), activations int8 per tensor from a
    histogram observer over the calibration images; lowered to the XNNPACK delegate.
    """

    target: ClassVar[str] = "executorch"
    calibrated: ClassVar[bool] = True
    verify_min_sqnr_db: ClassVar[float] = 20.0  # .pte vs the converted graph (benchmarks/ptq_*.md)
    # int8-latency: the same, with the per-layer plan by measured latency (quantize/latency_plan.py)
    variants: ClassVar[dict[str, dict]] = {"int8": {}, "int8-latency": {"latency_plan": True}}

    per_channel: bool = True
    keep_float: tuple[str, ...] = ()
    keep_float_auto: int = 0
    calib_batch_size: int = 16
    calibration: str = "minmax"  # minmax | vit
    calib_data: str | None = None  # None: the shipped sample images
    calib_size: int | None = None  # None: 256 images of calib_data (all shipped samples)
    latency_plan: bool = False  # keep in fp32 the convs / linears whose int8 form is not faster here
    plan_threads: int = 1  # threads of the plan's timings (those the artifact will run with)
    plan_margin: float = 0.0  # int8 kept where int8_ms <= fp32_ms * (1 - plan_margin)

    @property
    def scheme(self) -> str:  # type: ignore[override]
        return "int8-latency" if self.latency_plan else "int8"

    def __post_init__(self):
        if not isinstance(self.per_channel, bool):
            raise UserError(f"per_channel must be True or False, got {self.per_channel!r}")
        if not isinstance(self.latency_plan, bool):
            raise UserError(f"latency_plan must be True or False, got {self.latency_plan!r}")
        check_positive_int("plan_threads", self.plan_threads)
        if isinstance(self.plan_margin, bool) or not isinstance(self.plan_margin, (int, float)) \
                or not 0 <= self.plan_margin < 1:
            raise UserError(f"plan_margin must be a number in [0, 1), got {self.plan_margin!r}")
        kf, _ = check_keep_float(self.keep_float, self.keep_float_auto)
        object.__setattr__(self, "keep_float", kf)
        check_positive_int("calib_batch_size", self.calib_batch_size)
        check_calibration_method(self.calibration)
        check_calibration_source(self)


def xnnpack_quantizer_factory(per_channel: bool = True, dynamic: bool = False):
    """`factory(allow)` -> a fresh XNNPACKQuantizer (global symmetric int8 config; `dynamic`: activations
    quantized at run time, qd8) with an optional node filter (`allow(node) -> bool`, False keeps the op in float)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    def factory(allow=None):
        q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel,
                                                                            is_dynamic=dynamic))
        if allow is not None:
            q.set_filter_function(allow)
        return q

    return factory


def describe_int8_static(cfg: Int8StaticConfig) -> str:
    return ("torchao pt2e static W8A8 (prepare_pt2e/convert_pt2e) with ExecuTorch XNNPACKQuantizer: int8 symmetric "
            f"{'per-channel' if cfg.per_channel else 'per-tensor'} weights, int8 per-tensor activations (histogram "
            "observer), lowered to XNNPACK")


@register_scheme(Int8StaticConfig)
def _apply_int8_static(model, cfg: Int8StaticConfig, deploy_cfg, calib, progress, log) -> QuantizedModel:
    scheme = W8A8Scheme(xnnpack_quantizer_factory(cfg.per_channel), describe_int8_static(cfg),
                        "the converted pt2e q/dq module, run in PyTorch")
    return calibrated_pt2e(model, cfg, scheme, deploy_cfg, calib, progress, log)


# ----------------------------------------------------------------------------------------- int8-dynamic

@dataclass(frozen=True)
class Int8DynamicConfig(QuantConfig):
    """ExecuTorch `int8-dynamic`: torchao `quantize_` with `Int8DynamicActivationIntxWeightConfig`.

    nn.Linear weights int8 (per output channel, or per group of `group_size` input channels),
    activations quantized to int8 at run time (no calibration); convolutions stay fp32.
    Measured: Int8DynamicActivationInt8WeightConfig does not lower to XNNPACK (aten._int_mm) and
    Int8WeightOnlyConfig lowers but fails at run time, so neither is offered.
    """

    target: ClassVar[str] = "executorch"
    # int8-dynamic-all: every conv and linear dynamic int8 through pt2e (apply_int8_dynamic_all)
    variants: ClassVar[dict[str, dict]] = {"int8-dynamic": {}, "int8-dynamic-all": {"layers": "all"}}

    granularity: str = "per_channel"  # per_channel | per_group (linear only)
    group_size: int = 32
    keep_float: tuple[str, ...] = ()
    layers: str = "linear"  # linear (torchao, nn.Linear only) | all (pt2e: every conv and linear)

    @property
    def scheme(self) -> str:  # type: ignore[override]
        return "int8-dynamic-all" if self.layers == "all" else "int8-dynamic"

    @property
    def verify_min_sqnr_db(self) -> float:  # type: ignore[override]
        # .pte vs its torch-side graph. int8-dynamic-all: XNNPACK's run-time activation quantization is not the
        # graph's per-tensor choose_qparams, and the .pte is the closer of the two to fp32 (mobilevit_xxs, 64 px:
        # .pte vs graph 30.2 dB, .pte vs fp32 32.9 dB), so its bar is lower.
        return 25.0 if self.layers == "all" else 30.0

    def __post_init__(self):
        if self.layers not in ("linear", "all"):
            raise UserError(f"layers must be linear or all, got {self.layers!r}")
        if self.granularity not in ("per_channel", "per_group"):
            raise UserError(f"granularity must be per_channel or per_group, got {self.granularity!r}")
        if self.layers == "all" and self.granularity != "per_channel":
            raise UserError("int8-dynamic-all quantizes weights per output channel only (granularity per_channel)")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1 \
                or self.group_size % 32:
            raise UserError(f"group_size must be a positive multiple of 32 (XNNPACK), got {self.group_size!r}")
        kf, _ = check_keep_float(self.keep_float, 0)
        object.__setattr__(self, "keep_float", kf)


def _linear_names(model, cfg: Int8DynamicConfig) -> list[str]:
    """Every nn.Linear of `model`; the keep-float patterns and the group size checked against them."""
    from torch import nn

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"int8-dynamic quantizes nn.Linear layers and {type(model).__name__} has none")
    for p in cfg.keep_float:
        if not any(matches(n, (p,)) for n in names):
            raise UserError(f"--keep-float {p!r} matches no nn.Linear of this model (e.g. {', '.join(names[:5])})")
    if cfg.granularity == "per_group":
        bad = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % cfg.group_size
               and not matches(n, cfg.keep_float)]
        if bad:
            raise UserError(f"group_size {cfg.group_size} does not divide the input width of {', '.join(bad[:4])}"
                            f"{' ...' if len(bad) > 4 else ''}; use per_channel")
    return names


def apply_int8_dynamic(model, cfg: Int8DynamicConfig):
    """A copy of `model` with its nn.Linear layers quantized by torchao `quantize_` (the original is untouched).

    Returns (module, {"linear_layers": n quantized, "kept_float": [...], "method": ...}).
    """
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    names = _linear_names(model, cfg)
    gran = PerGroup(cfg.group_size) if cfg.granularity == "per_group" else PerAxis(0)
    qcfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=gran)
    m = copy.deepcopy(model).eval()
    done = []

    def want(mod, fqn):
        ok = isinstance(mod, nn.Linear) and not matches(fqn, cfg.keep_float)
        if ok:
            done.append(fqn)
        return ok

    quantize_(m, qcfg, filter_fn=want)
    gran_s = "PerAxis(0)" if cfg.granularity == "per_channel" else f"PerGroup({cfg.group_size})"
    return m, {"linear_layers": len(done), "kept_float": [n for n in names if n not in done],
               "method": "torchao quantize_ with Int8DynamicActivationIntxWeightConfig(weight_dtype=int8, "
                         f"weight_granularity={gran_s}) on nn.Linear; dynamic int8 activations; convolutions fp32; "
                         "lowered to XNNPACK"}


def proj_convs_as_linear(model) -> list[str]:
    """In place: each MobileViT block's `conv_proj` (a 1x1 ConvNormAct right after the fold's reshape) becomes
    a ChannelLinearNormAct. Returns the module paths replaced."""
    from ..models.layers import ChannelLinearNormAct, ConvNormAct
    from ..models.mobilevit import MobileVitBlock

    done = []
    for name, mod in model.named_modules():
        if isinstance(mod, MobileVitBlock) and isinstance(mod.conv_proj, ConvNormAct) \
                and mod.conv_proj.conv.kernel_size == (1, 1) and mod.conv_proj.conv.groups == 1:
            mod.conv_proj = ChannelLinearNormAct.from_conv_norm_act(mod.conv_proj)
            done.append(f"{name}.conv_proj")
    return done


def apply_int8_dynamic_all(model, cfg: Int8DynamicConfig, deploy_cfg):
    """pt2e dynamic int8 on every conv and linear of a copy of `model` (the original is untouched).

    No calibration: activations are quantized at run time. One forward pass on a zero image lets the
    weight observers record the weights (what convert_pt2e quantizes them with); it sets no activation range.
    Returns (converted module, {"replaced_convs": [...], "units": [...], "kept_float": [...], "qdq": {...}}).
    """
    import torch

    from .pt2e import (
        allow_filter,
        capture_dynamic_batch,
        check_patterns,
        convert,
        count_qdq,
        prepare_observed,
        quantizable_units,
    )

    m = copy.deepcopy(model).eval()
    replaced = proj_convs_as_linear(m)
    gm = capture_dynamic_batch(m, deploy_cfg)
    factory = xnnpack_quantizer_factory(per_channel=True, dynamic=True)
    units = quantizable_units(gm, factory)
    check_patterns(cfg.keep_float, units)
    quantizer = factory(allow_filter(cfg.keep_float) if cfg.keep_float else None)
    converted = convert(prepare_observed(gm, quantizer, [torch.zeros(1, *deploy_cfg.input_size)]))
    qdq = count_qdq(converted)
    if qdq["quantize"] == 0:
        raise UserError("int8-dynamic-all: nothing was quantized (every layer kept in float?)")
    return converted, {"replaced_convs": replaced, "units": units,
                       "kept_float": [u for u in units if matches(u, cfg.keep_float)], "qdq": qdq}


@register_scheme(Int8DynamicConfig)
def _apply_int8_dynamic(model, cfg: Int8DynamicConfig, deploy_cfg, calib, progress, log) -> QuantizedModel:
    if calib is not None and not calib.shipped:
        log(f"quantize: {cfg.scheme} needs no calibration; --calib-data is not used")
    if cfg.layers == "all":
        m, extra = apply_int8_dynamic_all(model, cfg, deploy_cfg)
        info = {"scheme": cfg.scheme, "target": cfg.target, "config": cfg.to_dict(), "calibration": None,
                "method": "torchao pt2e with ExecuTorch XNNPACKQuantizer, get_symmetric_quantization_config("
                          "is_per_channel=True, is_dynamic=True): int8 per-channel weights, int8 activations "
                          "quantized at run time, on every conv and linear; 1x1 convs after a reshape rewritten as "
                          "linears over channels first (BatchNorm folded); lowered to XNNPACK",
                "replaced_convs": extra["replaced_convs"], "quantizable_units": len(extra["units"]),
                "keep_float": {"patterns": list(cfg.keep_float), "units": extra["kept_float"]},
                "qdq_nodes": extra["qdq"], "torch_side": "the converted pt2e q/dq module, run in PyTorch"}
        log(f"quantize: int8-dynamic-all on {len(extra['units']) - len(extra['kept_float'])} of "
            f"{len(extra['units'])} convs / linears ({len(extra['replaced_convs'])} 1x1 convs after a reshape as "
            "linears)" + (f", kept in float: {', '.join(extra['kept_float'])}" if extra["kept_float"] else ""))
        return QuantizedModel(cfg, m, m, info)
    m, extra = apply_int8_dynamic(model, cfg)
    info = {"scheme": cfg.scheme, "target": cfg.target, "method": extra["method"], "config": cfg.to_dict(),
            "calibration": None, "keep_float": {"patterns": list(cfg.keep_float), "units": extra["kept_float"]},
            "linear_layers_quantized": extra["linear_layers"],
            "torch_side": "the quantize_'d module (torchao), run in PyTorch"}
    log(f"quantize: int8-dynamic on {extra['linear_layers']} nn.Linear layers"
        f"{', kept in float: ' + ', '.join(extra['kept_float']) if extra['kept_float'] else ''}")
    return QuantizedModel(cfg, m, m, info)
