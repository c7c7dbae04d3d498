"""Post-training quantization: a registry of schemes, each a validated config with its handler beside it.

    from mobilevit_deploy.quantize import get_config, quantize_model
    cfg = get_config("executorch", "int8", keep_float="auto:2", calib_data="data/train")
    q = quantize_model(model, cfg, deploy_cfg=model.deploy_cfg)
    q.module      # nn.Module to capture and lower (logits out)
    q.reference   # its numerics in PyTorch (for Core ML: the torch-side simulation)
    q.info        # the manifest's `quantization` block (scheme, method, calibration, keep-float)

Schemes per target (`list_schemes()`), declared in `executorch_schemes.py` / `coreml_schemes.py`
(config class + `@register_scheme` handler; the registry is `configs.py`):
- executorch: `int8` (pt2e static W8A8, XNNPACKQuantizer, calibrated), `int8-dynamic` (torchao
  `quantize_` + Int8DynamicActivationIntxWeightConfig on nn.Linear);
- coreml: `w8` (int8 weights), `palette6`, `palette4` (k-means palettes), `palette-mixed` (per-layer
  4/6/8-bit palettes under an average-bits budget, `mixed_precision.py`; its sensitivity pass uses the
  calibration images), `int8` (W8A8 with CoreMLQuantizer, calibrated, iOS 17).
ONNX has no scheme yet.

The two calibrated W8A8 schemes (executorch `int8`, coreml `int8`) take `calibration="minmax"` (the
quantizer's own observers) or `"vit"` (ViT-aware PTQ, `vit_ptq.apply_vit_calibration`, run on the
observed graph before convert_pt2e, on the same calibration images). `pt2e.py` holds that flow.

`python -m mobilevit_deploy.quantize sensitivity --model NAME` prints the per-layer sensitivity
ranking (the units `--keep-float` takes). Importing this package imports neither torch nor any
toolchain; each scheme imports what it needs.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..errors import UserError
from ..verify import ACCURACY_IMAGES, compare_with_fp32
from . import coreml_schemes, executorch_schemes  # noqa: F401  (their @register_scheme declarations)
from .calibration import DEFAULT_CALIB_SIZE, CalibrationSet, load_calibration
from .configs import (
    CALIBRATION_METHODS,
    DEFAULT_KEEP_FLOAT,
    CoreMLCompression,
    QuantConfig,
    QuantizedModel,
    handler_for,
    lookup_scheme,
    parse_keep_float,
    register_scheme,
    scheme_table,
)
from .coreml_schemes import CoreMLInt8Config, CoreMLMixedPaletteConfig, CoreMLPaletteConfig, CoreMLWeightInt8Config
from .executorch_schemes import Int8DynamicConfig, Int8StaticConfig
from .pt2e import capture_dynamic_batch

__all__ = [
    "SCHEMES", "list_schemes", "get_config", "quantize_model", "QuantizedModel", "QuantConfig", "load_calibration",
    "CalibrationSet", "accuracy_vs_fp32", "parse_keep_float", "Int8StaticConfig", "Int8DynamicConfig",
    "CoreMLWeightInt8Config", "CoreMLPaletteConfig", "CoreMLInt8Config", "CoreMLMixedPaletteConfig",
    "CoreMLCompression", "DEFAULT_CALIB_SIZE", "ACCURACY_IMAGES", "CALIBRATION_METHODS", "schemes_accepting",
    "register_scheme", "scheme_config_class", "capture_dynamic_batch",
]

# config fields set by their own CLI flag (get_config names the flag and the schemes that take it)
OPTION_FLAGS = {"calibration": "--calibration", "budget_avg_bits": "--weight-bits-budget"}


def _ctor(cls, preset):
    return partial(cls, **preset) if preset else cls


# target -> scheme name -> config constructor (a view of the registry, for listing)
SCHEMES: dict[str, dict[str, Callable]] = {t: {s: _ctor(*v) for s, v in tab.items()}
                                           for t, tab in scheme_table().items()}


def scheme_config_class(target: str, scheme: str) -> type:
    """The config class of `scheme` for `target` (UserError naming the choices)."""
    return lookup_scheme(target, scheme)[0]


def schemes_accepting(option: str) -> list[str]:
    """'target scheme' of every scheme whose config has the field `option` (e.g. 'calibration')."""
    return [f"{t} {s}" for t, tab in scheme_table().items() for s, (cls, _) in tab.items()
            if option in cls.field_names()]


def list_schemes(target: str | None = None) -> list[str] | dict[str, list[str]]:
    table = scheme_table()
    if target is None:
        return {t: sorted(s) for t, s in table.items()}
    if target not in table:
        from ..errors import choices_error

        raise choices_error("target", target, sorted(table))
    return sorted(table[target])


def _keep_float_overrides(target, scheme, fields: set[str], keep_float) -> dict:
    """The config fields of a `--keep-float` value (CLI form, or a (patterns, auto) tuple)."""
    kf = parse_keep_float(keep_float) if isinstance(keep_float, str) else keep_float
    if kf is None:  # the measured default (DEFAULT_KEEP_FLOAT) for the schemes that take keep_float_auto
        return dict(zip(("keep_float", "keep_float_auto"), DEFAULT_KEEP_FLOAT)) if "keep_float_auto" in fields else {}
    if "keep_float" not in fields:
        raise UserError(f"--keep-float does not apply to {target} {scheme} (it applies to: "
                        f"{', '.join(schemes_accepting('keep_float'))})")
    patterns, auto = kf
    if auto and "keep_float_auto" not in fields:
        raise UserError(f"--keep-float auto:N needs a calibrated scheme; {target} {scheme} takes module patterns only")
    out = {"keep_float": patterns}
    if "keep_float_auto" in fields:
        out["keep_float_auto"] = auto
    return out


def get_config(target: str, scheme: str, *, keep_float: str | tuple | None = None, **overrides) -> QuantConfig:
    """The config of `scheme` for `target`; `keep_float` is the CLI form ("a.b,c.*", "auto:N", "none")
    or a (patterns, auto) tuple. None keeps the scheme's measured default. Raises UserError."""
    cls, preset = lookup_scheme(target, scheme)
    fields = cls.field_names()
    overrides = {**preset, **_keep_float_overrides(target, scheme, fields, keep_float), **overrides}
    for opt, flag in OPTION_FLAGS.items():
        if opt in overrides and opt not in fields:
            raise UserError(f"{flag} does not apply to {target} {scheme} (it applies to: "
                            f"{', '.join(schemes_accepting(opt))})")
    unknown = set(overrides) - fields
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(sorted(unknown))} for {target} {scheme} "
                        f"(valid: {', '.join(sorted(fields))})")
    try:
        return cls(**overrides)
    except TypeError as e:
        raise UserError(f"bad options for {target} {scheme}: {e}") from None


def quantize_model(model, config: QuantConfig, *, deploy_cfg, calib: CalibrationSet | None = None,
                   progress: bool = True, log: Callable[[str], None] | None = None) -> QuantizedModel:
    """Apply `config` to `model` (left untouched). Calibrated schemes use `calib`, by default the
    config's own `calibration_set()` (its calib_data, or the shipped sample images, said in
    `info['calibration']`)."""
    log = log or (lambda s: None)
    handler = handler_for(config)
    if calib is None and config.calibrated:
        calib = config.calibration_set()
    return handler(model.eval(), config, deploy_cfg, calib, progress, log)


def accuracy_vs_fp32(fp32_model, run: Callable, deploy_cfg, *, num_images: int = ACCURACY_IMAGES,
                     method: str = "") -> dict:
    """SQNR / top-1 agreement of `run(x)` against the fp32 model on the shipped sample images
    (`verify.compare_with_fp32`): the manifest's `quantization.accuracy` block."""
    return compare_with_fp32(fp32_model, run, deploy_cfg, num_images=num_images, method=method)
