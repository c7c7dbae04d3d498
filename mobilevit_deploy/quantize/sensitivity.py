"""Per-layer sensitivity of a calibrated W8A8 scheme, and the keep-in-float choice built on it.

Method (one pt2e prepare, one calibration pass, then only forward passes):
1. prepare the graph with the scheme's quantizer (every quantizable op annotated) and calibrate it
   on the calibration images;
2. replace every observer by a *switchable* fake-quantizer that uses the observer's calibrated
   qparams (`calculate_qparams`), so a forward pass can quantize any subset of the graph;
3. a *unit* is the innermost module of an annotated op (a Conv2d / Linear, or e.g. a transformer
   block for its residual adds); a fake-quantizer belongs to the units of the ops it feeds or observes;
4. `rank_units`: for each unit alone, the SQNR (dB) of the model's logits against fp32 on the
   evaluation images -- low SQNR = sensitive. That is the per-layer SQNR of the issue ("quantize one
   layer at a time and measure the model-output SQNR");
5. `keep_float_curve`: everything quantized except the k most sensitive units (k = 0, 1, 2, ...),
   which is what `--keep-float auto:k` exports.

The switchable graph is a simulation (fake quantization in fp32 with the calibrated qparams); the
numbers that go into a manifest are measured on the real artifact. `full_sqnr_check` compares the
all-quantized simulation with the real converted graph, so the simulation is checked, not trusted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .pt2e import module_path


class SwitchableFakeQuant(nn.Module):
    """Fake-quantize with an observer's calibrated qparams when `enabled`, else identity."""

    def __init__(self, observer: nn.Module):
        super().__init__()
        obs = getattr(observer, "activation_post_process", observer)  # FakeQuantize wraps an observer
        scale, zp = observer.calculate_qparams()
        self.register_buffer("scale", scale.detach().float().reshape(-1))
        self.register_buffer("zero_point", zp.detach().reshape(-1).to(torch.int32))
        self.quant_min = int(getattr(observer, "quant_min", obs.quant_min))
        self.quant_max = int(getattr(observer, "quant_max", obs.quant_max))
        qscheme = getattr(obs, "qscheme", torch.per_tensor_affine)
        self.per_channel = qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        self.ch_axis = int(getattr(obs, "ch_axis", 0))
        self.enabled = True

    def forward(self, x):
        if not self.enabled or not x.is_floating_point():
            return x
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.ch_axis,
                                                          self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale[0]), int(self.zero_point[0]),
                                                     self.quant_min, self.quant_max)


@dataclass
class SwitchableGraph:
    """A prepared+calibrated graph whose fake-quantizers can be switched per unit."""

    gm: torch.fx.GraphModule
    fqs: dict[str, SwitchableFakeQuant]  # fake-quant module name -> module
    owners: dict[str, set[str]]  # fake-quant module name -> units it belongs to
    units: list[str]  # every unit, in graph order

    def set_quantized(self, units: set[str] | None = None, *, keep_float: set[str] = frozenset()):
        """Quantize only `units` (None: all), but never a fake-quantizer all of whose units are in `keep_float`."""
        for name, fq in self.fqs.items():
            own = self.owners[name]
            on = (units is None or bool(own & units)) and not (own and own <= keep_float)
            fq.enabled = on

    def __call__(self, x):
        return self.gm(x)


def _is_observer(m) -> bool:
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.observer import ObserverBase

    return isinstance(m, (ObserverBase, FakeQuantizeBase))


def make_switchable(prepared: torch.fx.GraphModule) -> SwitchableGraph:
    """Turn a calibrated prepared graph (observers) into a SwitchableGraph (modifies `prepared`)."""
    fqs: dict[str, SwitchableFakeQuant] = {}
    owners: dict[str, set[str]] = {}
    units: list[str] = []

    def unit_of(n):
        if n.op == "call_function" and "quantization_annotation" in n.meta:
            return module_path(n)
        return None

    for n in prepared.graph.nodes:
        u = unit_of(n)
        if u is not None and u not in units:
            units.append(u)
    k = 0
    for n in list(prepared.graph.nodes):
        if n.op != "call_module":
            continue
        obs = prepared.get_submodule(n.target)
        if not _is_observer(obs):
            continue
        name = f"_switch_fq_{k}"
        k += 1
        fq = SwitchableFakeQuant(obs)
        prepared.add_submodule(name, fq)
        n.target = name
        fqs[name] = fq
        src = n.args[0]
        own = set()
        u = unit_of(src) if hasattr(src, "op") else None
        if u is not None:
            own.add(u)
        for user in n.users:
            u = unit_of(user)
            if u is not None:
                own.add(u)
        owners[name] = own
    prepared.recompile()
    return SwitchableGraph(prepared, fqs, owners, units)


@dataclass
class UnitSensitivity:
    unit: str
    sqnr_db: float  # model logits vs fp32 with only this unit quantized
    top1_agreement: float
    params: int = 0  # weight elements of the unit's own module (0 for op-only units)
    kind: str = ""  # module type


@dataclass
class SensitivityReport:
    scheme: str
    images: int
    full_sqnr_db: float  # everything quantized (simulation)
    full_top1_agreement: float
    units: list[UnitSensitivity] = field(default_factory=list)  # most sensitive first
    curve: list[dict] = field(default_factory=list)  # keep-float k -> sqnr / agreement (simulation)

    def ranked(self) -> list[str]:
        return [u.unit for u in self.units]

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme, "images": self.images,
            "full_sqnr_db": self.full_sqnr_db, "full_top1_agreement": self.full_top1_agreement,
            "units": [u.__dict__ for u in self.units], "keep_float_curve": self.curve,
            "method": "one unit fake-quantized at a time with the calibrated qparams; SQNR of the logits vs fp32",
        }


def _eval(sg: SwitchableGraph, xs, refs):
    from ..verify import sqnr_db, top1_agreement

    with torch.no_grad():
        outs = torch.cat([sg(x) for x in xs])
    ref = torch.cat(refs)
    return sqnr_db(ref, outs), top1_agreement(ref, outs)


def analyse(prepared, model, eval_batches, *, scheme: str, curve_max: int = 8,
            progress: bool = True) -> SensitivityReport:
    """Per-unit sensitivity on `eval_batches` (list of [B, 3, H, W]) of a calibrated prepared graph.

    `prepared` is modified (observers replaced). `model` is the fp32 reference.
    """
    from tqdm.auto import tqdm

    sg = make_switchable(prepared)
    with torch.no_grad():
        refs = [model(x).float() for x in eval_batches]
    images = sum(x.shape[0] for x in eval_batches)
    sg.set_quantized(None)
    full_sqnr, full_agree = _eval(sg, eval_batches, refs)
    mods = dict(model.named_modules())
    res = []
    for u in tqdm(sg.units, desc="per-layer sensitivity", unit="layer", disable=not progress, leave=False):
        sg.set_quantized({u})
        s, a = _eval(sg, eval_batches, refs)
        m = mods.get(u)
        w = getattr(m, "weight", None) if m is not None else None
        params = int(w.numel()) if isinstance(w, torch.Tensor) and not list(m.children()) else 0
        res.append(UnitSensitivity(u, s, a, params, type(m).__name__ if m is not None else "?"))
    res.sort(key=lambda r: r.sqnr_db)
    report = SensitivityReport(scheme, images, full_sqnr, full_agree, res)
    ranked = report.ranked()
    for k in range(0, min(curve_max, len(ranked)) + 1):
        sg.set_quantized(None, keep_float=set(ranked[:k]))
        s, a = _eval(sg, eval_batches, refs)
        report.curve.append({"keep_float": k, "units": ranked[:k], "sqnr_db": s, "top1_agreement": a})
    sg.set_quantized(None)
    return report


def rank_units(model, quantizer_factory, calib, deploy_cfg, *, scheme: str, eval_images: int = 32,
               batch_size: int = 16, curve_max: int = 8, progress: bool = True, gm=None) -> SensitivityReport:
    """Capture, prepare (all units), calibrate on `calib`, then `analyse` on the first `eval_images`
    calibration images (compared with fp32, no labels needed)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from .calibration import calibration_batches, run_calibration
    from .pt2e import capture_dynamic_batch

    gm = gm if gm is not None else capture_dynamic_batch(model, deploy_cfg)
    prepared = prepare_pt2e(gm, quantizer_factory(None))
    run_calibration(prepared, calib, deploy_cfg, batch_size=batch_size, progress=progress,
                    desc="calibrating (sensitivity)")
    xs, n = [], 0
    for x in calibration_batches(calib, deploy_cfg, batch_size=batch_size, progress=False):
        xs.append(x[: eval_images - n])
        n += xs[-1].shape[0]
        if n >= eval_images:
            break
    return analyse(prepared, model, xs, scheme=scheme, curve_max=curve_max, progress=progress)


def format_report(rep: SensitivityReport, top: int = 15) -> str:
    lines = [f"{rep.scheme}: all quantized (simulation) SQNR {rep.full_sqnr_db:.1f} dB, "
             f"top-1 agreement {rep.full_top1_agreement * 100:.1f} % on {rep.images} images",
             f"{'rank':>4}  {'SQNR dB':>8}  {'agree %':>7}  {'type':<14} unit (only this one quantized)"]
    for i, u in enumerate(rep.units[:top]):
        lines.append(f"{i + 1:>4}  {u.sqnr_db:>8.1f}  {u.top1_agreement * 100:>7.1f}  {u.kind:<14} {u.unit}")
    if len(rep.units) > top:
        lines.append(f"      ... {len(rep.units) - top} more units, least sensitive: "
                     f"{rep.units[-1].unit} ({rep.units[-1].sqnr_db:.1f} dB)")
    lines.append("keep-float k most sensitive (simulation): " + ", ".join(
        f"k={c['keep_float']}: {c['sqnr_db']:.1f} dB / {c['top1_agreement'] * 100:.0f} %" for c in rep.curve))
    return "\n".join(lines)
