"""Per-layer int8 plan chosen by measured latency (`--quant int8-latency`).

XNNPACK's int8 kernels are not faster than its fp32 ones everywhere (on a VNNI host: fully connected and
3x3 convolutions 2-3x faster, depthwise 3x3 convolutions slower -- benchmarks/profile_mobilevit_xxs_256.md),
and a quantized layer also pays the Converts at its boundaries. So for every convolution and linear layer
that the int8 quantizer would take, the plan lowers that layer alone to XNNPACK twice -- fp32, and static
int8 through the same quantizer calibrated on the layer's own input -- and times both with the ExecuTorch
runtime on this machine, round-robin in one process. The layer's input is what it receives when the model
runs on a real calibration image at the export size (captured by a forward hook), so every micro-benchmark
has the layer's real shape and real values.

A layer stays int8 only when `int8_ms <= fp32_ms * (1 - margin)`; the others join keep_float (they stay
fp32 inside the same delegate). Ops that are not convolutions or linears (adds, the attention's matmuls)
are left to the quantizer as in `int8`.

Each layer's timing is cached in `~/.cache/mobilevit_deploy/int8_layer_latency.json`, keyed by the
layer's signature (kind, weight shape, stride / padding / dilation / groups, input shape), threads, the
torch / executorch versions and the CPU, so layers of the same shape are measured once and a second
export on the same machine measures nothing.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..hostinfo import JsonCache, cpu_id, cpu_key, runtime_versions

CACHE = JsonCache("int8_layer_latency.json", 1)


@dataclass
class LayerTiming:
    unit: str  # module path
    kind: str  # conv1x1 | conv_dw | conv | linear
    signature: str
    fp32_ms: float
    int8_ms: float
    int8: bool  # the plan's choice
    cached: bool = False
    error: str | None = None  # why the layer could not be timed alone (then it stays int8, as in `int8`)

    @property
    def ratio(self) -> float:
        return self.int8_ms / self.fp32_ms if self.fp32_ms > 0 else float("inf")


@dataclass
class LatencyPlan:
    layers: list[LayerTiming]
    threads: int
    margin: float
    input_size: tuple[int, int]
    seconds: float = 0.0
    measured: int = 0  # signatures measured in this call (the rest came from the cache)
    cpu: dict = field(default_factory=cpu_id)

    def keep_float(self) -> list[str]:
        return [t.unit for t in self.layers if not t.int8]

    def summary(self) -> dict:
        """The manifest's `latency_plan` block."""
        timed = [t for t in self.layers if t.error is None]
        f32 = sum(t.fp32_ms for t in timed)
        chosen = sum(t.int8_ms if t.int8 else t.fp32_ms for t in timed)
        all8 = sum(t.int8_ms for t in timed)
        return {
            "method": "each conv / linear lowered alone to XNNPACK in fp32 and static int8 (its real input from a "
                      "calibration image at the export size), timed by the ExecuTorch runtime round-robin; int8 kept "
                      "where int8_ms <= fp32_ms * (1 - margin)",
            "threads": self.threads, "margin": self.margin, "input_size": list(self.input_size), "cpu": self.cpu,
            "versions": runtime_versions(), "seconds": round(self.seconds, 1), "signatures_measured": self.measured,
            "layers_int8": sum(t.int8 for t in self.layers), "layers_fp32": sum(not t.int8 for t in self.layers),
            "not_timed": [{"unit": t.unit, "error": t.error} for t in self.layers if t.error is not None],
            "sum_ms": {"fp32": round(f32, 4), "int8_all": round(all8, 4), "plan": round(chosen, 4)},
            "layers": [{**{k: v for k, v in asdict(t).items() if k not in ("signature", "error")},
                        "fp32_ms": round(t.fp32_ms, 4), "int8_ms": round(t.int8_ms, 4), "ratio": round(t.ratio, 3)}
                       for t in self.layers if t.error is None],
        }


def layer_kind(mod) -> str | None:
    from torch import nn

    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Conv2d):
        if mod.groups > 1 and mod.groups == mod.in_channels:
            return "conv_dw"
        return "conv1x1" if tuple(mod.kernel_size) == (1, 1) else "conv"
    return None


def signature(mod, x) -> str:
    kind = layer_kind(mod)
    s = f"{kind}|w={list(mod.weight.shape)}|bias={mod.bias is not None}|in={list(x.shape)}"
    if kind != "linear":
        s += f"|stride={list(mod.stride)}|pad={list(mod.padding)}|dil={list(mod.dilation)}|groups={mod.groups}"
    return s


def layer_inputs(model, units: list[str], x) -> dict:
    """{unit: the input tensor the module receives when `model` runs on `x`} (first call of each)."""
    import torch

    got, hooks = {}, []
    for u in units:
        def hook(mod, args, u=u):
            got.setdefault(u, args[0].detach().clone())
        hooks.append(model.get_submodule(u).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


def _lowered_method(module, x, quantizer_factory: Callable | None):
    """`module` (fp32, or int8 through `quantizer_factory()` calibrated on `x`) lowered to XNNPACK and
    loaded by the ExecuTorch runtime: a zero-argument callable running it on `x`."""
    import torch
    from executorch.runtime import Runtime

    from ..export.executorch import lower

    module = copy.deepcopy(module).eval()
    ep = torch.export.export(module, (x,))
    if quantizer_factory is not None:
        from .pt2e import convert, prepare_observed

        conv = convert(prepare_observed(ep.module(), quantizer_factory(None), [x]))
        ep = torch.export.export(conv, (x,))
    prog, _ = lower(ep)
    program = Runtime.get().load_program(prog.buffer)
    method, args = program.load_method("forward"), [x.contiguous()]
    return lambda: (program, method.execute(args))[1]


def measure_layers(items: dict, quantizer_factory: Callable, *, threads: int, log=None, rounds: int = 5,
                   iters: int = 20) -> dict:
    """{signature: (fp32_ms, int8_ms)} of `items` ({signature: (module, input)}), timed round-robin.

    A layer that fails to lower or to run alone (e.g. XNNPACK resizing a 2x2 output of a lone conv) maps
    to the error message instead: the plan leaves it to the quantizer (int8), as `int8` does."""
    from executorch.extension.pybindings import portable_lib

    from ..prune.latency import time_round_robin

    log = log or (lambda s: None)
    portable_lib._unsafe_reset_threadpool(int(threads))
    fns, failed = {}, {}
    for i, (sig, (mod, x)) in enumerate(items.items()):
        try:
            pair = {(sig, "fp32"): _lowered_method(mod, x, None),
                    (sig, "int8"): _lowered_method(mod, x, quantizer_factory)}
            for fn in pair.values():
                fn()  # runs once here, so a failure is this layer's, not the timing loop's
            fns.update(pair)
        except Exception as e:  # noqa: BLE001 -- recorded in the plan; the layer keeps the quantizer's choice
            failed[sig] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"  latency plan: {sig.split('|')[0]} {sig.split('|')[3] if sig.count('|') > 2 else ''} not timed "
                f"({failed[sig]}); left int8")
        log(f"  latency plan: lowered {i + 1}/{len(items)} layer shapes")
    ms = time_round_robin(fns, rounds=rounds, iters=iters) if fns else {}
    out = {sig: (ms[(sig, "fp32")], ms[(sig, "int8")]) for sig in items if sig not in failed}
    out.update(failed)
    return out


def plan_int8(model, units: list[str], quantizer_factory: Callable, x, *, threads: int = 1, margin: float = 0.0,
              log=None, measure: Callable | None = None) -> LatencyPlan:
    """The per-layer plan for `model` exported at `x`'s size (`x`: one real preprocessed image [1, 3, H, W]).

    `units`: the quantizable units (module paths); the convolutions and linears among them are planned.
    `measure(items) -> {signature: (fp32_ms, int8_ms)}` replaces the ExecuTorch timing (tests)."""
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    model = model.eval()
    def module_or_none(u):
        try:
            return model.get_submodule(u)
        except AttributeError:  # a graph unit that is not a module path of `model` (not planned)
            return None

    planned = [u for u in units if layer_kind(module_or_none(u)) is not None]
    inputs = layer_inputs(model, planned, x[:1])
    planned = [u for u in planned if u in inputs]  # a module the forward never calls is not planned
    sigs = {u: signature(model.get_submodule(u), inputs[u]) for u in planned}
    ctx = f"|threads={threads}|torch+et={'/'.join(str(v) for v in runtime_versions().values())}|cpu={cpu_key()}"
    cached = CACHE.load()["entries"]
    todo = {}
    for u in planned:
        if sigs[u] + ctx not in cached and sigs[u] not in todo:
            todo[sigs[u]] = (model.get_submodule(u), inputs[u])
    if todo:
        log(f"quantize: int8 latency plan: timing {len(todo)} layer shapes (fp32 vs int8, {threads} thread(s)); "
            f"{len(set(sigs.values())) - len(todo)} from {CACHE.path}")
        fresh = (measure or (lambda items: measure_layers(items, quantizer_factory, threads=threads, log=log)))(todo)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        failed = {s: v for s, v in fresh.items() if isinstance(v, str)}
        CACHE.put_many({s + ctx: {"fp32_ms": v[0], "int8_ms": v[1], "created": stamp} for s, v in fresh.items()
                        if s not in failed})  # a failure is not cached: a later tool version may run it
        cached = {**CACHE.load()["entries"], **{s + ctx: {"error": v} for s, v in failed.items()}}
    rows = []
    for u in planned:
        e = cached[sigs[u] + ctx]
        if "error" in e:
            rows.append(LayerTiming(u, layer_kind(model.get_submodule(u)), sigs[u], float("nan"), float("nan"),
                                    True, error=e["error"]))
            continue
        f, q = float(e["fp32_ms"]), float(e["int8_ms"])
        rows.append(LayerTiming(u, layer_kind(model.get_submodule(u)), sigs[u], f, q, q <= f * (1.0 - margin),
                                cached=sigs[u] not in todo))
    return LatencyPlan(rows, threads, margin, tuple(x.shape[-2:]), time.perf_counter() - t0, len(todo))
