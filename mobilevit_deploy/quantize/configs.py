"""One small, validated config per quantization scheme (the torchao style: config object + apply).

Each config class names its `scheme` and `target`; `quantize_model(model, config, ...)` applies it
(see `__init__.py`). Invalid values raise UserError at construction, so a bad scheme is refused
before anything is exported.

Calibration method (`calibration`) of the two calibrated W8A8 schemes: "minmax" (default) converts
the quantizer's own observers as they are; "vit" runs `vit_ptq.apply_vit_calibration` (ViT-aware
PTQ, Liu et al. 2021) on the observed graph before convert_pt2e (CLI: --calibration vit).

Keep-in-float (`keep_float`, `keep_float_auto`) for the two calibrated W8A8 schemes: patterns over
the *innermost module path* of each quantizable op (`fnmatch`): `stem.conv` matches exactly that
module's ops, `stages.2.*` everything inside stage 2. `keep_float_auto=N` adds the N units ranked
most sensitive by `sensitivity.rank_units` on the calibration images (per-unit SQNR, see there).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from ..errors import UserError

__all__ = [
    "Int8StaticConfig", "Int8DynamicConfig", "CoreMLWeightInt8Config", "CoreMLPaletteConfig", "CoreMLInt8Config",
    "CoreMLMixedPaletteConfig", "parse_keep_float", "DEFAULT_KEEP_FLOAT", "CALIBRATION_METHODS",
]

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

_COREML_PALETTE_NBITS = (1, 2, 3, 4, 6, 8)
# W8A8 calibration methods: the quantizer's own observers, or ViT-aware PTQ on top of them (vit_ptq.py)
CALIBRATION_METHODS = ("minmax", "vit")


def _check_keep_float(patterns, auto) -> tuple[tuple[str, ...], int]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for p in patterns:
        if not isinstance(p, str) or not p.strip() or p != p.strip() or "," in p:
            raise UserError(f"keep_float: bad module pattern {p!r} (a module path like 'stages.2.1.conv_kxk.conv' "
                            "or a glob like 'stages.2.*')")
        if p.startswith("auto"):
            raise UserError(f"keep_float: {p!r} is not a module pattern; use keep_float_auto=N (CLI: --keep-float auto:N)")
    if isinstance(auto, bool) or not isinstance(auto, int) or auto < 0:
        raise UserError(f"keep_float_auto must be an integer >= 0, got {auto!r}")
    return patterns, auto


def _check_batch(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"calib_batch_size must be a positive integer, got {n!r}")


def _check_calibration(method):
    if method not in CALIBRATION_METHODS:
        raise UserError(f"unknown calibration method {method!r} (choose from: {', '.join(CALIBRATION_METHODS)})")


def _check_threshold(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"weight_threshold must be an integer >= 0, got {n!r}")


class _Config:
    scheme: ClassVar[str]
    target: ClassVar[str]
    calibrated: ClassVar[bool] = False

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@dataclass(frozen=True)
class Int8StaticConfig(_Config):
    """ExecuTorch `int8`: static W8A8 through torchao's pt2e flow with the XNNPACK quantizer.

    Weights int8 symmetric (per output channel by default), activations int8 per tensor from a
    histogram observer over the calibration images; lowered to the XNNPACK delegate.
    """

    scheme: ClassVar[str] = "int8"
    target: ClassVar[str] = "executorch"
    calibrated: ClassVar[bool] = True

    per_channel: bool = True
    keep_float: tuple[str, ...] = ()
    keep_float_auto: int = 0
    calib_batch_size: int = 16
    calibration: str = "minmax"  # minmax | vit (see the module docstring)

    def __post_init__(self):
        if not isinstance(self.per_channel, bool):
            raise UserError(f"per_channel must be True or False, got {self.per_channel!r}")
        kf, auto = _check_keep_float(self.keep_float, self.keep_float_auto)
        object.__setattr__(self, "keep_float", kf)
        _check_batch(self.calib_batch_size)
        _check_calibration(self.calibration)


@dataclass(frozen=True)
class Int8DynamicConfig(_Config):
    """ExecuTorch `int8-dynamic`: torchao `quantize_` with `Int8DynamicActivationIntxWeightConfig`.

    nn.Linear weights int8 (per output channel, or per group of `group_size` input channels),
    activations quantized to int8 at run time (no calibration); convolutions stay fp32.
    Measured: Int8DynamicActivationInt8WeightConfig does not lower to XNNPACK (aten._int_mm) and
    Int8WeightOnlyConfig lowers but fails at run time, so neither is offered.
    """

    scheme: ClassVar[str] = "int8-dynamic"
    target: ClassVar[str] = "executorch"

    granularity: str = "per_channel"  # per_channel | per_group
    group_size: int = 32
    keep_float: tuple[str, ...] = ()

    def __post_init__(self):
        if self.granularity not in ("per_channel", "per_group"):
            raise UserError(f"granularity must be per_channel or per_group, got {self.granularity!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1 \
                or self.group_size % 32:
            raise UserError(f"group_size must be a positive multiple of 32 (XNNPACK), got {self.group_size!r}")
        kf, _ = _check_keep_float(self.keep_float, 0)
        object.__setattr__(self, "keep_float", kf)


@dataclass(frozen=True)
class CoreMLWeightInt8Config(_Config):
    """Core ML `w8`: int8 symmetric per-channel weights (`coremltools.optimize.coreml.linear_quantize_weights`).

    Weights with at most `weight_threshold` elements stay fp16 (coremltools' default, 2048).
    """

    scheme: ClassVar[str] = "w8"
    target: ClassVar[str] = "coreml"

    granularity: str = "per_channel"  # per_channel | per_tensor
    weight_threshold: int = 2048

    def __post_init__(self):
        if self.granularity not in ("per_channel", "per_tensor"):
            raise UserError(f"granularity must be per_channel or per_tensor, got {self.granularity!r}")
        if isinstance(self.weight_threshold, bool) or not isinstance(self.weight_threshold, int) or self.weight_threshold < 0:
            raise UserError(f"weight_threshold must be an integer >= 0, got {self.weight_threshold!r}")


@dataclass(frozen=True)
class CoreMLPaletteConfig(_Config):
    """Core ML `palette6` / `palette4`: k-means weight palettization, one 2^nbits LUT per tensor
    (`coremltools.optimize.coreml.palettize_weights`; per-tensor LUTs run from iOS 16)."""

    target: ClassVar[str] = "coreml"

    nbits: int = 6
    weight_threshold: int = 2048

    @property
    def scheme(self) -> str:  # type: ignore[override]
        return f"palette{self.nbits}"

    def __post_init__(self):
        if self.nbits not in _COREML_PALETTE_NBITS:
            raise UserError(f"nbits must be one of {', '.join(map(str, _COREML_PALETTE_NBITS))}, got {self.nbits!r}")
        if isinstance(self.weight_threshold, bool) or not isinstance(self.weight_threshold, int) or self.weight_threshold < 0:
            raise UserError(f"weight_threshold must be an integer >= 0, got {self.weight_threshold!r}")


@dataclass(frozen=True)
class CoreMLInt8Config(_Config):
    """Core ML `int8`: W8A8 through ExecuTorch's `CoreMLQuantizer` on the pt2e graph (iOS 17+).

    Weights int8 symmetric per channel, activations uint8 with a min/max observer over the
    calibration images; the converted q/dq graph becomes Core ML quantize/dequantize ops.
    """

    scheme: ClassVar[str] = "int8"
    target: ClassVar[str] = "coreml"
    calibrated: ClassVar[bool] = True

    keep_float: tuple[str, ...] = ()
    keep_float_auto: int = 0
    calib_batch_size: int = 16
    minimum_deployment_target: str = "iOS17"
    calibration: str = "minmax"  # minmax | vit (see the module docstring)

    def __post_init__(self):
        kf, auto = _check_keep_float(self.keep_float, self.keep_float_auto)
        object.__setattr__(self, "keep_float", kf)
        _check_batch(self.calib_batch_size)
        _check_calibration(self.calibration)
        if self.minimum_deployment_target not in ("iOS17", "iOS18", "macOS14", "macOS15"):
            raise UserError("minimum_deployment_target must be iOS17 or later (activation quantization), "
                            f"got {self.minimum_deployment_target!r}")


@dataclass(frozen=True)
class CoreMLMixedPaletteConfig(_Config):
    """Core ML `palette-mixed`: per-layer 4/6/8-bit k-means palettes under an average-bits budget.

    `mixed_precision.plan_mixed_precision` ranks the conv/linear weights by a nuclear-norm
    sensitivity measured on the calibration images (hence `calibrated`) and the measured k-means
    error of each width, and picks the bits per layer that minimise the sensitivity-weighted error
    with sum(size * bits) <= budget_avg_bits * sum(size) over the palettized weights (those with more
    than `weight_threshold` elements; smaller ones stay fp16, outside the budget). One LUT per tensor
    (`palettize_weights` with one `OpPalettizerConfig` per op; iOS 16).
    """

    scheme: ClassVar[str] = "palette-mixed"
    target: ClassVar[str] = "coreml"
    calibrated: ClassVar[bool] = True

    budget_avg_bits: float = 6.0
    choices: tuple[int, ...] = (4, 6, 8)
    weight_threshold: int = 2048
    sensitivity_images: int = 32
    calib_batch_size: int = 16

    def __post_init__(self):
        import math

        choices = (self.choices,) if isinstance(self.choices, int) else tuple(self.choices)
        if not choices or len(set(choices)) != len(choices) or any(
                isinstance(b, bool) or b not in _COREML_PALETTE_NBITS for b in choices):
            raise UserError(f"choices must be distinct bit widths from {', '.join(map(str, _COREML_PALETTE_NBITS))} "
                            f"(Core ML LUT sizes), got {self.choices!r}")
        choices = tuple(sorted(choices))
        object.__setattr__(self, "choices", choices)
        b = self.budget_avg_bits
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise UserError(f"--weight-bits-budget must be a number of average bits, got {b!r}")
        lo, hi = choices[0], choices[-1]
        if not lo <= b <= hi:
            raise UserError(f"--weight-bits-budget {b:g} is {'below the smallest' if b < lo else 'above the largest'} "
                            f"bit width offered ({', '.join(map(str, choices))}): give {lo} <= B <= {hi} average bits")
        object.__setattr__(self, "budget_avg_bits", float(b))
        _check_threshold(self.weight_threshold)
        if isinstance(self.sensitivity_images, bool) or not isinstance(self.sensitivity_images, int) \
                or self.sensitivity_images < 1:
            raise UserError(f"sensitivity_images must be a positive integer, got {self.sensitivity_images!r}")
        _check_batch(self.calib_batch_size)


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
    return _check_keep_float(tuple(patterns), auto)
