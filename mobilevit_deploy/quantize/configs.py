"""The quantization scheme registry (torchao style): a validated config class + a handler registered beside it.

A scheme is declared once, in its target's module (`executorch_schemes.py`, `coreml_schemes.py`):

    @dataclass(frozen=True)
    class Int8StaticConfig(QuantConfig):
        scheme: ClassVar[str] = "int8"              # the --quant name
        target: ClassVar[str] = "executorch"
        calibrated: ClassVar[bool] = True            # takes calib_data / calib_size
        verify_min_sqnr_db: ClassVar[float] = 20.0   # artifact vs its own torch-side module
        ...fields, validated in __post_init__ (UserError)...

    @register_scheme(Int8StaticConfig)
    def _apply_int8_static(model, cfg, deploy_cfg, calib, progress, log) -> QuantizedModel: ...

`quantize_model(model, config)` looks the handler up by the config's type. A config class can offer
several scheme names through `variants` (palette6 / palette4 are `CoreMLPaletteConfig(nbits=6 / 4)`).
Invalid values raise UserError at construction, so a bad scheme is refused before anything is exported.

Calibrated schemes hold their calibration options (`calib_data`: a folder of images, None for the
shipped samples; `calib_size`: how many, deterministic and class-balanced); `calibration_set()` picks
the images. Keep-in-float (`keep_float`, `keep_float_auto`) for the two calibrated W8A8 schemes:
`fnmatch` patterns over the *innermost module path* of each quantizable op (`stem.conv`,
`stages.2.*`); `keep_float_auto=N` adds the N units ranked most sensitive by
`sensitivity.rank_units` on the calibration images. Calibration method (`calibration`) of the W8A8
schemes: "minmax" converts the quantizer's own observers as they are; "vit" runs
`vit_ptq.apply_vit_calibration` (ViT-aware PTQ, Liu et al. 2021) on the observed graph first.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..errors import UserError, choices_error

__all__ = [
    "QuantConfig", "QuantizedModel", "CoreMLCompression", "register_scheme", "scheme_table", "handler_for",
    "parse_keep_float", "DEFAULT_KEEP_FLOAT", "CALIBRATION_METHODS", "TARGETS",
]

TARGETS = ("executorch", "coreml", "onnx")

# Measured default of --keep-float for the calibrated int8 schemes (benchmarks/ptq_mobilevit_xxs.md):
# keep nothing in float unless asked. See `DEFAULT_KEEP_FLOAT_REASON`.
DEFAULT_KEEP_FLOAT: tuple[tuple[str, ...], int] = ((), 0)
DEFAULT_KEEP_FLOAT_REASON = (
    "measured on the shipped mobilevit_xxs, CIFAR-10 val (1,000 images), ExecuTorch int8 .pte: keeping the k most "
    "sensitive units in float raises SQNR vs fp32 from 23.1 dB (k=0) to 26.3 / 27.4 dB (k=3 / 6) and top-1 agreement "
    "from 93.4 % to 95.8 % (k=3) at the same size, but not top-1 (56.8 % at k=0 = fp32; 56.5 % at k=3), and the "
    "per-layer sensitivity pass adds ~80 s to the export; so nothing is kept in float by default and "
    "--keep-float auto:3 is the documented higher-fidelity choice"
)

COREML_PALETTE_NBITS = (1, 2, 3, 4, 6, 8)
# W8A8 calibration methods: the quantizer's own observers, or ViT-aware PTQ on top of them (vit_ptq.py)
CALIBRATION_METHODS = ("minmax", "vit")
# `verification` of a quantized artifact compares it with its own torch-side module; the pass
# threshold (dB) of a scheme that does not set its own (Core ML: only run on macOS, fp16 Core ML
# against the torch-side module).
DEFAULT_VERIFY_MIN_SQNR_DB = 20.0


# ----------------------------------------------------------------------------------------- validators

def check_keep_float(patterns, auto) -> tuple[tuple[str, ...], int]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for p in patterns:
        if not isinstance(p, str) or not p.strip() or p != p.strip() or "," in p:
            raise UserError(f"keep_float: bad module pattern {p!r} (a module path like 'stages.2.1.conv_kxk.conv' "
                            "or a glob like 'stages.2.*')")
        if p.startswith("auto"):
            raise UserError(f"keep_float: {p!r} is not a module pattern; use keep_float_auto=N "
                            "(CLI: --keep-float auto:N)")
    if isinstance(auto, bool) or not isinstance(auto, int) or auto < 0:
        raise UserError(f"keep_float_auto must be an integer >= 0, got {auto!r}")
    return patterns, auto


def check_positive_int(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"{name} must be a positive integer, got {n!r}")


def check_calibration_method(method) -> None:
    if method not in CALIBRATION_METHODS:
        raise UserError(f"unknown calibration method {method!r} (choose from: {', '.join(CALIBRATION_METHODS)})")


def check_threshold(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"weight_threshold must be an integer >= 0, got {n!r}")


def check_calibration_source(cfg) -> None:
    """`calib_data` (a path, kept as a string) and `calib_size` of a calibrated config."""
    if cfg.calib_data is not None:
        object.__setattr__(cfg, "calib_data", os.fspath(cfg.calib_data))
    if cfg.calib_size is not None and (isinstance(cfg.calib_size, bool) or not isinstance(cfg.calib_size, int)
                                       or cfg.calib_size < 1):
        raise UserError(f"--calib-size must be a positive integer, got {cfg.calib_size!r}")


def parse_keep_float(text: str | None) -> tuple[tuple[str, ...], int] | None:
    """`--keep-float` value -> (patterns, auto N); None for None.

    "stem.conv,head.fc" -> (("stem.conv", "head.fc"), 0); "auto:3" -> ((), 3);
    "auto:2,stem.conv" -> (("stem.conv",), 2); "none" -> ((), 0).
    """
    if text is None:
        return None
    text = text.strip()
    if text.lower() in ("none", ""):
        return (), 0
    patterns, auto = [], 0
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise UserError(f"--keep-float: empty entry in {text!r}")
        if part.lower().startswith("auto"):
            _, sep, n = part.partition(":")
            if not sep or not n.isdigit() or int(n) < 1:
                raise UserError(f"--keep-float: {part!r} must be auto:N with N >= 1 (the N most sensitive layers)")
            auto = int(n)
        else:
            patterns.append(part)
    return check_keep_float(tuple(patterns), auto)


# ----------------------------------------------------------------------------------------- base class

class QuantConfig:
    """Base of every scheme config (a frozen dataclass). Class attributes declare the scheme."""

    scheme: ClassVar[str]
    target: ClassVar[str]
    calibrated: ClassVar[bool] = False
    verify_min_sqnr_db: ClassVar[float] = DEFAULT_VERIFY_MIN_SQNR_DB
    # scheme name -> field presets, for a class that offers several names (default: {scheme: {}})
    variants: ClassVar[dict[str, dict] | None] = None

    @classmethod
    def scheme_variants(cls) -> dict[str, dict]:
        return dict(cls.variants) if cls.variants is not None else {cls.scheme: {}}

    @classmethod
    def field_names(cls) -> set[str]:
        return set(cls.__dataclass_fields__)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def calibration_set(self):
        """The calibration images of a calibrated scheme (`load_calibration(calib_data, calib_size)`);
        None for a scheme that takes none. Raises DataError for a missing or empty folder."""
        if not self.calibrated:
            return None
        from .calibration import load_calibration

        return load_calibration(self.calib_data, self.calib_size)


# ----------------------------------------------------------------------------------------- registry

_HANDLERS: dict[type, Callable] = {}
_SCHEMES: dict[str, dict[str, tuple[type, dict]]] = {t: {} for t in TARGETS}


def register_scheme(config_cls: type):
    """Decorator: register `handler(model, cfg, deploy_cfg, calib, progress, log) -> QuantizedModel` for
    `config_cls` and its scheme name(s) under `config_cls.target`."""
    if not issubclass(config_cls, QuantConfig):
        raise TypeError(f"{config_cls.__name__} is not a QuantConfig")

    def wrap(handler):
        _HANDLERS[config_cls] = handler
        for name, preset in config_cls.scheme_variants().items():
            _SCHEMES.setdefault(config_cls.target, {})[name] = (config_cls, dict(preset))
        return handler

    return wrap


def scheme_table() -> dict[str, dict[str, tuple[type, dict]]]:
    """{target: {scheme name: (config class, preset fields)}} of every registered scheme."""
    return {t: dict(s) for t, s in _SCHEMES.items()}


def handler_for(config) -> Callable:
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise UserError(f"not a quantization config: {type(config).__name__}")
    return handler


def lookup_scheme(target: str, scheme: str) -> tuple[type, dict]:
    """(config class, preset) of `scheme` for `target`; UserError naming the choices."""
    if target not in _SCHEMES:
        raise choices_error("target", target, sorted(_SCHEMES))
    table = _SCHEMES[target]
    if not table:
        avail = "; ".join(t + ": " + ", ".join(sorted(s)) for t, s in _SCHEMES.items() if s)
        raise UserError(f"no quantization scheme for target {target!r} yet (available: {avail})")
    if scheme not in table:
        raise choices_error(f"quantization scheme for {target}", scheme, sorted(table))
    return table[scheme]


# ----------------------------------------------------------------------------------------- results

@dataclass
class CoreMLCompression:
    """What a Core ML compression pass returns: the compressed MLModel, the torch-side module with its
    numerics, and the keys it adds to the manifest's `quantization` block."""

    mlmodel: Any
    reference: Any
    info: dict = field(default_factory=dict)


@dataclass
class QuantizedModel:
    """What `quantize_model` returns; the export's quantize stage captures `module` for lowering."""

    config: Any
    module: Any  # nn.Module to capture and lower, logits out
    reference: Any  # nn.Module with the artifact's numerics in PyTorch (torch-side check)
    info: dict  # manifest `quantization` block (without the measured size/accuracy figures)
    # Core ML weight schemes: MLModel -> CoreMLCompression (a pure function: nothing here changes)
    compress_mlmodel: Callable | None = None
    sensitivity: Any = None  # sensitivity.SensitivityReport when keep_float_auto was used
    timings_s: dict = field(default_factory=dict)

    @property
    def minimum_deployment_target(self) -> str | None:
        """Core ML deployment target the scheme needs (int8: iOS17), or None."""
        return getattr(self.config, "minimum_deployment_target", None)

    @property
    def verify_min_sqnr_db(self) -> float:
        """Pass threshold of the artifact against `reference` (not against fp32)."""
        return self.config.verify_min_sqnr_db  # a class attribute, or a property of a config with variants
