"""ViT-aware post-training quantization (Liu et al., "Post-Training Quantization for Vision
Transformer", NeurIPS 2021) as a calibration method of the pt2e PTQ stage.

Where it sits in the pt2e flow::

    prepared = prepare_pt2e(exported, quantizer)      # XNNPACKQuantizer / CoreMLQuantizer
    for x in calib_batches: prepared(x)               # the usual observation pass (min/max, histogram)
    apply_vit_calibration(prepared, calib_batches, VitPTQConfig())   # <- this module
    converted = convert_pt2e(prepared)                # q/dq nodes carry the searched scales

What it does, per quantized layer (every `conv2d` / `linear` / `bmm` / `matmul` node whose inputs
pass through pt2e observers), in graph order:

1. Similarity-aware step search (paper Sec. 3.2). The quantization step of the layer's weight and of
   each activation input is searched on a grid `alpha * step_minmax`, alpha in `cfg.alpha_range`
   (paper: [0.5, 1.2]), plus the observer's own choice (e.g. the HistogramObserver step), to maximise
   the Pearson correlation between the full-precision layer output O and the output O^ of the layer
   fed with quantized inputs. Weight and activation steps are searched alternately (`cfg.rounds`).
   Per-channel weight observers keep their per-channel shape: the searched alpha scales every
   channel's min/max step (`weight_granularity="tensor"`, the paper's per-layer step), or each
   output channel gets its own alpha maximising the correlation of that output channel
   (`"channel"`; conv/linear only, where output channel c depends only on weight row c).
2. Ranking-aware loss for attention (paper Sec. 3.3). For a matmul whose output feeds a softmax (the
   attention scores), the objective is `pearson - gamma * ranking_loss`, a hinge penalty on pairs of
   scores in one softmax row whose order flips after quantization (`ranking_loss`).
3. Bias correction (paper Sec. 3.2, "bias correction"): E[O^] - E[O] per output channel, measured
   on the search images with the searched steps, is subtracted from the layer's float bias.
   Lowerings do not take a separate correction term, so it is folded into the float bias before
   convert_pt2e: the XNNPACK config keeps the bias in float (the delegate packs it), a quantizer with
   an int32 bias spec quantizes the corrected bias with the derived act*weight scale. A conv/linear
   without a bias gets one (a new parameter). The graph's biases are rewritten at the end; during
   the search the corrections only enter the simulated quantized path, so the float reference is
   never shifted.

How the searched steps reach the artifact: every searched observer instance is replaced (under all
the module names that share it) by a `SearchedQParamsObserver` whose `calculate_qparams()` returns
the searched (scale, zero_point) with the original dtype / qscheme / quant range / ch_axis.
`convert_pt2e` reads exactly that method to build the quantize/dequantize nodes (and folds the
quantized weights), so the exported `.pte` / Core ML program holds the searched scales. Derived
observers (e.g. an int32 bias spec) are re-pointed to the replacement instances.

Layer inputs (`cfg.inputs`): the reference O always comes from the float model. The quantized
output O^ is computed either from the layer's inputs as the model *quantized so far* produces them
(`"quantized"`, default: layers are calibrated in graph order, every observer already fake-quantizes
with its final -- searched or the quantizer's own -- qparams, earlier bias corrections included, so
a layer's search and bias correction also compensate the error accumulated upstream; this is what
`simulate_converted` / convert_pt2e compute), or from the float inputs (`"fp"`, each layer
independently). Both are measured in benchmarks/vit_ptq.md.

Design choices and limits (documented, not hidden):
- An observer instance is shared by every edge pt2e attached it to (e.g. a qkv linear's output and
  the q/k/v slices that feed the attention matmuls). It is searched once, by the first layer (in
  graph order) that consumes it; later consumers see it fixed.
- Only layers whose inputs are observed are touched; the rest of the observers (adds, pools, cats,
  ...) keep the quantizer's own calibration.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..errors import UserError

__all__ = [
    "VitPTQConfig",
    "apply_vit_calibration",
    "SearchedQParamsObserver",  # noqa: F822  (built on first use: the module's __getattr__)
    "find_quant_layers",
    "QuantLayer",
    "fake_quant",
    "pearson",
    "ranking_loss",
    "search_step",
    "search_grid",
    "minmax_qparams",
    "replace_observers_with_minmax",
    "simulate_converted",
]

_LAYER_OPS = {
    "aten.conv1d.default": "conv",
    "aten.conv2d.default": "conv",
    "aten.conv3d.default": "conv",
    "aten.linear.default": "linear",
    "aten.bmm.default": "matmul",
    "aten.matmul.default": "matmul",
    "aten.mm.default": "matmul",
}
# ops between a matmul and the softmax that keep the attention scores' per-row order information
_SCORE_PASSTHROUGH = {"aten.mul.Tensor", "aten.div.Tensor", "aten.add.Tensor", "aten.reshape.default",
                      "aten.view.default", "aten._unsafe_view.default"}


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class VitPTQConfig:
    """Settings of the ViT-aware search. Defaults follow the paper where it gives a value
    (search range [0.5, 1.2] x min/max step, alternating search, gamma=0.1); the grid and the
    number of search images are smaller than the paper's 100 candidates to keep CPU time low."""

    alpha_range: tuple[float, float] = (0.5, 1.2)  # grid of steps: alpha * min/max step
    n_candidates: int = 36                           # grid points (paper: 100)
    rounds: int = 2                                  # alternating weight / activation rounds
    coarse_stride: int = 4                           # >1: evaluate every k-th grid point, then the
                                                     # neighbours of the best (same grid, ~1/3 of the cost)
    search_weights: bool = True
    search_activations: bool = True
    weight_granularity: str = "tensor"               # "tensor": one alpha per layer; "channel": one per output channel
    ranking_gamma: float = 0.1                       # weight of the attention ranking loss (0 disables it)
    ranking_margin: float = 0.0                      # hinge margin (0: penalise only order flips)
    ranking_max_rows: int = 1024                     # softmax rows sampled for the ranking loss
    ranking_max_cols: int = 64                       # columns sampled per row (pairs = cols^2 / 2)
    bias_correction: bool = True
    inputs: str = "quantized"                        # layer inputs for the search: "quantized" (from the model
                                                     # quantized so far, sequentially) or "fp" (float model)
    search_images: int = 64                          # calibration images used by the search (first N)
    layer_kinds: tuple[str, ...] = ("conv", "linear", "matmul")
    max_elements: int = 500_000                      # per layer: inputs/outputs sliced (leading dim) to about this size
    capture_mb: float = 768.0                        # activation memory per capture pass
    seed: int = 0

    def __post_init__(self):
        lo, hi = self.alpha_range
        if not (0 < lo < hi):
            raise UserError(f"alpha_range must be 0 < low < high, got {self.alpha_range}")
        if self.n_candidates < 2:
            raise UserError(f"n_candidates must be >= 2, got {self.n_candidates}")
        if self.coarse_stride < 1:
            raise UserError(f"coarse_stride must be >= 1, got {self.coarse_stride}")
        if self.rounds < 1:
            raise UserError(f"rounds must be >= 1, got {self.rounds}")
        if self.weight_granularity not in ("tensor", "channel"):
            raise UserError(f"weight_granularity must be 'tensor' or 'channel', got {self.weight_granularity!r}")
        if self.ranking_gamma < 0 or self.ranking_margin < 0:
            raise UserError("ranking_gamma and ranking_margin must be >= 0")
        if self.inputs not in ("quantized", "fp"):
            raise UserError(f"inputs must be 'quantized' or 'fp', got {self.inputs!r}")
        if self.max_elements < 1:
            raise UserError(f"max_elements must be >= 1, got {self.max_elements}")
        if self.search_images < 1:
            raise UserError(f"search_images must be >= 1, got {self.search_images}")
        bad = set(self.layer_kinds) - {"conv", "linear", "matmul"}
        if bad or not self.layer_kinds:
            raise UserError(f"layer_kinds must be a non-empty subset of conv, linear, matmul, got {self.layer_kinds}")
        if not (self.search_weights or self.search_activations or self.bias_correction):
            raise UserError("nothing to do: search_weights, search_activations and bias_correction are all off")

    def alphas(self) -> torch.Tensor:
        return torch.linspace(self.alpha_range[0], self.alpha_range[1], self.n_candidates, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# math pieces (unit-tested on synthetic tensors)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
               axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize `x` exactly like quantized_decomposed.quantize_per_tensor/_per_channel
    (round(x * (1 / scale)) half to even, + zero point, clamp to [quant_min, quant_max]); `axis` set ->
    per-channel along it. Uses torch's fused fake-quantize kernels (one pass over `x`)."""
    x = x.float()
    if axis is not None:
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        zp = torch.as_tensor(zero_point).reshape(-1).to(torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), int(quant_min), int(quant_max))
    scale = float(torch.as_tensor(scale).reshape(-1)[0])
    zp = int(torch.as_tensor(zero_point).reshape(-1)[0])
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, int(quant_min), int(quant_max))


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Pearson correlation of `a` and `b` over all elements (dim=None) or per slice along all dims
    but `dim` (returns a vector of length a.shape[dim]). Computed in float64."""
    a = a.double()
    b = b.double()
    if dim is None:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    else:
        a, b = a.movedim(dim, 0).reshape(a.shape[dim], -1), b.movedim(dim, 0).reshape(b.shape[dim], -1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    num = (a * b).sum(1)
    den = torch.sqrt((a * a).sum(1) * (b * b).sum(1))
    r = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return r[0] if dim is None else r


class _PearsonRef:
    """Pearson correlation of many candidate outputs against one fixed reference, without float64
    copies: with r_c = ref - mean(ref) and e = out - ref,
        corr = (S_rr + S_re) / sqrt(S_rr * (S_rr + 2 S_re + S_ee)),
    S_rr = sum r_c^2, S_re = sum r_c e, S_ee = sum (e - mean e)^2 -- the candidate-dependent sums
    are sums of the (small) quantization error, so float32 reductions keep the differences exact
    enough to rank candidates that differ in the 6th digit."""

    def __init__(self, ref: torch.Tensor, dim: int | None = None):
        self.ref = ref.float()
        self.dims = None if dim is None else [d for d in range(ref.dim()) if d != dim]
        self.rc = self.ref - (self.ref.mean() if dim is None else self.ref.mean(self.dims, keepdim=True))
        self.srr = self._sum(self.rc * self.rc)
        self.n = ref.numel() if dim is None else ref.numel() // ref.shape[dim]

    def _sum(self, t):
        return (t.sum() if self.dims is None else t.sum(self.dims)).double()

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        e = out.float() - self.ref
        sre = self._sum(self.rc * e)
        se = self._sum(e)
        see = (self._sum(e * e) - se * se / self.n).clamp_min(0)
        den = torch.sqrt(self.srr * (self.srr + 2 * sre + see).clamp_min(0))
        return torch.where(den > 0, (self.srr + sre) / den.clamp_min(1e-300), torch.zeros_like(den))


def ranking_loss(ref: torch.Tensor, test: torch.Tensor, margin: float = 0.0, max_rows: int | None = None,
                 max_cols: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pairwise ranking loss of the paper (Eq. 9): for every row (last dim = the softmax dim) and every
    pair i < j, hinge(margin - (t_i - t_j) * sign(r_i - r_j)) with hinge(p) = max(p, 0), i.e. a penalty
    when the quantized scores `test` do not keep the order of the full-precision scores `ref`.

    With margin 0 the loss is exactly 0 for every order-preserving perturbation and > 0 as soon as
    one pair flips. Pairs tied in `ref` are ignored. The sum is divided by the number of ordered
    pairs and by the mean |r_i - r_j| of the row set, so the value does not depend on the scale of
    the scores (a flip by a fraction f of the typical gap costs ~f). Rows/cols may be subsampled.
    """
    if ref.shape != test.shape:
        raise UserError(f"ranking_loss: shapes differ {tuple(ref.shape)} vs {tuple(test.shape)}")
    m = ref.shape[-1]
    r = ref.reshape(-1, m).float()
    t = test.reshape(-1, m).float()
    if max_rows is not None and r.shape[0] > max_rows:
        idx = torch.randperm(r.shape[0], generator=generator)[:max_rows]
        r, t = r[idx], t[idx]
    if max_cols is not None and m > max_cols:
        idx = torch.randperm(m, generator=generator)[:max_cols]
        r, t = r[:, idx], t[:, idx]
    dr = r.unsqueeze(2) - r.unsqueeze(1)  # [rows, m, m], r_i - r_j
    dt = t.unsqueeze(2) - t.unsqueeze(1)
    sgn = torch.sign(dr)
    valid = sgn != 0
    n_pairs = valid.sum()
    if n_pairs == 0:
        return torch.zeros((), dtype=torch.float64)
    norm = dr.abs().sum().double() / n_pairs
    hinge = torch.clamp(float(margin * norm) - dt * sgn, min=0.0) * valid
    return hinge.sum().double() / n_pairs / norm


def search_step(objective: Callable[[int], float], n: int) -> tuple[int, list[float]]:
    """Index of the candidate (0..n-1) maximising `objective`; ties go to the first. Returns (best, scores)."""
    scores = [float(objective(i)) for i in range(n)]
    best = max(range(n), key=lambda i: (scores[i], -i))
    return best, scores


def search_grid(objective: Callable[[int], float], n: int, stride: int = 1,
                extra: Sequence[int] = ()) -> tuple[int, dict]:
    """Maximise `objective` over grid indices 0..n-1 (plus `extra` indices, always evaluated):
    stride 1 evaluates every point; stride k evaluates every k-th point (and the last), then every
    point within k-1 of the best one. Returns (best index, {index: score})."""
    scores: dict[int, float] = {}

    def ev(i):
        if i not in scores:
            scores[i] = float(objective(i))

    coarse = list(range(0, n, max(stride, 1)))
    if coarse[-1] != n - 1:
        coarse.append(n - 1)
    for i in list(coarse) + list(extra):
        ev(i)
    if stride > 1:
        grid_best = max((i for i in scores if i < n), key=lambda i: (scores[i], -i))
        for i in range(max(0, grid_best - stride + 1), min(n, grid_best + stride)):
            ev(i)
    best = max(scores, key=lambda i: (scores[i], -i))
    return best, scores


# --------------------------------------------------------------------------------------------------
# the observer that carries searched qparams into convert_pt2e


def _observer_base():
    from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase

    return UniformQuantizationObserverBase


def _make_searched_observer_class():
    Base = _observer_base()

    class SearchedQParamsObserver(Base):
        """pt2e observer with fixed, searched qparams: identity in forward, `calculate_qparams()`
        returns (scale, zero_point). Keeps the replaced observer's dtype, qscheme, quant range,
        ch_axis and eps, so convert_pt2e emits the same q/dq op kind with the searched values."""

        def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, *, dtype, qscheme, quant_min, quant_max,
                     ch_axis: int = 0, eps: float = torch.finfo(torch.float32).eps, is_dynamic: bool = False):
            super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, eps=eps,
                             is_dynamic=is_dynamic)
            self.ch_axis = ch_axis
            self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(-1).clone())
            self.register_buffer("zero_point", torch.as_tensor(zero_point).reshape(-1).to(torch.int64).clone())

        def forward(self, x):
            return x

        def calculate_qparams(self):
            return self.scale.clone(), self.zero_point.clone()

        def extra_repr(self):
            s = self.scale
            scale = s.tolist() if s.numel() <= 4 else f"[{s.numel()} ch]"
            return (f"dtype={self.dtype}, qscheme={self.qscheme}, scale={scale}"
                    f", zero_point={self.zero_point.tolist() if s.numel() <= 4 else '...'}")

    SearchedQParamsObserver.__module__ = __name__
    SearchedQParamsObserver.__qualname__ = "SearchedQParamsObserver"
    return SearchedQParamsObserver


_SEARCHED_CLS = None


def _searched_cls():
    """The SearchedQParamsObserver class, built on first use (torchao is imported lazily); the module
    `__getattr__` exposes it as `vit_ptq.SearchedQParamsObserver`, so it pickles by name."""
    global _SEARCHED_CLS
    if _SEARCHED_CLS is None:
        _SEARCHED_CLS = _make_searched_observer_class()
    return _SEARCHED_CLS


def __getattr__(name):
    if name == "SearchedQParamsObserver":
        return _searched_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")




def _is_observer(mod) -> bool:
    """A pt2e observer or fake-quantize module (ExecuTorch's CoreMLQuantizer inserts FakeQuantize)."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.observer import ObserverBase

    return isinstance(mod, (ObserverBase, FakeQuantizeBase))


def _range_source(mod):
    """The module that holds min_val / max_val: the observer itself, or a FakeQuantize's observer."""
    inner = getattr(mod, "activation_post_process", None)
    return inner if inner is not None and hasattr(inner, "min_val") else mod


# --------------------------------------------------------------------------------------------------
# qparam variables (one per observer instance)


def _is_per_channel(qscheme) -> bool:
    return qscheme in (torch.per_channel_symmetric, torch.per_channel_affine, torch.per_channel_affine_float_qparams)


def _is_symmetric(qscheme) -> bool:
    return qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def minmax_qparams(obs, min_val: torch.Tensor, max_val: torch.Tensor, alpha=1.0):
    """(scale, zero_point) of `obs`'s scheme for the range [min_val, max_val] with the step scaled by
    `alpha` (scalar or per-channel tensor); the zero point of the min/max range is kept, so a step
    change clips both ends proportionally. Same formulas as the observers' `_calculate_qparams`."""
    qmin, qmax = int(obs.quant_min), int(obs.quant_max)
    eps = float(getattr(_range_source(obs), "eps", torch.finfo(torch.float32).eps))
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))
    if _is_symmetric(obs.qscheme):
        amax = torch.maximum(-min_neg, max_pos)
        scale = amax / (float(qmax - qmin) / 2)
        scale = torch.clamp(scale * alpha, min=eps)
        if obs.dtype in (torch.quint8, torch.uint8):
            zp = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int64)
        else:
            zp = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale0 = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=eps)
        zp = torch.clamp(qmin - torch.round(min_neg / scale0), qmin, qmax).to(torch.int64)
        scale = torch.clamp(scale0 * alpha, min=eps)
    return scale.reshape(-1), zp.reshape(-1)


@dataclass
class _QVar:
    """A searchable quantization parameter set: one observer instance (possibly under several names)."""

    key: int
    names: list[str]
    obs: object
    is_weight: bool
    min_val: torch.Tensor | None = None
    max_val: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # current (baseline, then searched)
    zero_point: torch.Tensor | None = None
    base_scale: torch.Tensor | None = None
    base_zero_point: torch.Tensor | None = None
    alpha: object = None  # chosen alpha (float / list) or "observer"
    searched: bool = False
    owner: str | None = None

    @property
    def axis(self):
        return int(self.obs.ch_axis) if _is_per_channel(self.obs.qscheme) else None

    def fq(self, x, scale=None, zero_point=None):
        scale = self.scale if scale is None else scale
        zero_point = self.zero_point if zero_point is None else zero_point
        return fake_quant(x, scale, zero_point,
                          int(self.obs.quant_min), int(self.obs.quant_max), self.axis)


def _qvar_from_observer(key, names, obs, is_weight, value_for_range=None) -> _QVar | None:
    if getattr(obs, "is_dynamic", False) or not hasattr(obs, "quant_min") or obs.dtype not in (
            torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.int16, torch.uint16):
        return None
    try:
        scale, zp = obs.calculate_qparams()
    except Exception:  # an observer that never saw data, or a kind we do not handle
        return None
    v = _QVar(key=key, names=names, obs=obs, is_weight=is_weight)
    v.base_scale, v.base_zero_point = scale.detach().float().reshape(-1), zp.detach().reshape(-1).to(torch.int64)
    v.scale, v.zero_point = v.base_scale.clone(), v.base_zero_point.clone()
    src = _range_source(obs)
    mn, mx = getattr(src, "min_val", None), getattr(src, "max_val", None)
    if mn is None or mn.numel() == 0 or not torch.isfinite(mn).all():
        if value_for_range is None:
            return None
        axis = v.axis
        if axis is None:
            mn, mx = value_for_range.min(), value_for_range.max()
        else:
            flat = value_for_range.movedim(axis, 0).reshape(value_for_range.shape[axis], -1)
            mn, mx = flat.min(1).values, flat.max(1).values
    v.min_val, v.max_val = mn.detach().float().clone(), mx.detach().float().clone()
    return v


# --------------------------------------------------------------------------------------------------
# graph analysis


@dataclass
class QuantLayer:
    """A quantized conv/linear/matmul node of a prepared pt2e graph."""

    node: object  # torch.fx.Node
    kind: str  # conv | linear | matmul
    name: str  # readable: module path (+ node name for matmuls)
    arg_obs: dict[int, object] = field(default_factory=dict)  # arg index -> observer fx.Node
    weight_arg: int | None = None  # arg index whose observer sees a constant (get_attr)
    bias_node: object = None  # get_attr node of the float bias (conv/linear) or None
    attention_scores: bool = False  # output feeds a softmax

    @property
    def weight_name(self) -> str | None:
        if self.weight_arg is None:
            return None
        src = self.arg_obs[self.weight_arg].args[0]
        return str(src.target) if getattr(src, "op", None) == "get_attr" else None


def _op_name(node) -> str:
    return str(node.target)


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return str(path).replace("L['self'].", "").replace("L__self___", "")
    return node.name


def _feeds_softmax(node, hops: int = 4) -> bool:
    frontier = [node]
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for u in n.users:
                t = _op_name(u)
                if "softmax" in t:
                    return True
                if u.op == "call_function" and t in _SCORE_PASSTHROUGH:
                    nxt.append(u)
        frontier = nxt
    return False


def find_quant_layers(gm, kinds: Sequence[str] = ("conv", "linear", "matmul")) -> list[QuantLayer]:
    """The conv/linear/matmul nodes of a prepared (observed) pt2e GraphModule that have at least one
    observed input, in graph order."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        kind = _LAYER_OPS.get(_op_name(node))
        if kind is None or kind not in kinds:
            continue
        arg_obs = {}
        for i, a in enumerate(node.args[:2]):
            if getattr(a, "op", None) == "call_module" and _is_observer(modules.get(a.target)):
                arg_obs[i] = a
        if not arg_obs:
            continue
        weight_arg = None
        for i, a in arg_obs.items():
            if getattr(a.args[0], "op", None) == "get_attr":
                weight_arg = i
        bias_node = None
        if kind in ("conv", "linear") and len(node.args) > 2:
            b = node.args[2]
            if getattr(b, "op", None) == "call_module" and _is_observer(modules.get(b.target)):
                b = b.args[0]  # a quantized (e.g. int32 derived) bias: correct its float source
            if getattr(b, "op", None) == "get_attr":
                bias_node = b
        name = _module_path(node)
        if kind == "matmul":
            name = f"{name}:{node.name}"
        layers.append(QuantLayer(node=node, kind=kind, name=name, arg_obs=arg_obs, weight_arg=weight_arg,
                                 bias_node=bias_node, attention_scores=kind == "matmul" and _feeds_softmax(node)))
    return layers


# --------------------------------------------------------------------------------------------------
# capturing full-precision values with the observers bypassed


class _Stop(Exception):
    pass


def _capture(gm, batches: list[torch.Tensor], wanted: set, fq: Callable | None = None,
             bias_override: dict | None = None, out_shift: dict | None = None) -> dict:
    """{node: [value per batch]} for the `wanted` nodes; for an observer node, the value *entering*
    the observer. Observers are skipped (identity, so histogram observers do not update), or, with
    `fq(observer_name, x)`, replaced by that fake-quantization (the converted model's numerics).
    `bias_override`: {get_attr target: tensor} (corrected biases); `out_shift`: {node: tensor to
    add to its output} (biases added to layers that had none). Stops each pass after the last node."""
    import torch.fx as fx

    modules = dict(gm.named_modules(remove_duplicate=False))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max((order[n] for n in wanted), default=-1)
    out = {n: [] for n in wanted}
    bias_override = bias_override or {}
    out_shift = out_shift or {}

    class _Interp(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            if _is_observer(modules.get(target)):
                return fq(target, args[0]) if fq is not None else args[0]
            return super().call_module(target, args, kwargs)

        def fetch_attr(self, target):
            if target in bias_override:
                return bias_override[target]
            return super().fetch_attr(target)

        def run_node(self, n):
            r = super().run_node(n)
            if n in out_shift:
                r = r + out_shift[n]
            if n in out:
                v = r
                if n.op == "call_module" and _is_observer(modules.get(n.target)):
                    v = self.env[n.args[0]]
                out[n].append(v.detach() if isinstance(v, torch.Tensor) else v)
            if order[n] >= last:
                raise _Stop
            return r

    with torch.no_grad():
        for x in batches:
            try:
                _Interp(gm).run(x)
            except _Stop:
                pass
    return out


def _observer_fake_quant(obs, x, qparams=None):
    """x quantize-dequantized with `obs`'s qparams (or `qparams`), as convert_pt2e's q/dq pair does;
    unchanged for observers convert_pt2e does not turn into int q/dq (float / dynamic)."""
    if getattr(obs, "is_dynamic", False) or not hasattr(obs, "quant_min") or obs.dtype not in (
            torch.int8, torch.uint8, torch.qint8, torch.quint8):
        return x
    scale, zp = qparams if qparams is not None else obs.calculate_qparams()
    axis = int(obs.ch_axis) if _is_per_channel(obs.qscheme) else None
    return fake_quant(x, scale, zp, int(obs.quant_min), int(obs.quant_max), axis)


def simulate_converted(prepared_model, x: torch.Tensor) -> torch.Tensor:
    """Run a prepared (calibrated) pt2e graph with every observer replaced by the fake quantization
    convert_pt2e would insert for it (observers are not updated). Used to check that the
    sequential search sees the numerics of the converted model."""
    modules = dict(prepared_model.named_modules(remove_duplicate=False))
    cache = {}

    def fq(name, t):
        obs = modules[name]
        if id(obs) not in cache:
            try:
                cache[id(obs)] = obs.calculate_qparams()
            except Exception:
                cache[id(obs)] = None
        return t if cache[id(obs)] is None else _observer_fake_quant(obs, t, cache[id(obs)])

    out_node = next(iter(prepared_model.graph.find_nodes(op="output")))
    srcs = [a for a in torch.utils._pytree.tree_leaves(out_node.args) if hasattr(a, "op")]
    cap = _capture(prepared_model, [x], set(srcs), fq=fq)
    # _capture records the value entering an observer node; the output leaves through its q/dq
    vals = [fq(n.target, cap[n][0]) if n.op == "call_module" and _is_observer(modules.get(n.target)) else cap[n][0]
            for n in srcs]
    return vals[0] if len(vals) == 1 else vals


def _is_const_node(node, modules) -> bool:
    """A get_attr, or an observer of one (a weight / bias): the same value for every batch."""
    if node.op == "get_attr":
        return True
    return (node.op == "call_module" and _is_observer(modules.get(node.target))
            and getattr(node.args[0], "op", None) == "get_attr")


def _get_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------------
# the search


def _materialize_batches(calib_batches, n_images: int) -> list[torch.Tensor]:
    if isinstance(calib_batches, torch.Tensor):
        calib_batches = [calib_batches]
    out, n = [], 0
    for b in calib_batches:
        if isinstance(b, (tuple, list)):
            b = b[0]
        if not isinstance(b, torch.Tensor) or b.dim() < 1:
            raise UserError("calibration batches must be tensors [N, C, H, W] (or (tensor, ...) tuples), "
                            f"got {type(b).__name__}")
        if not torch.isfinite(b).all():
            raise UserError("calibration batch contains NaN or Inf")
        take = min(b.shape[0], n_images - n)
        out.append(b[:take])
        n += take
        if n >= n_images:
            break
    if n == 0:
        raise UserError("no calibration images: calib_batches is empty")
    return out


def _node_bytes(node, per_image: float) -> float:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return v.numel() * 4 * per_image
    return 1e6 * per_image


class _LayerEval:
    """Evaluates one layer on its captured full-precision inputs with chosen qparams."""

    def __init__(self, layer: QuantLayer, values: dict, qvars: dict, cfg: VitPTQConfig, gen: torch.Generator,
                 ref_values: dict | None = None):
        self.layer, self.cfg = layer, cfg
        self.node = layer.node
        self.values = values  # arg index -> input tensor (activations: batches concatenated)
        self.qvars = qvars  # arg index -> _QVar (observed inputs only)
        self.ref = self._run(dict(ref_values if ref_values is not None else values))  # full-precision output
        self._corr = _PearsonRef(self.ref)
        self._corr_ch = None
        self.cur = {i: (qvars[i].fq(t) if qvars.get(i) is not None else t) for i, t in values.items()}
        if layer.attention_scores and cfg.ranking_gamma > 0:
            m = self.ref.shape[-1]
            self.rank_rows = torch.randperm(self.ref.reshape(-1, m).shape[0], generator=gen)[:cfg.ranking_max_rows]
            self.rank_cols = torch.randperm(m, generator=gen)[:cfg.ranking_max_cols]
        else:
            self.rank_rows = None

    def _run(self, tensors: dict) -> torch.Tensor:
        args = list(self.node.args)
        for i, t in tensors.items():
            args[i] = t
        with torch.no_grad():
            return self.node.target(*args, **self.node.kwargs)

    def current_output(self) -> torch.Tensor:
        return self._run(dict(self.cur))

    def objective(self, out: torch.Tensor, per_channel_dim: int | None = None):
        if per_channel_dim is not None:
            if self._corr_ch is None:
                self._corr_ch = _PearsonRef(self.ref, per_channel_dim)
            return self._corr_ch(out)
        score = self._corr(out)
        if self.rank_rows is not None:
            m = self.ref.shape[-1]
            r = self.ref.reshape(-1, m)[self.rank_rows][:, self.rank_cols]
            t = out.reshape(-1, m)[self.rank_rows][:, self.rank_cols]
            score = score - self.cfg.ranking_gamma * ranking_loss(r, t, self.cfg.ranking_margin)
        return score

    def with_input(self, i, t) -> torch.Tensor:
        d = dict(self.cur)
        d[i] = t
        return self._run(d)


def _out_channel_dim(kind: str, out: torch.Tensor) -> int:
    return 1 if kind == "conv" else out.dim() - 1


def _search_var(ev: _LayerEval, i: int, v: _QVar, cfg: VitPTQConfig) -> tuple[object, float]:
    """Search the step of input `i` (variable `v`) with the other inputs fixed. Returns (alpha, score)."""
    x = ev.values[i]
    alphas = cfg.alphas()
    cands = [minmax_qparams(v.obs, v.min_val, v.max_val, float(a)) for a in alphas]
    labels: list[object] = [round(float(a), 4) for a in alphas]
    cands.append((v.base_scale, v.base_zero_point))  # the quantizer's own choice (min/max or histogram)
    labels.append("observer")
    per_channel = (v.is_weight and cfg.weight_granularity == "channel" and v.axis == 0
                   and ev.layer.kind in ("conv", "linear") and v.base_scale.numel() > 1)
    if per_channel:
        ch_dim = _out_channel_dim(ev.layer.kind, ev.ref)
        scores = torch.stack([ev.objective(ev.with_input(i, v.fq(x, s, z)), per_channel_dim=ch_dim) for s, z in cands])
        best = scores.argmax(0)  # [C_out]
        scale = torch.stack([c[0] for c in cands])[best, torch.arange(best.numel())]
        zp = torch.stack([c[1] for c in cands])[best, torch.arange(best.numel())]
        v.scale, v.zero_point = scale, zp
        ev.cur[i] = v.fq(x)
        chosen = [labels[int(b)] for b in best]
        return chosen, float(ev.objective(ev.with_input(i, ev.cur[i])))
    n_grid = len(cands) - 1
    best, scores = search_grid(lambda k: ev.objective(ev.with_input(i, v.fq(x, *cands[k]))), n_grid,
                               cfg.coarse_stride, extra=(n_grid,))
    v.scale, v.zero_point = cands[best]
    ev.cur[i] = v.fq(x)
    return labels[best], scores[best]


def _rebatch(gm, calib_batches, n_images: int) -> tuple[list[torch.Tensor], int]:
    """The first `n_images` calibration images as batches the graph runs: (batches, example batch).
    An export with a static batch size only runs batches of that size, so they are re-batched to it."""
    batches = _materialize_batches(calib_batches, n_images)
    ph = next(iter(gm.graph.find_nodes(op="placeholder")), None)
    ph_val = ph.meta.get("val") if ph is not None else None
    ex_batch = ph_val.shape[0] if isinstance(ph_val, torch.Tensor) and ph_val.dim() > 0 else None
    if not isinstance(ex_batch, int):
        return batches, 1
    allx = torch.cat(batches, 0)
    n_full = allx.shape[0] // ex_batch * ex_batch
    if n_full == 0:
        raise UserError(f"the graph was exported with batch size {ex_batch}; give at least {ex_batch} "
                        "calibration images")
    return list(allx[:n_full].split(ex_batch)), ex_batch


def _capture_chunks(layers: list[QuantLayer], modules: dict, per_image: float, capture_mb: float) -> list[list]:
    """Consecutive layers grouped so that the activation inputs captured for one group fit in `capture_mb`."""
    import torch.fx as fx

    chunks, cur, cur_bytes = [], [], 0.0
    for L in layers:
        b = sum(_node_bytes(a, per_image) for a in L.node.args
                if isinstance(a, fx.Node) and not _is_const_node(a, modules))
        if cur and cur_bytes + b > capture_mb * 2**20:
            chunks.append(cur)
            cur, cur_bytes = [], 0.0
        cur.append(L)
        cur_bytes += b
    if cur:
        chunks.append(cur)
    return chunks


class _VitSearch:
    """The search state over one prepared graph: a _QVar per observer instance (shared by its names),
    the bias corrections found so far, and the per-layer report."""

    def __init__(self, gm, cfg: VitPTQConfig, batches: list, ex_batch: int, progress: bool):
        self.gm, self.cfg, self.batches, self.progress = gm, cfg, batches, progress
        self.modules = dict(gm.named_modules(remove_duplicate=False))
        self.n_img = sum(b.shape[0] for b in batches)
        self.per_image = self.n_img / max(ex_batch, 1)  # meta shapes are for the example batch
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.sequential = cfg.inputs == "quantized"
        # observer instance -> names (pt2e shares one instance between edges of a SharedQuantizationSpec)
        self.names_of: dict[int, list[str]] = {}
        for name, mod in gm.named_modules(remove_duplicate=False):
            if _is_observer(mod) and name:
                self.names_of.setdefault(id(mod), []).append(name)
        self.qvars: dict[int, _QVar | None] = {}
        self.base_qparams: dict[int, tuple] = {}  # observer id -> (scale, zp) the quantizer itself would use
        self.bias_override, self.out_shift = {}, {}
        self.report, self.corrections = [], []

    def fq_model(self, name, x):
        """The converted model's q/dq at observer `name`: searched qparams if set, else its own."""
        obs = self.modules[name]
        key = id(obs)
        v = self.qvars.get(key)
        if v is not None and v.searched:
            return v.fq(x)
        if key not in self.base_qparams:
            try:
                self.base_qparams[key] = obs.calculate_qparams()
            except Exception:
                self.base_qparams[key] = None
        qp = self.base_qparams[key]
        return x if qp is None else _observer_fake_quant(obs, x, qp)

    def layer_inputs(self, L: QuantLayer, cap: dict):
        """(inputs, float reference inputs or None, _QVar per observed input) of layer L; large
        (high-resolution) layers keep a leading-dim slice of ~max_elements of every activation input."""
        import torch.fx as fx

        args = [a for a in L.node.args if isinstance(a, fx.Node)]
        qcap = _capture(self.gm, self.batches, set(args), fq=self.fq_model, bias_override=self.bias_override,
                        out_shift=self.out_shift) if self.sequential else None
        values, refs, lqvars = {}, ({} if self.sequential else None), {}
        for i, a in enumerate(L.node.args):
            if not isinstance(a, fx.Node):
                continue
            const = _is_const_node(a, self.modules)
            values[i] = cap[a][0] if const else torch.cat(cap[a], 0)
            if self.sequential:  # this layer's inputs as the model quantized so far computes them
                refs[i] = values[i]
                values[i] = qcap[a][0] if const else torch.cat(qcap[a], 0)
            if i in L.arg_obs:
                obs = self.modules[L.arg_obs[i].target]
                if id(obs) not in self.qvars:
                    names = self.names_of.get(id(obs), [L.arg_obs[i].target])
                    self.qvars[id(obs)] = _qvar_from_observer(id(obs), names, obs, is_weight=(i == L.weight_arg),
                                                              value_for_range=values[i])
                lqvars[i] = self.qvars[id(obs)]
        act = [i for i, a in enumerate(L.node.args) if isinstance(a, fx.Node) and not _is_const_node(a, self.modules)]
        big = max([values[i].numel() for i in act] + [_node_bytes(L.node, self.per_image) / 4])
        if act and big > self.cfg.max_elements:
            frac = self.cfg.max_elements / big
            for i in act:
                keep = max(1, int(math.ceil(values[i].shape[0] * frac)))
                values[i] = values[i][:keep]
                if self.sequential:
                    refs[i] = refs[i][:keep]
        return values, refs, lqvars

    def search_layer(self, L: QuantLayer, cap: dict) -> dict:
        """Search the free steps of layer L (weights first, then activations), then its bias correction."""
        cfg = self.cfg
        tl = time.perf_counter()
        values, refs, lqvars = self.layer_inputs(L, cap)
        ev = _LayerEval(L, values, lqvars, cfg, self.gen, ref_values=refs)
        base_score = float(ev.objective(ev.current_output()))
        free = sorted((i for i, v in lqvars.items() if v is not None and not v.searched
                       and ((v.is_weight and cfg.search_weights) or (not v.is_weight and cfg.search_activations))),
                      key=lambda i: (not lqvars[i].is_weight, i))
        for _ in range(cfg.rounds if len(free) > 1 else min(cfg.rounds, 1)):
            for i in free:
                lqvars[i].alpha, _ = _search_var(ev, i, lqvars[i], cfg)
        for i in free:
            lqvars[i].searched, lqvars[i].owner = True, L.name
        final_out = ev.current_output()
        score = float(ev.objective(final_out))
        entry = {"layer": L.name, "kind": L.kind, "attention_scores": L.attention_scores,
                 "objective_observer": round(base_score, 6), "objective_vit": round(score, 6),
                 "searched": {("weight" if lqvars[i].is_weight else f"act{i}"): _alpha_repr(lqvars[i].alpha)
                              for i in free}}
        if cfg.bias_correction and L.kind in ("conv", "linear"):
            entry["bias_shift_rms"] = self.bias_correction(L, final_out, ev.ref)
        entry["seconds"] = round(time.perf_counter() - tl, 3)
        return entry

    def bias_correction(self, L: QuantLayer, out: torch.Tensor, ref: torch.Tensor) -> float:
        """Record E[O^] - E[O] per output channel; later layers see it in their quantized inputs."""
        cd = _out_channel_dim(L.kind, out)
        delta = (out - ref).double().mean([d for d in range(out.dim()) if d != cd]).float()
        self.corrections.append((L, delta))
        if self.sequential:
            shape = [1] * out.dim()
            shape[cd] = -1
            if L.bias_node is not None:
                b0 = _get_attr(self.gm, L.bias_node.target).detach()
                self.bias_override[L.bias_node.target] = b0 - delta.to(b0.dtype)
            elif len(L.node.args) <= 2 or L.node.args[2] is None:
                self.out_shift[L.node] = -delta.reshape(shape)
        return float(delta.pow(2).mean().sqrt())

    def run(self, layers: list[QuantLayer]) -> None:
        import torch.fx as fx

        it = 0
        for chunk in _capture_chunks(layers, self.modules, self.per_image, self.cfg.capture_mb):
            wanted = {a for L in chunk for a in L.node.args if isinstance(a, fx.Node)}
            cap = _capture(self.gm, self.batches, wanted)
            for L in chunk:
                it += 1
                entry = self.search_layer(L, cap)
                self.report.append(entry)
                if self.progress:
                    print(f"[vit-ptq {it}/{len(layers)}] {L.name} ({L.kind}) {entry['objective_observer']:.5f} -> "
                          f"{entry['objective_vit']:.5f} {entry['searched']} {entry['seconds']:.2f}s", flush=True)
            del cap


def apply_vit_calibration(prepared_model, calib_batches: Iterable, cfg: VitPTQConfig | None = None,
                          progress: bool = False):
    """Search weight/activation quantization steps of every quantized layer of a pt2e *prepared* and
    already calibrated GraphModule (the min/max observation pass must have run), write them into the
    graph's observers, apply bias correction, and return the same (modified) `prepared_model`.

    `calib_batches`: an iterable of float tensors [N, 3, H, W] (or (tensor, ...) tuples), the same
    real images used for observation; the first `cfg.search_images` images are used. A report (one
    dict per layer, plus totals) is stored in `prepared_model.meta["vit_ptq"]`.
    """
    import torch.fx as fx

    cfg = cfg or VitPTQConfig()
    if not isinstance(cfg, VitPTQConfig):
        raise UserError(f"cfg must be a VitPTQConfig, got {type(cfg).__name__}")
    if not isinstance(prepared_model, fx.GraphModule):
        raise UserError("apply_vit_calibration needs the GraphModule returned by prepare_pt2e")
    t0 = time.perf_counter()
    gm = prepared_model
    layers = find_quant_layers(gm, cfg.layer_kinds)
    if not layers:
        raise UserError("no quantized conv/linear/matmul layers with observers in this graph "
                        "(pass the model returned by prepare_pt2e, before convert_pt2e)")
    batches, ex_batch = _rebatch(gm, calib_batches, cfg.search_images)
    search = _VitSearch(gm, cfg, batches, ex_batch, progress)
    search.run(layers)
    # bias correction (after every search, so each layer saw the original fp activations)
    for L, delta in search.corrections:
        _correct_bias(gm, L, delta)
    # write the searched qparams into the graph
    n_obs = _install_searched_observers(gm, [v for v in search.qvars.values() if v is not None and v.searched])
    gm.recompile()
    meta = getattr(gm, "meta", None)
    summary = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
               "layers": search.report, "n_layers": len(search.report), "n_observers_replaced": n_obs,
               "n_bias_corrected": len(search.corrections), "search_images": search.n_img,
               "seconds": round(time.perf_counter() - t0, 2)}
    if isinstance(meta, dict):
        meta["vit_ptq"] = summary
    return gm


def _alpha_repr(a):
    if isinstance(a, list):
        nums = [x for x in a if not isinstance(x, str)]
        return {"per_channel_mean": round(sum(nums) / len(nums), 4) if nums else None,
                "observer_channels": sum(isinstance(x, str) for x in a)}
    return a


def _correct_bias(gm, L: QuantLayer, delta: torch.Tensor):
    """bias <- bias - (E[O^] - E[O]); creates a bias parameter when the layer has none."""
    node = L.node
    if L.bias_node is not None:
        b = _get_attr(gm, L.bias_node.target)
        with torch.no_grad():
            b.data = (b.data - delta.to(b.dtype)).contiguous()
        return
    if len(node.args) > 2 and node.args[2] is not None:
        return  # a bias computed in the graph (not a constant): leave it
    name = f"_vit_ptq_bias_{node.name}"
    gm.register_parameter(name, torch.nn.Parameter(-delta.float().contiguous(), requires_grad=False))
    with gm.graph.inserting_before(node):
        b_node = gm.graph.get_attr(name)
    args = list(node.args)
    if len(args) < 3:
        args.append(b_node)
    else:
        args[2] = b_node
    node.args = tuple(args)


def _install_searched_observers(gm, qvars: list[_QVar]) -> int:
    """Replace each searched observer instance (under all its names) by a SearchedQParamsObserver."""
    from torchao.quantization.pt2e import DerivedObserverOrFakeQuantize

    remap = {}
    for v in qvars:
        o = v.obs
        new = _searched_cls()(v.scale, v.zero_point, dtype=o.dtype, qscheme=o.qscheme, quant_min=o.quant_min,
                                      quant_max=o.quant_max, ch_axis=int(getattr(o, "ch_axis", 0) or 0),
                                      eps=float(getattr(_range_source(o), "eps", torch.finfo(torch.float32).eps)))
        remap[id(o)] = new
        for name in v.names:
            gm.set_submodule(name, new) if hasattr(gm, "set_submodule") else setattr(gm, name, new)
    for mod in gm.modules():
        if isinstance(mod, DerivedObserverOrFakeQuantize):
            mod.obs_or_fqs = [remap.get(id(o), o) for o in mod.obs_or_fqs]
    return len(remap)


def replace_observers_with_minmax(prepared_model) -> int:
    """Baseline helper: give every calibrated activation/weight observer its plain min/max qparams
    (a HistogramObserver otherwise picks an L2-optimal clipped range). Returns how many changed."""
    names_of: dict[int, list[str]] = {}
    objs = {}
    for name, mod in prepared_model.named_modules(remove_duplicate=False):
        if _is_observer(mod) and name and hasattr(mod, "min_val") and hasattr(mod, "quant_min"):
            names_of.setdefault(id(mod), []).append(name)
            objs[id(mod)] = mod
    vs = []
    for key, mod in objs.items():
        v = _qvar_from_observer(key, names_of[key], mod, is_weight=False)
        if v is None:
            continue
        v.scale, v.zero_point = minmax_qparams(mod, v.min_val, v.max_val, 1.0)
        vs.append(v)
    n = _install_searched_observers(prepared_model, vs)
    prepared_model.recompile()
    return n
