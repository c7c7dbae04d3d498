"""`ExportConfig`: what to export to (target, backend, precision) and how to quantize it, validated once.

    ExportConfig(target="executorch")                                  # fp32 .pte, XNNPACK
    ExportConfig("coreml", precision="fp32")
    ExportConfig("executorch", quant=get_config("executorch", "int8", calib_data="data/train"))
    ExportConfig.from_dict({"target": "executorch", "quant": {"scheme": "int8", "calibration": "vit"}})
    ExportConfig.from_dict({"target": "executorch", "quant": "int8", "calib_size": 64})   # the CLI's flat form
    ExportConfig.from_yaml("export.yaml")

Construction raises UserError for anything invalid (unknown target, backend or precision, a scheme
the target does not offer, options the scheme does not take), before any work is done. `quant` is
the scheme's own config (`mobilevit_deploy.quantize`), calibration source included. Importing this
module is light (no torch).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, choices_error
from ..quantize import QuantConfig, get_config, lookup_scheme, parse_keep_float, schemes_accepting
from .cascade import COREML_CASCADE_DEPLOYMENT_TARGET, CascadeSpec

__all__ = ["ExportConfig", "TARGETS", "BACKENDS", "PRECISIONS", "COREML_DEPLOYMENT_TARGET", "artifact_path"]

TARGETS = ("coreml", "executorch", "onnx")
BACKENDS = {"coreml": ("mlprogram",), "executorch": ("xnnpack", "coreml"), "onnx": ("onnxruntime",)}
PRECISIONS = {
    ("coreml", "mlprogram"): ("fp16", "fp32"),
    ("executorch", "xnnpack"): ("fp32",),
    ("executorch", "coreml"): ("fp16", "fp32"),
    ("onnx", "onnxruntime"): ("fp32",),
}
COREML_DEPLOYMENT_TARGET = "iOS16"  # float ML program; W8A8 (coreml int8) needs iOS17

# from_dict's flat form (what the CLI has): quantization options beside `quant` -> scheme config fields
_FLAT_QUANT_OPTIONS = {"calib_data": "calib_data", "calib_size": "calib_size", "keep_float": "keep_float",
                       "calibration": "calibration", "weight_bits_budget": "budget_avg_bits"}
_KEYS = ("target", "backend", "precision", "quant", "verify", "size", "cascade")
# from_dict's flat form: beside `cascade` (CascadeSpec fields)
_FLAT_CASCADE_OPTIONS = ("exit_data", "max_drop", "exit_head")


def artifact_path(out_dir, model_name: str, target: str, backend: str | None = None, quant: str | None = None) -> Path:
    """artifacts/<model>[_<quant>].mlpackage | .pte | _coreml.pte | .onnx"""
    backend = backend or BACKENDS[target][0]
    stem = model_name + (f"_{quant}" if quant else "")
    if target == "coreml":
        return Path(out_dir) / f"{stem}.mlpackage"
    if target == "executorch":
        return Path(out_dir) / (f"{stem}_coreml.pte" if backend == "coreml" else f"{stem}.pte")
    return Path(out_dir) / f"{stem}.onnx"


@dataclass(frozen=True)
class ExportConfig:
    """One export: `target` (coreml | executorch | onnx), `backend` (None: the target's first),
    `precision` (None: the backend's first; Core ML fp16), `quant` (a scheme config or None) and
    whether to `verify` the artifact against PyTorch."""

    target: str = "coreml"
    backend: str | None = None
    precision: str | None = None
    quant: QuantConfig | None = None
    verify: bool = True
    size: tuple[int, int] | None = None  # input H, W of the exported graph; None: the weights' deploy size
    cascade: CascadeSpec | None = None  # a coarse-to-fine cascade: one graph per stage size (export/cascade.py)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise choices_error("target", self.target, TARGETS)
        backend = self.backend or BACKENDS[self.target][0]
        if backend not in BACKENDS[self.target]:
            raise choices_error(f"backend for {self.target}", backend, BACKENDS[self.target])
        object.__setattr__(self, "backend", backend)
        if self.quant is not None:
            _check_quant(self.target, backend, self.quant)
        allowed = PRECISIONS[(self.target, backend)]
        precision = self.precision or allowed[0]
        if precision not in allowed:
            raise choices_error(f"precision for {self.target}/{backend}", precision, allowed)
        object.__setattr__(self, "precision", precision)
        if not isinstance(self.verify, bool):
            raise UserError(f"verify must be True or False, got {self.verify!r}")
        from .size import parse_size

        object.__setattr__(self, "size", parse_size(self.size))
        if self.cascade is not None:
            _check_cascade(self)

    # ------------------------------------------------------------------------------- derived facts

    @property
    def scheme(self) -> str | None:
        """The quantization scheme's name (None: a float export)."""
        return None if self.quant is None else self.quant.scheme

    @property
    def deployment_target(self) -> str:
        """Core ML minimum deployment target: iOS16, or what the quantization scheme needs (int8: iOS17)."""
        if self.cascade is not None:  # multi-function ML program
            return COREML_CASCADE_DEPLOYMENT_TARGET
        return getattr(self.quant, "minimum_deployment_target", None) or COREML_DEPLOYMENT_TARGET

    def artifact_path(self, out_dir, model_name: str) -> Path:
        stem = model_name + (self.cascade.suffix if self.cascade is not None else "")
        return artifact_path(out_dir, stem, self.target, self.backend, self.scheme)

    def fp32(self) -> ExportConfig:
        """The float export of the same target and backend at fp32 (the quantized artifact's size baseline)."""
        return ExportConfig(self.target, self.backend, "fp32", None, verify=False, size=self.size)

    # ------------------------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict:
        quant = None if self.quant is None else {"scheme": self.quant.scheme, **self.quant.to_dict()}
        return {"target": self.target, "backend": self.backend, "precision": self.precision, "quant": quant,
                "verify": self.verify, "size": None if self.size is None else list(self.size),
                "cascade": None if self.cascade is None else self.cascade.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> ExportConfig:
        """From `to_dict()`'s form, or the flat form of the CLI (`quant` a scheme name, its options
        `calib_data`, `calib_size`, `keep_float`, `calibration`, `weight_bits_budget` beside it;
        None means not given). Calibration options are ignored by schemes that take no calibration."""
        if not isinstance(d, dict):
            raise UserError(f"an export config must be a mapping, got {type(d).__name__}")
        unknown = set(d) - set(_KEYS) - set(_FLAT_QUANT_OPTIONS) - set(_FLAT_CASCADE_OPTIONS)
        if unknown:
            raise UserError(f"unknown export config key(s) {', '.join(sorted(unknown))} "
                            f"(valid: {', '.join(_KEYS + tuple(_FLAT_QUANT_OPTIONS) + _FLAT_CASCADE_OPTIONS)})")
        target = d.get("target") or "coreml"
        if target not in TARGETS:
            raise choices_error("target", target, TARGETS)
        backend = d.get("backend")
        if backend is not None and backend not in BACKENDS[target]:
            raise choices_error(f"backend for {target}", backend, BACKENDS[target])
        flat = {k: d[k] for k in _FLAT_QUANT_OPTIONS if d.get(k) is not None}
        quant = _quant_from(target, backend, d.get("quant"), flat)
        verify = d.get("verify", True)
        cascade = CascadeSpec.from_value(d.get("cascade"), *(d.get(k) for k in _FLAT_CASCADE_OPTIONS))
        return cls(target, backend, d.get("precision"), quant, True if verify is None else verify, size=d.get("size"),
                   cascade=cascade)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ExportConfig:
        import yaml

        try:
            d = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read export config {path}: {e}") from None
        return cls.from_dict(d or {})


def _check_cascade(config: ExportConfig) -> None:
    """A cascade needs a multi-graph target, float stages, and no other input size than its last stage."""
    from .cascade import check_target

    if not isinstance(config.cascade, CascadeSpec):
        raise UserError(f"cascade must be a CascadeSpec (export/cascade.py), got {type(config.cascade).__name__}")
    check_target(config.target, config.backend, config.quant)
    if config.cascade.depth:
        if config.size is not None:
            raise UserError(f"--size conflicts with --cascade exit{config.cascade.exit_after}: a depth cascade runs at "
                            "the input size its exit head was trained at (the model's); leave out --size")
        return
    last = config.cascade.sizes[-1]
    if config.size is not None and tuple(config.size) != (last, last):
        raise UserError(f"--size {config.size[0]}x{config.size[1]} conflicts with --cascade "
                        f"{','.join(map(str, config.cascade.sizes))}: a cascade's input size is its last stage's "
                        f"({last}x{last}); leave out --size")


def _check_backend_takes_quant(target: str, backend: str) -> None:
    if target == "executorch" and backend != "xnnpack":
        raise UserError(f"quantization schemes for executorch are lowered to XNNPACK; --backend {backend} "
                        "is not offered with --quant (use --target coreml --quant ... for Core ML)")


def _check_quant(target: str, backend: str, quant) -> None:
    if not isinstance(quant, QuantConfig):
        raise UserError(f"quant must be a quantization config (mobilevit_deploy.quantize.get_config), "
                        f"got {type(quant).__name__}")
    _check_backend_takes_quant(target, backend)
    if quant.target != target:
        cls, _ = lookup_scheme(target, quant.scheme)  # the choices for this target, or "no scheme for onnx"
        if not isinstance(quant, cls):
            raise UserError(f"{type(quant).__name__} is a scheme for target {quant.target}, not {target}")


def _quant_from(target: str, backend: str | None, quant, flat: dict):
    """The scheme config of from_dict's `quant` (None, a scheme name + flat options, a dict, a config)."""
    if quant is None:
        if "calibration" in flat or "weight_bits_budget" in flat:
            flag, opt = (("--calibration", "calibration") if "calibration" in flat
                         else ("--weight-bits-budget", "budget_avg_bits"))
            raise UserError(f"{flag} needs --quant (it applies to: {', '.join(schemes_accepting(opt))})")
        if flat:
            raise UserError("calib_data/calib_size/keep_float need a quantization scheme (quant=...)")
        return None
    _check_backend_takes_quant(target, backend or BACKENDS[target][0])
    if isinstance(quant, QuantConfig):
        if flat:
            raise UserError(f"options {', '.join(sorted(flat))} go into the scheme config, not beside it")
        return quant
    if isinstance(quant, dict):
        fields = dict(quant)
        scheme = fields.pop("scheme", None)
        if scheme is None:
            raise UserError("quant: a mapping needs its 'scheme'")
        if "keep_float" in fields:  # the config's own form: patterns + keep_float_auto
            fields["keep_float"] = (tuple(fields["keep_float"] or ()), fields.pop("keep_float_auto", 0))
        return get_config(target, scheme, **{**_flat_fields(target, scheme, flat), **fields})
    return get_config(target, str(quant), **_flat_fields(target, str(quant), flat))


def _flat_fields(target: str, scheme: str, flat: dict) -> dict:
    cls, _ = lookup_scheme(target, scheme)
    out = {_FLAT_QUANT_OPTIONS[k]: v for k, v in flat.items()
           if cls.calibrated or k not in ("calib_data", "calib_size")}
    if "keep_float" in out and isinstance(out["keep_float"], str):
        out["keep_float"] = parse_keep_float(out["keep_float"])
    return out

