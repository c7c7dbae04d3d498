"""Post-training quantization: a registry of schemes, each a small validated config + one apply.

    from mobilevit_deploy.quantize import get_config, quantize_model, load_calibration
    cfg = get_config("executorch", "int8", keep_float="auto:2")
    q = quantize_model(model, cfg, deploy_cfg=model.deploy_cfg, calib=load_calibration("data/train"))
    q.module      # nn.Module to capture and lower (logits out)
    q.reference   # its numerics in PyTorch (for Core ML: the torch-side simulation)
    q.info        # the manifest's `quantization` block (scheme, method, calibration, keep-float)

Schemes per target (`list_schemes()`):
- executorch: `int8` (pt2e static W8A8, XNNPACKQuantizer, calibrated), `int8-dynamic` (torchao
  `quantize_` + Int8DynamicActivationIntxWeightConfig on nn.Linear);
- coreml: `w8` (int8 weights), `palette6`, `palette4` (k-means palettes), `palette-mixed` (per-layer
  4/6/8-bit palettes under an average-bits budget, `mixed_precision.py`; its sensitivity pass uses the
  calibration images), `int8` (W8A8 with CoreMLQuantizer, calibrated, iOS 17).
ONNX has no scheme yet.

The two calibrated W8A8 schemes (executorch `int8`, coreml `int8`) take `calibration="minmax"` (the
quantizer's own observers) or `"vit"` (ViT-aware PTQ, `vit_ptq.apply_vit_calibration`, run on the
observed graph before convert_pt2e, on the same calibration images).

Importing this package imports neither torch nor any toolchain; each scheme imports what it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from ..errors import UserError, choices_error
from .calibration import DEFAULT_CALIB_SIZE, CalibrationSet, load_calibration
from .configs import (
    CALIBRATION_METHODS,
    DEFAULT_KEEP_FLOAT,
    CoreMLInt8Config,
    CoreMLMixedPaletteConfig,
    CoreMLPaletteConfig,
    CoreMLWeightInt8Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    parse_keep_float,
)

__all__ = [
    "SCHEMES", "list_schemes", "get_config", "quantize_model", "QuantizedModel", "load_calibration",
    "CalibrationSet", "accuracy_vs_fp32", "parse_keep_float", "Int8StaticConfig", "Int8DynamicConfig",
    "CoreMLWeightInt8Config", "CoreMLPaletteConfig", "CoreMLInt8Config", "CoreMLMixedPaletteConfig",
    "DEFAULT_CALIB_SIZE", "ACCURACY_IMAGES", "VERIFY_MIN_SQNR_DB", "CALIBRATION_METHODS", "schemes_accepting",
]

# target -> scheme name -> config constructor (the CLI picks one by name; options are config fields)
SCHEMES: dict[str, dict[str, Callable[..., Any]]] = {
    "executorch": {"int8": Int8StaticConfig, "int8-dynamic": Int8DynamicConfig},
    "coreml": {
        "w8": CoreMLWeightInt8Config,
        "palette6": partial(CoreMLPaletteConfig, nbits=6),
        "palette4": partial(CoreMLPaletteConfig, nbits=4),
        "palette-mixed": CoreMLMixedPaletteConfig,
        "int8": CoreMLInt8Config,
    },
    "onnx": {},
}

# Shipped sample images compared with fp32 for the manifest's accuracy figures (all 40).
ACCURACY_IMAGES = 40
# `verification` of a quantized artifact compares it with its own torch-side quantized module
# (is the lowering faithful?); pass threshold in dB. Measured on mobilevit_xxs (see benchmarks/ptq_*.md).
VERIFY_MIN_SQNR_DB = {"executorch int8": 20.0, "executorch int8-dynamic": 30.0}
VERIFY_MIN_SQNR_DB_DEFAULT = 20.0  # Core ML (only run on macOS: fp16 Core ML against the torch-side module)


# config fields set by their own CLI flag (get_config names the flag and the schemes that take it)
OPTION_FLAGS = {"calibration": "--calibration", "budget_avg_bits": "--weight-bits-budget"}


def schemes_accepting(option: str) -> list[str]:
    """'target scheme' of every scheme whose config has the field `option` (e.g. 'calibration')."""
    return [f"{t} {s}" for t, tab in SCHEMES.items() for s, c in tab.items() if option in _fields(c)]


def list_schemes(target: str | None = None) -> list[str] | dict[str, list[str]]:
    if target is None:
        return {t: sorted(s) for t, s in SCHEMES.items()}
    if target not in SCHEMES:
        raise choices_error("target", target, sorted(SCHEMES))
    return sorted(SCHEMES[target])


def get_config(target: str, scheme: str, *, keep_float: str | tuple | None = None, **overrides):
    """The config of `scheme` for `target`; `keep_float` is the CLI form ("a.b,c.*", "auto:N", "none")
    or a (patterns, auto) tuple. None keeps the scheme's measured default. Raises UserError."""
    if target not in SCHEMES:
        raise choices_error("target", target, sorted(SCHEMES))
    table = SCHEMES[target]
    if not table:
        avail = "; ".join(t + ": " + ", ".join(sorted(s)) for t, s in SCHEMES.items() if s)
        raise UserError(f"no quantization scheme for target {target!r} yet (available: {avail})")
    if scheme not in table:
        raise choices_error(f"quantization scheme for {target}", scheme, sorted(table))
    ctor = table[scheme]
    fields = _fields(ctor)
    kf = parse_keep_float(keep_float) if isinstance(keep_float, str) else keep_float
    if kf is not None:
        if "keep_float" not in fields:
            raise UserError(f"--keep-float does not apply to {target} {scheme} (it applies to: "
                            f"{', '.join(f'{t} {s}' for t, tab in SCHEMES.items() for s, c in tab.items() if 'keep_float' in _fields(c))})")
        patterns, auto = kf
        if auto and "keep_float_auto" not in fields:
            raise UserError(f"--keep-float auto:N needs a calibrated scheme; {target} {scheme} takes module patterns only")
        overrides["keep_float"] = patterns
        if "keep_float_auto" in fields:
            overrides["keep_float_auto"] = auto
    elif "keep_float_auto" in fields:
        overrides.setdefault("keep_float", DEFAULT_KEEP_FLOAT[0])
        overrides.setdefault("keep_float_auto", DEFAULT_KEEP_FLOAT[1])
    for opt, flag in OPTION_FLAGS.items():
        if opt in overrides and opt not in fields:
            raise UserError(f"{flag} does not apply to {target} {scheme} (it applies to: "
                            f"{', '.join(schemes_accepting(opt))})")
    unknown = set(overrides) - set(fields)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(sorted(unknown))} for {target} {scheme} "
                        f"(valid: {', '.join(sorted(fields))})")
    try:
        return ctor(**overrides)
    except TypeError as e:
        raise UserError(f"bad options for {target} {scheme}: {e}") from None


def _fields(ctor) -> set[str]:
    cls = ctor.func if isinstance(ctor, partial) else ctor
    return set(cls.__dataclass_fields__)


@dataclass
class QuantizedModel:
    """What `quantize_model` returns; the export stage captures `module` instead of the fp32 model."""

    config: Any
    module: Any  # nn.Module to capture and lower, logits out
    reference: Any  # nn.Module with the artifact's numerics in PyTorch (torch-side check)
    info: dict  # manifest `quantization` block (without the measured size/accuracy figures)
    compress_mlmodel: Callable | None = None  # Core ML weight schemes: MLModel -> compressed MLModel
    minimum_deployment_target: str | None = None  # Core ML int8: iOS17
    sensitivity: Any = None  # sensitivity.SensitivityReport when keep_float_auto was used
    timings_s: dict = field(default_factory=dict)

    @property
    def verify_min_sqnr_db(self) -> float:
        """Pass threshold of the artifact against `reference` (not against fp32)."""
        return VERIFY_MIN_SQNR_DB.get(f"{self.config.target} {self.config.scheme}", VERIFY_MIN_SQNR_DB_DEFAULT)


def quantize_model(model, config, *, deploy_cfg, calib: CalibrationSet | None = None, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> QuantizedModel:
    """Apply `config` to `model` (left untouched). Calibrated schemes use `calib` (default: the
    shipped sample images, said in `info['calibration']`)."""
    log = log or (lambda s: None)
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise UserError(f"not a quantization config: {type(config).__name__}")
    return handler(model.eval(), config, deploy_cfg, calib, progress, log)


def _base_info(cfg, method: str) -> dict:
    return {"scheme": cfg.scheme, "target": cfg.target, "method": method, "config": cfg.to_dict()}


def _calibrated_pt2e(model, cfg, deploy_cfg, calib, progress, log, *, factory, method: str, torch_side: str,
                     min_target: str | None) -> QuantizedModel:
    import copy
    import time

    from ._pt2e import (
        allow_filter,
        capture_dynamic_batch,
        check_patterns,
        count_qdq,
        matches,
        prepare_calibrate_convert,
        quantizable_units,
    )

    timings = {}
    calib = calib if calib is not None else load_calibration()
    t = time.perf_counter()
    gm = capture_dynamic_batch(model, deploy_cfg)
    units = quantizable_units(gm, factory)
    check_patterns(cfg.keep_float, units)
    timings["capture"] = time.perf_counter() - t
    patterns = tuple(cfg.keep_float)
    report = None
    auto_units: list[str] = []
    if cfg.keep_float_auto:
        from .sensitivity import rank_units

        t = time.perf_counter()
        report = rank_units(model, factory, calib, deploy_cfg, scheme=f"{cfg.target} {cfg.scheme}",
                            batch_size=cfg.calib_batch_size, curve_max=cfg.keep_float_auto, progress=progress,
                            gm=copy.deepcopy(gm))
        auto_units = [u for u in report.ranked() if not matches(u, patterns)][: cfg.keep_float_auto]
        patterns += tuple(auto_units)
        timings["sensitivity"] = time.perf_counter() - t
        log(f"quantize: per-layer sensitivity on {report.images} calibration images; keeping in float the "
            f"{cfg.keep_float_auto} most sensitive: {', '.join(auto_units)}")
    t = time.perf_counter()
    quantizer = factory(allow_filter(patterns) if patterns else None)
    vit_summary: dict = {}
    after_observe = None
    if cfg.calibration == "vit":
        after_observe = partial(_vit_calibration, calib=calib, deploy_cfg=deploy_cfg, batch_size=cfg.calib_batch_size,
                                progress=progress, out=vit_summary)
    converted, seen = prepare_calibrate_convert(gm, quantizer, calib, deploy_cfg, batch_size=cfg.calib_batch_size,
                                                progress=progress, after_observe=after_observe)
    timings["calibrate"] = time.perf_counter() - t
    if vit_summary:
        timings["vit_search"] = vit_summary["seconds"]
        method += ("; then ViT-aware PTQ (Liu et al. 2021, quantize/vit_ptq.py): per-layer weight/activation steps "
                   "searched for the largest output correlation (ranking loss on attention scores) and bias correction, "
                   "on the calibration images")
    kept = [u for u in units if matches(u, patterns)]
    qdq = count_qdq(converted)
    if qdq["quantize"] == 0:
        raise UserError(f"{cfg.scheme}: nothing was quantized (every layer kept in float?)")
    info = _base_info(cfg, method)
    info["calibration"] = {**calib.describe(), "images_seen": seen, "batch_size": cfg.calib_batch_size}
    info["calibration_method"] = cfg.calibration
    if vit_summary:
        info["vit_ptq"] = vit_summary
    info["keep_float"] = {
        "patterns": list(cfg.keep_float), "auto": cfg.keep_float_auto, "auto_units": auto_units,
        "units": kept, "quantizable_units": len(units),
    }
    if report is not None:
        info["sensitivity"] = {
            "method": "per-unit SQNR of the logits vs fp32, one unit fake-quantized at a time (calibrated qparams)",
            "images": report.images,
            "most_sensitive": [{"unit": u.unit, "sqnr_db": round(u.sqnr_db, 2)} for u in report.units[:10]],
        }
    info["qdq_nodes"] = qdq
    info["torch_side"] = torch_side
    log(f"quantize: {cfg.scheme} calibrated ({cfg.calibration}) on {seen} images from {calib.source}"
        f"{' (shipped samples)' if calib.shipped else ''}; {len(kept)}/{len(units)} quantizable units kept in float"
        f"{': ' + ', '.join(kept) if kept else ''}")
    if vit_summary:
        o = vit_summary["objective"]
        log(f"quantize: vit-ptq searched {vit_summary['layers_searched']} layers on {vit_summary['search_images']} "
            f"calibration images ({vit_summary['observers_replaced']} observers replaced, "
            f"{vit_summary['bias_corrected']} biases corrected; mean output correlation {o['mean_observer']:.5f} -> "
            f"{o['mean_vit']:.5f}; {vit_summary['seconds']:.1f} s)")
    return QuantizedModel(cfg, converted, converted, info, minimum_deployment_target=min_target,
                          sensitivity=report, timings_s=timings)


def _vit_calibration(prepared, *, calib, deploy_cfg, batch_size: int, progress: bool, out: dict) -> None:
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
    out.update(_vit_summary(prepared.meta["vit_ptq"]))


def _vit_summary(rep: dict, top: int = 5) -> dict:
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


def _apply_int8_static(model, cfg: Int8StaticConfig, deploy_cfg, calib, progress, log):
    from .executorch_schemes import describe_int8_static, xnnpack_quantizer_factory

    return _calibrated_pt2e(model, cfg, deploy_cfg, calib, progress, log,
                            factory=xnnpack_quantizer_factory(cfg.per_channel), method=describe_int8_static(cfg),
                            torch_side="the converted pt2e q/dq module, run in PyTorch", min_target=None)


def _apply_coreml_int8(model, cfg: CoreMLInt8Config, deploy_cfg, calib, progress, log):
    from .coreml_schemes import TORCH_SIDE_INT8, coreml_quantizer_factory, describe_int8

    return _calibrated_pt2e(model, cfg, deploy_cfg, calib, progress, log, factory=coreml_quantizer_factory(cfg),
                            method=describe_int8(cfg), torch_side=TORCH_SIDE_INT8,
                            min_target=cfg.minimum_deployment_target)


def _apply_int8_dynamic(model, cfg: Int8DynamicConfig, deploy_cfg, calib, progress, log):
    from .executorch_schemes import apply_int8_dynamic

    if calib is not None and not calib.shipped:
        log("quantize: int8-dynamic needs no calibration; --calib-data is not used")
    m, extra = apply_int8_dynamic(model, cfg)
    info = _base_info(cfg, extra.pop("method"))
    info["calibration"] = None
    info["keep_float"] = {"patterns": list(cfg.keep_float), "units": extra["kept_float"]}
    info["linear_layers_quantized"] = extra["linear_layers"]
    info["torch_side"] = "the quantize_'d module (torchao), run in PyTorch"
    log(f"quantize: int8-dynamic on {extra['linear_layers']} nn.Linear layers"
        f"{', kept in float: ' + ', '.join(extra['kept_float']) if extra['kept_float'] else ''}")
    return QuantizedModel(cfg, m, m, info)


def _apply_coreml_weights(model, cfg, deploy_cfg, calib, progress, log):
    from .coreml_schemes import TORCH_SIDE_WEIGHTS, compress_mlmodel, describe_weights, simulate_weight_compression

    if calib is not None and not calib.shipped:
        log(f"quantize: {cfg.scheme} compresses weights only; --calib-data is not used")
    ref, extra = simulate_weight_compression(model, cfg, deploy_cfg, progress=progress)
    info = _base_info(cfg, describe_weights(cfg))
    info["calibration"] = None
    info["torch_side"] = TORCH_SIDE_WEIGHTS.format(
        fn="linear_quantize_weights" if isinstance(cfg, CoreMLWeightInt8Config) else "palettize_weights")
    info["torch_side_weights"] = extra
    log(f"quantize: {cfg.scheme} (Core ML weight compression); torch-side simulation compressed "
        f"{extra['weights_compressed']} weight tensors")
    return QuantizedModel(cfg, model, ref, info, compress_mlmodel=partial(compress_mlmodel, cfg=cfg))


def _apply_coreml_mixed(model, cfg: CoreMLMixedPaletteConfig, deploy_cfg, calib, progress, log):
    from .coreml_schemes import TORCH_SIDE_MIXED, describe_mixed, mixed_palette_compressor, program_weights_reference

    calib = calib if calib is not None else load_calibration()
    ref = program_weights_reference(model, deploy_cfg)
    info = _base_info(cfg, describe_mixed(cfg))
    info["calibration"] = {**calib.describe(), "used_for": "per-layer sensitivity (nuclear norms) of the bit allocation"}
    info["torch_side"] = TORCH_SIDE_MIXED
    q = QuantizedModel(cfg, model, ref, info)
    # the per-layer plan needs the converted (uncompressed) Core ML program: it is made by
    # compress_mlmodel in the lower stage, which also loads the palettized weights into `ref` and
    # completes `info` (the export reads both only after compress_mlmodel ran)
    q.compress_mlmodel = mixed_palette_compressor(model, cfg, deploy_cfg, calib, reference=ref, info=info,
                                                  progress=progress, log=log)
    log(f"quantize: palette-mixed, budget {cfg.budget_avg_bits:g} average weight bits over "
        f"{'/'.join(map(str, cfg.choices))}-bit palettes; per-layer bits are planned on the converted Core ML program")
    return q


_HANDLERS = {
    Int8StaticConfig: _apply_int8_static,
    Int8DynamicConfig: _apply_int8_dynamic,
    CoreMLWeightInt8Config: _apply_coreml_weights,
    CoreMLPaletteConfig: _apply_coreml_weights,
    CoreMLInt8Config: _apply_coreml_int8,
    CoreMLMixedPaletteConfig: _apply_coreml_mixed,
}


def accuracy_vs_fp32(fp32_model, run: Callable, deploy_cfg, *, num_images: int = ACCURACY_IMAGES,
                     method: str = "") -> dict:
    """SQNR / top-1 agreement of `run(x)` (artifact runner or torch-side module) against the fp32
    model's logits on the shipped sample images. The manifest's `quantization.accuracy` block."""
    import torch

    from ..verify import compare, eager_logits, sample_batch

    x, names = sample_batch(deploy_cfg, num_images)
    ref = eager_logits(fp32_model, x)
    with torch.no_grad():
        test = run(x).float()
    c = compare(ref, test)
    return {"images": len(names), "compared_with": "fp32 PyTorch model (logits)", "method": method,
            "sqnr_db": c["sqnr_db"], "top1_agreement": c["top1_agreement"], "max_abs_diff": c["max_abs_diff"]}
