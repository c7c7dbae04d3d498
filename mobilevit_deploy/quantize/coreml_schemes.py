"""Core ML schemes.

- `w8`, `palette6`, `palette4`: weight compression of the converted MLModel with
  `coremltools.optimize.coreml` (`linear_quantize_weights` / `palettize_weights`), applied between
  `export.coreml.convert` and `save`.
- `int8`: W8A8 with ExecuTorch's `CoreMLQuantizer` on the pt2e graph (prepare -> calibrate ->
  convert); the q/dq graph converts to Core ML quantize/dequantize ops (iOS 17 target).

Core ML cannot run on Linux (coremltools ships no runtime or MIL interpreter here), so the numerics
of these schemes are checked torch-side and the manifest says so:
- weight schemes: `simulate_weight_compression` applies coremltools' own compress/decompress
  functions (the ones the MLModel pass calls) to the same weights of a BN-folded torch graph
  (weights with > `weight_threshold` elements and rank >= 2, as the Core ML pass selects them,
  rounded to fp16 first as Core ML stores them). fp16 *compute* is not simulated.
- `int8`: the converted pt2e module itself (the q/dq graph Core ML is given), run in PyTorch.
"""
from __future__ import annotations

from ..errors import UserError
from .configs import CoreMLInt8Config, CoreMLPaletteConfig, CoreMLWeightInt8Config

TORCH_SIDE_WEIGHTS = ("torch-side simulation: coremltools' own compress/decompress "
                      "(coremltools.optimize.coreml {fn}.blockwise_compress + decompress) applied to the "
                      "fp16-rounded weights of the BN-folded torch graph, evaluated in PyTorch fp32; the .mlpackage "
                      "itself cannot be run on Linux")
TORCH_SIDE_INT8 = ("torch-side: the converted pt2e q/dq module (CoreMLQuantizer) that Core ML is given, run in "
                   "PyTorch; the .mlpackage itself cannot be run on Linux")


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


def compress_mlmodel(mlmodel, cfg):
    """The compressed MLModel (`linear_quantize_weights` / `palettize_weights` with `cfg`)."""
    import logging

    from coremltools.optimize.coreml import OptimizationConfig, linear_quantize_weights, palettize_weights

    oc = OptimizationConfig(global_config=_op_config(cfg))
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    if isinstance(cfg, CoreMLWeightInt8Config):
        out = linear_quantize_weights(mlmodel, config=oc)
    else:
        out = palettize_weights(mlmodel, config=oc)
    # keep what export.coreml._describe set (descriptions, metadata)
    try:
        out.short_description = mlmodel.short_description
        out.version = mlmodel.version
        for k, v in mlmodel.user_defined_metadata.items():
            out.user_defined_metadata[k] = v
        out.user_defined_metadata["mobilevit_deploy.quantization"] = cfg.scheme
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

    from ._pt2e import capture_dynamic_batch

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
        for name, t in tqdm(targets, desc=f"simulating {cfg.scheme}", unit="w", disable=not progress, leave=False):
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
    return gm, {"weights_compressed": done, "weights_left_fp16": skipped}


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


def describe_weights(cfg) -> str:
    if isinstance(cfg, CoreMLWeightInt8Config):
        return (f"coremltools.optimize.coreml.linear_quantize_weights: int8 symmetric {cfg.granularity.replace('_', '-')} "
                f"weights (tensors > {cfg.weight_threshold} elements), fp16 activations")
    return (f"coremltools.optimize.coreml.palettize_weights: {cfg.nbits}-bit k-means palette, one LUT per tensor "
            f"(tensors > {cfg.weight_threshold} elements), fp16 activations")
