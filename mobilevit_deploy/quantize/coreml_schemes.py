"""Core ML schemes: each config (validated dataclass, scheme attributes) declared beside its handler.

- `w8`, `palette6`, `palette4`: weight compression of the converted MLModel with
  `coremltools.optimize.coreml` (`linear_quantize_weights` / `palettize_weights`), applied between
  `export.coreml.convert` and `save`.
- `palette-mixed`: per-layer 4/6/8-bit palettes under an average-bits budget
  (`mixed_precision.plan_mixed_precision` on the converted, uncompressed MLModel, then
  `palettize_weights` with the plan's per-op config), applied at the same point.
  Both return a `CoreMLCompression` (the compressed MLModel, its torch-side module, manifest keys):
  the QuantizedModel they come from is not changed.
- `int8`: W8A8 with ExecuTorch's `CoreMLQuantizer` on the pt2e graph (prepare -> calibrate ->
  convert); the q/dq graph converts to Core ML quantize/dequantize ops (iOS 17 target).

Core ML cannot run on Linux (coremltools ships no runtime or MIL interpreter here), so the numerics
of these schemes are checked torch-side and the manifest says so:
- weight schemes: `simulate_weight_compression` applies coremltools' own compress/decompress
  functions (the ones the MLModel pass calls) to the same weights of a BN-folded torch graph
  (weights with > `weight_threshold` elements and rank >= 2, as the Core ML pass selects them,
  rounded to fp16 first as Core ML stores them). fp16 *compute* is not simulated.
- `palette-mixed`: the plan is only known once the MLModel exists, so the torch side is read back
  from the artifact instead: every conv/linear weight of the palettized program (decompressed by
  coremltools from the artifact's own LUTs) is copied into the BN-folded torch graph
  (`program_weights_reference`; matched to the program's ops in order, shapes and the uncompressed
  weights checked). fp16 compute and fp16 biases are not simulated.
- `int8`: the converted pt2e module itself (the q/dq graph Core ML is given), run in PyTorch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from ..errors import UserError
from .configs import (
    COREML_PALETTE_NBITS,
    CoreMLCompression,
    QuantConfig,
    QuantizedModel,
    check_calibration_method,
    check_calibration_source,
    check_keep_float,
    check_positive_int,
    check_threshold,
    register_scheme,
)
from .mixed_precision import MixedPrecisionConfig, check_plan_options
from .pt2e import W8A8Scheme, calibrated_pt2e

TORCH_SIDE_WEIGHTS = ("torch-side simulation: coremltools' own compress/decompress "
                      "(coremltools.optimize.coreml {fn}.blockwise_compress + decompress) applied to the "
                      "fp16-rounded weights of the BN-folded torch graph, evaluated in PyTorch fp32; the .mlpackage "
                      "itself cannot be run on Linux")
TORCH_SIDE_MIXED = ("torch-side: the BN-folded torch graph with every conv/linear weight read back from the "
                    "palettized Core ML program (coremltools decompresses the artifact's own per-layer LUTs), "
                    "evaluated in PyTorch fp32 (fp16 compute and fp16 biases not simulated); the .mlpackage itself "
                    "cannot be run on Linux")
TORCH_SIDE_INT8 = ("torch-side: the converted pt2e q/dq module (CoreMLQuantizer) that Core ML is given, run in "
                   "PyTorch; the .mlpackage itself cannot be run on Linux")


# ----------------------------------------------------------------------------- w8, palette6, palette4

@dataclass(frozen=True)
class CoreMLWeightInt8Config(QuantConfig):
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
        check_threshold(self.weight_threshold)


@dataclass(frozen=True)
class CoreMLPaletteConfig(QuantConfig):
    """Core ML `palette6` / `palette4`: k-means weight palettization, one 2^nbits LUT per tensor
    (`coremltools.optimize.coreml.palettize_weights`; per-tensor LUTs run from iOS 16)."""

    target: ClassVar[str] = "coreml"
    variants: ClassVar[dict[str, dict]] = {"palette6": {"nbits": 6}, "palette4": {"nbits": 4}}

    nbits: int = 6
    weight_threshold: int = 2048

    @property
    def scheme(self) -> str:  # type: ignore[override]
        return f"palette{self.nbits}"

    def __post_init__(self):
        if self.nbits not in COREML_PALETTE_NBITS:
            raise UserError(f"nbits must be one of {', '.join(map(str, COREML_PALETTE_NBITS))}, got {self.nbits!r}")
        check_threshold(self.weight_threshold)


@register_scheme(CoreMLWeightInt8Config)
@register_scheme(CoreMLPaletteConfig)
def _apply_coreml_weights(model, cfg, deploy_cfg, calib, progress, log) -> QuantizedModel:
    if calib is not None and not calib.shipped:
        log(f"quantize: {cfg.scheme} compresses weights only; --calib-data is not used")
    ref, extra = simulate_weight_compression(model, cfg, deploy_cfg, progress=progress)
    fn = "linear_quantize_weights" if isinstance(cfg, CoreMLWeightInt8Config) else "palettize_weights"
    info = {"scheme": cfg.scheme, "target": cfg.target, "method": describe_weights(cfg), "config": cfg.to_dict(),
            "calibration": None, "torch_side": TORCH_SIDE_WEIGHTS.format(fn=fn), "torch_side_weights": extra}
    log(f"quantize: {cfg.scheme} (Core ML weight compression); torch-side simulation compressed "
        f"{extra['weights_compressed']} weight tensors")
    return QuantizedModel(cfg, model, ref, info, compress_mlmodel=partial(compress_weights, cfg=cfg, reference=ref))


# ----------------------------------------------------------------------------- int8 (W8A8)

@dataclass(frozen=True)
class CoreMLInt8Config(QuantConfig):
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
    calibration: str = "minmax"  # minmax | vit
    calib_data: str | None = None  # None: the shipped sample images
    calib_size: int | None = None

    def __post_init__(self):
        kf, _ = check_keep_float(self.keep_float, self.keep_float_auto)
        object.__setattr__(self, "keep_float", kf)
        check_positive_int("calib_batch_size", self.calib_batch_size)
        check_calibration_method(self.calibration)
        check_calibration_source(self)
        if self.minimum_deployment_target not in ("iOS17", "iOS18", "macOS14", "macOS15"):
            raise UserError("minimum_deployment_target must be iOS17 or later (activation quantization), "
                            f"got {self.minimum_deployment_target!r}")


@register_scheme(CoreMLInt8Config)
def _apply_coreml_int8(model, cfg: CoreMLInt8Config, deploy_cfg, calib, progress, log) -> QuantizedModel:
    scheme = W8A8Scheme(coreml_quantizer_factory(cfg), describe_int8(cfg), TORCH_SIDE_INT8)
    return calibrated_pt2e(model, cfg, scheme, deploy_cfg, calib, progress, log)


# ----------------------------------------------------------------------------- palette-mixed

@dataclass(frozen=True)
class CoreMLMixedPaletteConfig(MixedPrecisionConfig, QuantConfig):
    """Core ML `palette-mixed`: per-layer 4/6/8-bit k-means palettes under an average-bits budget.

    A `MixedPrecisionConfig` (the planner's own options: `mixed_precision.plan_mixed_precision`
    takes this config as it is) plus where its calibration images come from. The planner ranks the
    conv/linear weights by a nuclear-norm sensitivity measured on the calibration images (hence
    `calibrated`) and the measured k-means error of each width, and picks the bits per layer that
    minimise the sensitivity-weighted error with sum(size * bits) <= budget_avg_bits * sum(size) over
    the palettized weights (those with more than `weight_threshold` elements; smaller ones stay fp16,
    outside the budget). One LUT per tensor (`palettize_weights` with one `OpPalettizerConfig` per op;
    iOS 16).
    """

    scheme: ClassVar[str] = "palette-mixed"
    target: ClassVar[str] = "coreml"
    calibrated: ClassVar[bool] = True

    calib_batch_size: int = 16
    calib_data: str | None = None  # None: the shipped sample images
    calib_size: int | None = None

    def __post_init__(self):
        choices = (self.choices,) if isinstance(self.choices, int) else tuple(self.choices)
        if not choices or len(set(choices)) != len(choices) or any(
                isinstance(b, bool) or b not in COREML_PALETTE_NBITS for b in choices):
            raise UserError(f"choices must be distinct bit widths from {', '.join(map(str, COREML_PALETTE_NBITS))} "
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
        check_threshold(self.weight_threshold)
        check_positive_int("sensitivity_images", self.sensitivity_images)
        check_plan_options(self)
        check_positive_int("calib_batch_size", self.calib_batch_size)
        check_calibration_source(self)


@register_scheme(CoreMLMixedPaletteConfig)
def _apply_coreml_mixed(model, cfg: CoreMLMixedPaletteConfig, deploy_cfg, calib, progress, log) -> QuantizedModel:
    calib = calib if calib is not None else cfg.calibration_set()
    ref = program_weights_reference(model, deploy_cfg)
    info = {"scheme": cfg.scheme, "target": cfg.target, "method": describe_mixed(cfg), "config": cfg.to_dict(),
            "calibration": {**calib.describe(),
                            "used_for": "per-layer sensitivity (nuclear norms) of the bit allocation"},
            "torch_side": TORCH_SIDE_MIXED}
    # the per-layer plan needs the converted (uncompressed) Core ML program: the export's compress
    # stage calls compress_mlmodel with it and gets the palettized program, a reference holding its
    # weights and the plan (`ref` here stays as it is: it refuses to run without weights)
    compress = partial(compress_mixed_palette, model=model, cfg=cfg, deploy_cfg=deploy_cfg, calib=calib,
                       reference=ref, calibration_info=info["calibration"], progress=progress, log=log)
    log(f"quantize: palette-mixed, budget {cfg.budget_avg_bits:g} average weight bits over "
        f"{'/'.join(map(str, cfg.choices))}-bit palettes; per-layer bits are planned on the converted Core ML program")
    return QuantizedModel(cfg, model, ref, info, compress_mlmodel=compress)


# ----------------------------------------------------------------------------- weight compression

def _op_config(cfg):
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OpPalettizerConfig

    if isinstance(cfg, CoreMLWeightInt8Config):
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity=cfg.granularity,
                                       weight_threshold=cfg.weight_threshold)
    if isinstance(cfg, CoreMLPaletteConfig):
        return OpPalettizerConfig(mode="kmeans", nbits=cfg.nbits, granularity="per_tensor",
                                  weight_threshold=cfg.weight_threshold)
    raise TypeError(f"not a Core ML weight-compression config: {cfg!r}")


def compress_weights(mlmodel, cfg, reference=None) -> CoreMLCompression:
    """w8 / palette6 / palette4: the MLModel compressed with `linear_quantize_weights` /
    `palettize_weights`; `reference` (the torch-side simulation) comes back unchanged."""
    import logging

    from coremltools.optimize.coreml import OptimizationConfig, linear_quantize_weights, palettize_weights

    oc = OptimizationConfig(global_config=_op_config(cfg))
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    if isinstance(cfg, CoreMLWeightInt8Config):
        out = linear_quantize_weights(mlmodel, config=oc)
    else:
        out = palettize_weights(mlmodel, config=oc)
    return CoreMLCompression(_keep_descriptions(mlmodel, out, cfg.scheme), reference)


def compress_mlmodel(mlmodel, cfg):
    """The compressed MLModel (`linear_quantize_weights` / `palettize_weights` with `cfg`)."""
    return compress_weights(mlmodel, cfg).mlmodel


def _keep_descriptions(mlmodel, out, scheme: str):
    """Copy what export.coreml._describe set (descriptions, metadata) onto the compressed `out`."""
    try:
        out.short_description = mlmodel.short_description
        out.version = mlmodel.version
        for k, v in mlmodel.user_defined_metadata.items():
            out.user_defined_metadata[k] = v
        out.user_defined_metadata["mobilevit_deploy.quantization"] = scheme
        for k in ("image",):
            out.input_description[k] = mlmodel.input_description[k]
        for k in ("classLabel", "classLabel_probs"):
            out.output_description[k] = mlmodel.output_description[k]
    except Exception:  # descriptions are cosmetic; never fail an export on them
        pass
    return out


def compressed_const_count(mlmodel) -> dict:
    """{op type: count} of the constexpr (compressed weight) ops in an MLModel's program."""
    spec = mlmodel.get_spec()
    fn = spec.mlProgram.functions["main"]
    out: dict[str, int] = {}
    for op in fn.block_specializations[fn.opset].operations:
        if op.type.startswith("constexpr_"):
            out[op.type] = out.get(op.type, 0) + 1
    return out


def _compress_decompress(w, cfg):
    """One weight tensor through coremltools' compress + decompress (axis 0 = output channels)."""
    import numpy as np
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights, palettize_weights

    a = w.detach().cpu().numpy().astype(np.float16)
    if isinstance(cfg, CoreMLWeightInt8Config):
        blocks = [0] * a.ndim
        if cfg.granularity == "per_channel":
            blocks[0] = 1
        params = linear_quantize_weights.blockwise_compress_by_dtype(a, "int8", "LINEAR_SYMMETRIC", blocks)
        if params is None:
            return None
        dense = linear_quantize_weights.decompress(params)
    else:
        params = palettize_weights.blockwise_compress(a, "KMEANS", cfg.nbits, [0] * a.ndim)
        if params is None:
            return None
        dense = palettize_weights.decompress(params)
    return np.asarray(dense, dtype=np.float32).reshape(a.shape)


def simulate_weight_compression(model, cfg, deploy_cfg, *, progress: bool = True):
    """Torch module with the Core ML weight compression of `cfg` simulated (see module docstring).

    Returns (module, {"weights_compressed": n, "weights_total": n, ...}). `model` is untouched.
    """
    import torch
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_
    from tqdm.auto import tqdm

    from .pt2e import QuantizedGraph, capture_dynamic_batch

    gm = capture_dynamic_batch(model, deploy_cfg)
    _fuse_conv_bn_(gm)  # Core ML's MIL passes fold BN into the conv weights before compression
    gm.graph.eliminate_dead_code()
    gm.recompile()
    targets = []
    for n in gm.graph.nodes:
        if n.op != "get_attr" or not n.users:
            continue
        t = _get_attr(gm, n.target)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            targets.append((n.target, t))
    done, skipped = 0, 0
    with torch.no_grad():
        for _name, t in tqdm(targets, desc=f"simulating {cfg.scheme}", unit="w", disable=not progress, leave=False):
            if t.ndim < 2 or t.numel() <= cfg.weight_threshold:
                skipped += 1
                continue
            dense = _compress_decompress(t, cfg)
            if dense is None:
                skipped += 1
                continue
            t.copy_(torch.from_numpy(dense))
            done += 1
    if done == 0:
        raise UserError(f"{cfg.scheme}: no weight of this model has more than {cfg.weight_threshold} elements; "
                        "nothing would be compressed (lower weight_threshold)")
    # a plain module: verify (macOS) and evaluate call .eval(), which an exported graph refuses
    return QuantizedGraph(gm), {"weights_compressed": done, "weights_left_fp16": skipped}


# ----------------------------------------------------------------------------- mixed-precision palettes

def _reference_cls():
    from torch import nn

    class ProgramWeightsReference(nn.Module):
        """The BN-folded torch graph of the model whose conv/linear weights are replaced by the ones
        of a compressed Core ML program (`load_program_weights`); refuses to run before that."""

        def __init__(self, gm, weight_targets):
            super().__init__()
            self.gm = gm
            self.weight_targets = list(weight_targets)  # get_attr targets of the conv/linear weights, graph order
            self.ready = False

        def train(self, mode: bool = True):  # an exported graph refuses .train() / .eval()
            self.training = False
            return self

        def load_program_weights(self, uncompressed, compressed) -> dict:
            import numpy as np
            import torch

            from .mixed_precision import coreml_op_weights, coreml_weight_ops

            ops = coreml_weight_ops(uncompressed)
            if len(ops) != len(self.weight_targets):
                raise UserError(f"palette-mixed: the Core ML program has {len(ops)} conv/linear ops but the torch "
                                f"graph {len(self.weight_targets)}; cannot read the palettized weights back")
            base, comp = coreml_op_weights(uncompressed), coreml_op_weights(compressed)
            worst = 0.0
            with torch.no_grad():
                for (op, _, shape), tgt in zip(ops, self.weight_targets):
                    t = _get_attr(self.gm, tgt)
                    if tuple(t.shape) != tuple(shape) or op not in comp:
                        raise UserError(f"palette-mixed: Core ML op {op} (weight {tuple(shape)}) does not match torch "
                                        f"weight {tgt} {tuple(t.shape)}")
                    # the program's uncompressed weight is this (BN-folded) torch weight, up to fp16 rounding
                    ref = t.detach().numpy()
                    scale = float(np.abs(ref).max()) or 1.0
                    err = float(np.abs(base[op] - ref).max()) / scale
                    if err > 2e-3:
                        raise UserError(f"palette-mixed: Core ML op {op} does not hold torch weight {tgt} "
                                        f"(max rel. diff {err:.2g}); cannot read the palettized weights back")
                    worst = max(worst, err)
                    t.copy_(torch.from_numpy(comp[op].reshape(t.shape)))
            self.ready = True
            return {"weights_read_back": len(ops), "max_rel_diff_uncompressed_vs_torch": worst}

        def forward(self, x):
            if not self.ready:
                raise RuntimeError("palette-mixed: the torch-side reference gets the palettized weights from the "
                                   "compressed Core ML program; run compress_mlmodel first")
            return self.gm(x)

    return ProgramWeightsReference


_WEIGHT_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default")


def program_weights_reference(model, deploy_cfg):
    """A `ProgramWeightsReference` of `model` (captured with a dynamic batch, BN folded as Core ML's
    MIL passes fold it); see the module docstring."""
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    from .pt2e import capture_dynamic_batch

    gm = capture_dynamic_batch(model, deploy_cfg)
    _fuse_conv_bn_(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    targets = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target) in _WEIGHT_OPS:
            w = n.args[1]
            if getattr(w, "op", None) != "get_attr":
                raise UserError(f"palette-mixed: layer {n.name} has a computed weight; not supported")
            targets.append(w.target)
    return _reference_cls()(gm, targets)


def palettized_bits(mlmodel) -> dict[str, int]:
    """{conv/linear op name: LUT bits} of the ops whose weight comes from a constexpr_lut_to_dense."""
    import math

    from .mixed_precision import iter_coreml_weight_ops

    out = {}
    for op, w in iter_coreml_weight_ops(mlmodel):
        src = w.op
        if src is not None and src.op_type == "constexpr_lut_to_dense":
            lut = src.inputs["lut"]
            entries = lut.shape[0] if lut.rank == 1 else lut.shape[-2]  # iOS16: [2^n]; iOS18: [..., 2^n, vec]
            out[op.name] = int(round(math.log2(int(entries))))
    return out


def _sensitivity_batches(calib, deploy_cfg, cfg, progress) -> tuple[list, int]:
    """The first `cfg.sensitivity_images` calibration images, in batches: (batches, images)."""
    from .calibration import calibration_batches

    batches, n = [], 0
    for b in calibration_batches(calib, deploy_cfg, batch_size=cfg.calib_batch_size, desc="sensitivity",
                                 progress=progress):
        take = min(b.shape[0], cfg.sensitivity_images - n)
        batches.append(b[:take])
        n += take
        if n >= cfg.sensitivity_images:
            break
    return batches, n


def compress_mixed_palette(mlmodel, *, model, cfg: CoreMLMixedPaletteConfig, deploy_cfg, calib, reference,
                           calibration_info: dict, progress: bool = True, log=None) -> CoreMLCompression:
    """palette-mixed on the converted, uncompressed `mlmodel`: plan_mixed_precision with the first
    `cfg.sensitivity_images` calibration images, palettize_weights with the plan's per-op config, and
    a copy of `reference` holding the artifact's weights (read back). Returns the palettized MLModel,
    that reference and the manifest keys `mixed_precision`, `calibration`, `torch_side_weights`."""
    import logging
    import time

    from coremltools.optimize.coreml import palettize_weights

    from .mixed_precision import average_bits, plan_mixed_precision

    log = log or (lambda s: None)
    t = time.perf_counter()
    batches, n = _sensitivity_batches(calib, deploy_cfg, cfg, progress)
    plan = plan_mixed_precision(model, mlmodel, batches, cfg)
    t_plan = time.perf_counter() - t
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    out = _keep_descriptions(mlmodel, palettize_weights(mlmodel, plan.config), cfg.scheme)
    # what the artifact holds: every planned layer palettized with its planned LUT size
    got = palettized_bits(out)
    want = {plan.op_names[k]: b for k, b in plan.bits.items()}
    if got != want:
        bad = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise UserError(f"palette-mixed: the palettized program does not follow the plan (e.g. {bad})")
    loaded = copy.deepcopy(reference)
    read_back = loaded.load_program_weights(mlmodel, out)
    desc = plan.describe()
    mixed = {
        "budget_avg_bits": cfg.budget_avg_bits, "choices": list(cfg.choices), **desc,
        "avg_bits_artifact": round(average_bits({k: got[plan.op_names[k]] for k in plan.bits}, plan.sizes), 3),
        "conv_linear_weights_left_fp16": len(plan.op_names) - len(plan.bits),
        "sensitivity_images": n, "seconds_plan": round(t_plan, 2),
        "seconds_palettize": round(time.perf_counter() - t - t_plan, 2),
        "method": "Liu et al. 2021 Sec. 3.4: nuclear-norm sensitivity x measured k-means error per layer, "
                  "minimised under the budget (multiple-choice knapsack)",
    }
    log(f"quantize: palette-mixed plan: {desc['layers']} weight tensors at {desc['avg_bits']:.2f} average bits "
        f"(budget {cfg.budget_avg_bits:g}), bits histogram {desc['histogram']}; sensitivity on {n} calibration "
        f"images ({t_plan:.1f} s)")
    info = {"mixed_precision": mixed, "calibration": {**calibration_info, "images_seen": n},
            "torch_side_weights": read_back}
    return CoreMLCompression(out, loaded, info)


def _get_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- W8A8 (pt2e)

def coreml_quantizer_factory(cfg: CoreMLInt8Config):
    """`factory(allow)` -> ExecuTorch's CoreMLQuantizer (symmetric int8 per-channel weights, uint8
    activations, min/max observers) whose annotation skips nodes for which `allow(node)` is False."""
    import torch
    from coremltools.optimize.torch.quantization import LinearQuantizerConfig, ModuleLinearQuantizerConfig
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer

    qcfg = LinearQuantizerConfig(global_config=ModuleLinearQuantizerConfig(
        quantization_scheme="symmetric", activation_dtype=torch.quint8, weight_dtype=torch.qint8,
        weight_per_channel=True, activation_observer="min_max", weight_observer="min_max"))

    class _FilteredCoreMLQuantizer(CoreMLQuantizer):
        def __init__(self, config, allow):
            super().__init__(config)
            self._allow = allow

        def annotate(self, model):
            with _fast_pattern_annotation(model):
                return super().annotate(model)

        def _annotate_all_patterns(self, model, quantization_config, filter_fn=None):
            allow = self._allow
            if allow is not None:
                inner = filter_fn
                filter_fn = (lambda n: allow(n) and (inner is None or inner(n)))  # noqa: E731
            return super()._annotate_all_patterns(model, quantization_config, filter_fn)

    def factory(allow=None):
        return _FilteredCoreMLQuantizer(qcfg, allow)

    return factory


# CoreMLQuantizer.annotate traces every candidate pattern with torch.export each time it is called:
# conv 1/2/3-D x 15 activations x in-place or not, linear, add/mul x activations... Measured: ~100 s
# per annotate on an idle 2-core machine (450 s under load), for the 0.2 M-parameter test model as
# for mobilevit_xxs. `_fast_pattern_annotation` makes the result identical and the cost small:
# pattern graphs are built once per process (memoized by their arguments, a copy handed out each
# time), and activation functions
# whose ATen op does not occur in the model's graph are left out of the candidate list (a pattern
# containing an op the graph does not have cannot match anything).
_PATTERN_CACHE: dict = {}
_PATTERN_GETTERS = ("get_conv_pattern", "get_conv_bn_pattern", "get_linear_pattern", "get_linear_bn_pattern",
                    "get_binary_op_act_pattern")


def _act_aten_names():
    import torch.nn.functional as F

    return {F.relu: ("relu",), F.relu6: ("hardtanh", "relu6"), F.leaky_relu: ("leaky_relu",), F.silu: ("silu",),
            F.elu: ("elu",), F.celu: ("celu", "elu"), F.selu: ("selu", "elu"), F.mish: ("mish",),
            F.hardtanh: ("hardtanh",), F.hardswish: ("hardswish",), F.hardsigmoid: ("hardsigmoid",),
            F.gelu: ("gelu",), F.sigmoid: ("sigmoid",), F.logsigmoid: ("log_sigmoid", "logsigmoid"),
            F.tanh: ("tanh",)}


class _fast_pattern_annotation:  # noqa: N801 (a context manager)
    def __init__(self, gm):
        ops = set()
        for n in gm.graph.nodes:
            if n.op == "call_function":
                name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
                ops.add(name.rstrip("_"))
        self.ops = ops

    def __enter__(self):
        from executorch.backends.apple.coreml.quantizer import _coreml_quantizer_utils as u

        self.u = u
        self.saved = {k: getattr(u, k) for k in ("_supported_activations", "_supported_activations_no_inplace",
                                                 *_PATTERN_GETTERS)}
        names = _act_aten_names()

        def present(fn):
            return fn not in names or any(a in self.ops for a in names[fn])

        u._supported_activations = tuple(f for f in self.saved["_supported_activations"] if present(f))
        u._supported_activations_no_inplace = tuple(
            f for f in self.saved["_supported_activations_no_inplace"] if present(f))
        for k in _PATTERN_GETTERS:
            setattr(u, k, self._memo(k, self.saved[k]))
        return self

    @staticmethod
    def _memo(name, fn):
        import copy

        def wrapper(*args, **kwargs):
            key = (name, args, tuple(sorted(kwargs.items())))
            if key not in _PATTERN_CACHE:
                _PATTERN_CACHE[key] = fn(*args, **kwargs)
            return copy.deepcopy(_PATTERN_CACHE[key])  # the matcher rewrites the pattern's output

        return wrapper

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(self.u, k, v)
        return False


def describe_int8(cfg: CoreMLInt8Config) -> str:
    return ("torchao pt2e W8A8 (prepare_pt2e/convert_pt2e) with ExecuTorch's CoreMLQuantizer: int8 symmetric "
            "per-channel weights, uint8 activations (min/max observer), converted to Core ML quantize/dequantize "
            f"ops (minimum deployment target {cfg.minimum_deployment_target})")


def describe_mixed(cfg: CoreMLMixedPaletteConfig) -> str:
    return (f"coremltools.optimize.coreml.palettize_weights with one k-means palette per tensor and per-layer bit "
            f"widths from {', '.join(map(str, cfg.choices))} under a {cfg.budget_avg_bits:g}-bit average budget "
            f"(mixed_precision.plan_mixed_precision; tensors > {cfg.weight_threshold} elements), fp16 activations")


def describe_weights(cfg) -> str:
    if isinstance(cfg, CoreMLWeightInt8Config):
        return ("coremltools.optimize.coreml.linear_quantize_weights: int8 symmetric "
                f"{cfg.granularity.replace('_', '-')} "
                f"weights (tensors > {cfg.weight_threshold} elements), fp16 activations")
    return (f"coremltools.optimize.coreml.palettize_weights: {cfg.nbits}-bit k-means palette, one LUT per tensor "
            f"(tensors > {cfg.weight_threshold} elements), fp16 activations")
