"""Mixed-precision weight bits under a size budget (Liu et al. 2021, Sec. 3.4), for Core ML palettization.

The paper measures a layer's sensitivity by the nuclear norm of its attention map (attention layers)
or of its output feature (other layers), and picks per-layer bit widths on the Pareto frontier of
model size vs. the sensitivity-weighted quantization perturbation
    Omega = sum_i  sensitivity_i * error_i(bits_i).
On Core ML and XNNPACK the activations stay 8-bit, so here the bits are the *weights'* bits: per-layer
4/6/8-bit palettization (Core ML per-op `OpPalettizerConfig`s).

Pieces:
- `layer_sensitivities(model, batches)`: nuclear norms per conv/linear weight (keyed by the weight's
  state-dict name, e.g. "stages.2.1.transformer.0.attn.qkv.weight").
- `palettization_errors(model, choices)`: error_i(b) = ||W - P_b(W)||^2 / ||W||^2 of a k-means LUT
  of 2^b entries (the same kind of LUT `coremltools` builds with mode="kmeans").
- `allocate_bits(sensitivities, sizes, budget_avg_bits, choices)`: the exact minimiser of Omega under
  sum_i size_i * bits_i <= budget * sum_i size_i (a multiple-choice knapsack solved by dynamic
  programming on a fine grid of the size budget; the grid rounds costs *up*, so the budget always holds).
- `coreml_palettization_config(mlmodel, bits, torch_layers)`: a `coremltools.optimize.coreml.
  OptimizationConfig` with one `OpPalettizerConfig` per conv/linear op, found by matching the MIL
  program's conv/linear ops to the torch layers in graph order (weight shapes checked), because the
  MIL const names are not stable (conv+BN folding renames them).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import UserError

__all__ = [
    "MixedPrecisionConfig",
    "check_plan_options",
    "allocate_bits",
    "layer_sensitivities",
    "palettization_errors",
    "kmeans_palettize",
    "weight_layers",
    "coreml_palettization_config",
    "coreml_weight_ops",
    "iter_coreml_weight_ops",
    "average_bits",
    "forward_weight_order",
    "coreml_op_weights",
    "MixedPrecisionPlan",
    "plan_mixed_precision",
]


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Budgeted per-layer weight bits for Core ML palettization (the `palette-mixed` scheme's config,
    `coreml_schemes.CoreMLMixedPaletteConfig`, is this plus its calibration source)."""

    budget_avg_bits: float = 6.0
    choices: tuple[int, ...] = (4, 6, 8)
    mode: str = "kmeans"                # coremltools palettization mode
    weight_threshold: int = 2048        # coremltools leaves smaller weights uncompressed (fp16)
    sensitivity_images: int = 32
    error_model: str = "measured"       # "measured": k-means LUT error per layer; "ideal": 4**-bits

    def __post_init__(self):
        if not self.choices or any((not isinstance(b, int)) or b not in (1, 2, 3, 4, 6, 8) for b in self.choices):
            raise UserError(f"choices must be bit widths from 1, 2, 3, 4, 6, 8 (Core ML LUT sizes), got {self.choices}")
        lo = min(self.choices)
        if not (lo <= self.budget_avg_bits):
            raise UserError(f"--weight-bits-budget {self.budget_avg_bits} is below the smallest choice {lo}")
        if self.sensitivity_images < 1:
            raise UserError("sensitivity_images must be >= 1")
        check_plan_options(self)


def check_plan_options(cfg) -> None:
    """`mode` and `error_model` of a MixedPrecisionConfig (or a subclass)."""
    if cfg.mode not in ("kmeans", "uniform"):
        raise UserError(f"mode must be 'kmeans' or 'uniform', got {cfg.mode!r}")
    if cfg.error_model not in ("measured", "ideal"):
        raise UserError(f"error_model must be 'measured' or 'ideal', got {cfg.error_model!r}")


# --------------------------------------------------------------------------------------------------
# the allocator


def average_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> float:
    total = sum(sizes[k] for k in bits)
    return sum(bits[k] * sizes[k] for k in bits) / total if total else 0.0


def allocate_bits(sensitivities: Mapping[str, float], sizes: Mapping[str, int], budget_avg_bits: float,
                  choices: Sequence[int] = (4, 6, 8), errors: Mapping[str, Mapping[int, float]] | None = None,
                  resolution: int = 200_000) -> dict[str, int]:
    """Bits per layer minimising sum_i sensitivity_i * error_i(bits_i) subject to
    sum_i size_i * bits_i <= budget_avg_bits * sum_i size_i.

    `sizes`: number of weights per layer. `errors[layer][bits]`: relative quantization error of the
    layer at that width (default 4**-bits, the uniform-quantization noise model, which is the same for
    every layer, so then only the sensitivities and sizes decide). Exact for costs rounded up to
    1/`resolution` of the spare budget above all-minimum bits, so the returned allocation always meets
    the budget. Raises UserError for a budget below the smallest choice or inconsistent inputs.
    """
    choices = sorted(set(int(c) for c in choices))
    if not choices:
        raise UserError("choices is empty")
    keys = list(sizes)
    if not keys:
        raise UserError("no layers to allocate bits to")
    missing = [k for k in keys if k not in sensitivities]
    if missing:
        raise UserError(f"no sensitivity for layers {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if any(sizes[k] <= 0 for k in keys):
        raise UserError("layer sizes must be positive")
    if any(not math.isfinite(float(sensitivities[k])) or sensitivities[k] < 0 for k in keys):
        raise UserError("sensitivities must be finite and >= 0")
    lo, hi = choices[0], choices[-1]
    if budget_avg_bits < lo:
        raise UserError(f"budget {budget_avg_bits} average bits is below the smallest choice {lo}")
    if budget_avg_bits >= hi:
        return {k: hi for k in keys}

    def err(k, b):
        if errors is not None:
            try:
                return float(errors[k][b])
            except KeyError:
                raise UserError(f"errors has no entry for layer {k!r} at {b} bits") from None
        return 4.0 ** (-b)

    import numpy as np

    # integer costs in bits above all-minimum; exact DP when the budget fits in `resolution` units of
    # their gcd, else costs are rounded *up* to a coarser unit (the budget still holds)
    total = sum(sizes[k] for k in keys)
    spare_bits = int(math.floor((budget_avg_bits - lo) * total + 1e-6))
    raw = {k: [int(sizes[k]) * (b - lo) for b in choices] for k in keys}
    g = 0
    for cs in raw.values():
        for c in cs:
            g = math.gcd(g, c)
    g = max(g, 1)
    unit = float(g) if spare_bits / g <= resolution else spare_bits / resolution
    cap = int(spare_bits // unit)
    INF = float("inf")
    dp = np.zeros(cap + 1)
    picks = []
    for k in keys:
        costs = [int(math.ceil(c / unit - 1e-9)) for c in raw[k]]
        vals = [float(sensitivities[k]) * err(k, b) for b in choices]
        new = np.full(cap + 1, INF)
        arg = np.zeros(cap + 1, dtype=np.int64)
        for j, (c, v) in enumerate(zip(costs, vals)):
            if c > cap:
                continue
            cand = np.full(cap + 1, INF)
            cand[c:] = dp[:cap + 1 - c] + v
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        picks.append((arg, costs))
    c = int(np.argmin(dp))
    out = {}
    for k, (arg, costs) in zip(reversed(keys), reversed(picks)):
        j = int(arg[c])
        out[k] = choices[j]
        c -= costs[j]
    out = {k: out[k] for k in keys}
    assert average_bits(out, sizes) <= budget_avg_bits + 1e-9
    return out


# --------------------------------------------------------------------------------------------------
# sensitivities and errors from a torch model


def weight_layers(model) -> dict[str, object]:
    """{"<module path>.weight": module} for every Conv1d/2d and Linear of `model` (graph = module order)."""
    from torch import nn

    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}


def _nuclear(x):
    """Mean nuclear norm over the leading dim of a batch of matrices [S, a, b] (float32).

    Runs the batched SVD on one thread: these matrices are small, and LAPACK's threading only adds
    synchronisation (measured: [16, 64, 256] takes 6.6 s with 2 threads on a busy 2-core machine,
    0.016 s with 1; same result)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return float(torch.linalg.matrix_norm(x.float(), ord="nuc").mean())
    finally:
        torch.set_num_threads(n)


def layer_sensitivities(model, batches: Iterable, max_images: int = 32) -> dict[str, float]:
    """Nuclear-norm sensitivity per conv/linear weight on real images (paper Sec. 3.4).

    Attention layers (a Linear whose parent module also holds an `attn_drop` Dropout, i.e. the qkv and
    output projections of `layers.Attention`): the nuclear norm of the block's attention map (the
    softmax output seen by `attn_drop`), one [N, M] matrix per head and sample. Other layers: the
    nuclear norm of the output feature, one matrix per sample ([C, H*W] for convs, [tokens, C] for
    linears). Averaged over samples and batches.
    """
    import torch
    from torch import nn

    layers = weight_layers(model)
    if not layers:
        raise UserError("model has no conv/linear layers")
    mods = dict(model.named_modules())
    attn_parent = {}
    for wname, m in layers.items():
        path = wname[: -len(".weight")]
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        drop = getattr(mods.get(parent), "attn_drop", None)
        if isinstance(m, nn.Linear) and isinstance(drop, nn.Module):
            attn_parent[wname] = parent
    sums = {k: 0.0 for k in layers}
    counts = {k: 0 for k in layers}
    attn_sum, attn_cnt = {}, {}
    hooks = []

    def out_hook(name):
        def h(mod, inp, out):
            o = out.detach()
            if o.dim() == 4:  # conv [B, C, H, W] -> [B, C, H*W]
                mats = o.flatten(2)
            elif o.dim() == 3:
                mats = o
            elif o.dim() == 2:
                mats = o.unsqueeze(0)
            else:
                mats = o.reshape(o.shape[0], o.shape[1], -1)
            sums[name] += _nuclear(mats) * mats.shape[0]
            counts[name] += mats.shape[0]
        return h

    def attn_hook(parent):
        def h(mod, inp, out):
            a = inp[0].detach()
            a = a.reshape(-1, a.shape[-2], a.shape[-1])
            attn_sum[parent] = attn_sum.get(parent, 0.0) + _nuclear(a) * a.shape[0]
            attn_cnt[parent] = attn_cnt.get(parent, 0) + a.shape[0]
        return h

    for name, m in layers.items():
        if name not in attn_parent:
            hooks.append(m.register_forward_hook(out_hook(name)))
    for parent in set(attn_parent.values()):
        hooks.append(mods[parent].attn_drop.register_forward_hook(attn_hook(parent)))
    n = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                if isinstance(b, (tuple, list)):
                    b = b[0]
                take = min(b.shape[0], max_images - n)
                if take <= 0:
                    break
                model(b[:take])
                n += take
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise UserError("no images for the sensitivity pass")
    out = {}
    for name in layers:
        if name in attn_parent:
            p = attn_parent[name]
            out[name] = attn_sum.get(p, 0.0) / max(attn_cnt.get(p, 0), 1)
        else:
            out[name] = sums[name] / max(counts[name], 1)
    return out


def kmeans_palettize(w, nbits: int, iters: int = 25):
    """Per-tensor scalar k-means LUT of 2**nbits entries (Lloyd, quantile init): (lut, indices, w_hat)."""
    import torch

    x = w.detach().reshape(-1).float()
    k = min(2 ** nbits, x.numel())
    if x.numel() <= 16_000_000:
        centers = torch.quantile(x, torch.linspace(0, 1, k))
    else:
        centers = x[torch.randperm(x.numel())[:k]]
    centers = torch.unique(centers)
    for _ in range(iters):
        mids = (centers[1:] + centers[:-1]) / 2
        idx = torch.bucketize(x, mids)
        sums = torch.zeros_like(centers).index_add_(0, idx, x)
        cnt = torch.zeros_like(centers).index_add_(0, idx, torch.ones_like(x))
        new = torch.where(cnt > 0, sums / cnt.clamp_min(1), centers)
        if torch.allclose(new, centers):
            centers = new
            break
        centers, _ = torch.sort(new)
    mids = (centers[1:] + centers[:-1]) / 2
    idx = torch.bucketize(x, mids)
    return centers, idx, centers[idx].reshape(w.shape)


def palettization_errors(model, choices: Sequence[int] = (4, 6, 8),
                         names: Sequence[str] | None = None) -> dict[str, dict[int, float]]:
    """error[layer][bits] = ||W - P_bits(W)||^2 / ||W||^2 with a per-tensor k-means LUT."""
    layers = weight_layers(model)
    names = list(names) if names is not None else list(layers)
    out = {}
    for n in names:
        w = layers[n].weight.detach()
        den = float(w.pow(2).sum()) or 1.0
        out[n] = {b: float((w - kmeans_palettize(w, b)[2]).pow(2).sum()) / den for b in choices}
    return out


# --------------------------------------------------------------------------------------------------
# Core ML


def iter_coreml_weight_ops(mlmodel):
    """(op, weight Var) of every conv / linear op of the MIL program (nested blocks included), in
    program order."""
    prog = mlmodel._mil_program if hasattr(mlmodel, "_mil_program") else mlmodel
    if prog is None:
        raise UserError("the Core ML model has no MIL program (convert with convert_to='mlprogram')")

    def walk(block):
        for op in block.operations:
            for b in getattr(op, "blocks", []) or []:
                yield from walk(b)
            if op.op_type in ("conv", "linear") and "weight" in op.inputs:
                yield op, op.inputs["weight"]

    for f in prog.functions.values():
        yield from walk(f)


def coreml_weight_ops(mlmodel) -> list[tuple[str, str, tuple[int, ...]]]:
    """(op name, op type, weight shape) of every conv / linear op of the MIL program, in program order."""
    return [(op.name, op.op_type, tuple(int(s) for s in w.shape)) for op, w in iter_coreml_weight_ops(mlmodel)]


def coreml_palettization_config(mlmodel, bits: Mapping[str, int], torch_layers: Sequence[tuple[str, tuple[int, ...]]],
                                mode: str = "kmeans", weight_threshold: int = 2048, default_bits: int | None = None):
    """An `OptimizationConfig` palettizing each torch layer's weight with its own bit width.

    `torch_layers`: (weight name, weight shape) of the model's conv/linear layers in forward order
    (e.g. `[(k, tuple(m.weight.shape)) for k, m in weight_layers(model).items()]` for a model whose
    modules are declared in forward order); they are matched one-to-one, in order, to the MIL
    program's conv/linear ops, and the weight shapes must agree (else UserError). Layers absent from
    `bits` get `default_bits` (None: not compressed).
    """
    import coremltools.optimize.coreml as cto

    ops = coreml_weight_ops(mlmodel)
    if len(ops) != len(torch_layers):
        raise UserError(f"Core ML program has {len(ops)} conv/linear ops but the torch model "
                        f"{len(torch_layers)} layers")
    unknown = set(bits) - {n for n, _ in torch_layers}
    if unknown:
        raise UserError(f"bits for unknown layers: {sorted(unknown)[:3]}")
    cfgs = {}
    for (op_name, _, wshape), (tname, tshape) in zip(ops, torch_layers):
        if tuple(wshape) != tuple(tshape):
            raise UserError(f"layer order mismatch: Core ML op {op_name} weight {wshape} vs torch {tname} "
                            f"{tuple(tshape)}")
        b = bits.get(tname, default_bits)
        cfgs[op_name] = None if b is None else cto.OpPalettizerConfig(mode=mode, nbits=int(b),
                                                                      weight_threshold=weight_threshold)
    return cto.OptimizationConfig(global_config=None, op_name_configs=cfgs)


def forward_weight_order(model, example_input) -> list[tuple[str, tuple[int, ...]]]:
    """(weight name, shape) of the conv/linear layers in the order a forward pass calls them (the
    order torch.export, and so the Core ML program, lists them). A layer called twice is an error."""
    import torch

    layers = weight_layers(model)
    order, hooks = [], []
    for name, m in layers.items():
        hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: order.append(name)))
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
    if len(order) != len(set(order)):
        raise UserError("a conv/linear layer is called more than once; per-layer bit allocation needs one call each")
    return [(n, tuple(layers[n].weight.shape)) for n in order]


def coreml_op_weights(mlmodel) -> dict:
    """{conv/linear op name: dense float32 weight} of a Core ML program; palettized / quantized
    weights (constexpr ops) are decompressed with coremltools' own value inference."""
    import numpy as np

    out = {}
    for op, w in iter_coreml_weight_ops(mlmodel):
        val = w.val
        if val is None:  # constexpr_* producer: materialise it
            src = w.op
            infer = getattr(src, "materialized_val_inference", None) or src.value_inference
            val = infer()
        out[op.name] = np.asarray(val, dtype=np.float32)
    return out


@dataclass
class MixedPrecisionPlan:
    """The result of `plan_mixed_precision`: Core ML config + what it was built from."""

    config: object  # coremltools.optimize.coreml.OptimizationConfig
    bits: dict  # torch weight name -> bits (palettized layers only)
    sizes: dict  # torch weight name -> number of weights
    sensitivities: dict
    errors: dict
    avg_bits: float
    op_names: dict  # torch weight name -> Core ML op name

    def describe(self) -> dict:
        from collections import Counter

        return {"avg_bits": round(self.avg_bits, 3), "layers": len(self.bits),
                "histogram": dict(sorted(Counter(self.bits.values()).items())),
                "weights_per_bits": {b: sum(self.sizes[k] for k in self.bits if self.bits[k] == b)
                                     for b in sorted(set(self.bits.values()))}}


def plan_mixed_precision(model, mlmodel, calib_batches, cfg: MixedPrecisionConfig) -> MixedPrecisionPlan:
    """Per-layer palettization bits for `mlmodel` (converted from `model`, uncompressed) under
    `cfg.budget_avg_bits` average bits over the weights that Core ML will palettize (those with more
    than `cfg.weight_threshold` elements; the others stay fp16 and are outside the budget).

    Sensitivity: `layer_sensitivities` on the first `cfg.sensitivity_images` calibration images.
    Error: measured k-means LUT error of the *Core ML program's* weights (BN already folded), or
    the ideal 4**-bits model. Then `allocate_bits` and `coreml_palettization_config`.
    """
    import numpy as np
    import torch

    if not isinstance(cfg, MixedPrecisionConfig):
        raise UserError(f"cfg must be a MixedPrecisionConfig, got {type(cfg).__name__}")
    batches = []
    n = 0
    for b in calib_batches:
        b = b[0] if isinstance(b, (tuple, list)) else b
        batches.append(b)
        n += b.shape[0]
        if n >= cfg.sensitivity_images:
            break
    if not batches:
        raise UserError("no calibration images for the mixed-precision sensitivity pass")
    order = forward_weight_order(model, batches[0][:1])
    ops = coreml_weight_ops(mlmodel)
    if len(ops) != len(order):
        raise UserError(f"Core ML program has {len(ops)} conv/linear ops but the torch model calls {len(order)}")
    op_w = coreml_op_weights(mlmodel)
    op_names, sizes = {}, {}
    for (op_name, _, wshape), (tname, tshape) in zip(ops, order):
        if tuple(wshape) != tuple(tshape):
            raise UserError(f"layer order mismatch: Core ML op {op_name} weight {wshape} vs torch {tname} {tshape}")
        op_names[tname] = op_name
        if int(np.prod(wshape)) > cfg.weight_threshold:  # coremltools compresses size > weight_threshold
            sizes[tname] = int(np.prod(wshape))
    if not sizes:
        raise UserError(f"no weight has more than {cfg.weight_threshold} elements; nothing to palettize")
    sens = layer_sensitivities(model, batches, max_images=cfg.sensitivity_images)
    sens = {k: sens[k] for k in sizes}
    if cfg.error_model == "measured":
        errors = {}
        for k in sizes:
            w = torch.from_numpy(op_w[op_names[k]])
            den = float(w.pow(2).sum()) or 1.0
            errors[k] = {b: float((w - kmeans_palettize(w, b)[2]).pow(2).sum()) / den for b in cfg.choices}
    else:
        errors = {k: {b: 4.0 ** (-b) for b in cfg.choices} for k in sizes}
    bits = allocate_bits(sens, sizes, cfg.budget_avg_bits, cfg.choices, errors=errors)
    config = coreml_palettization_config(mlmodel, bits, order, mode=cfg.mode, weight_threshold=cfg.weight_threshold)
    return MixedPrecisionPlan(config=config, bits=bits, sizes=sizes, sensitivities=sens, errors=errors,
                              avg_bits=average_bits(bits, sizes), op_names=op_names)
