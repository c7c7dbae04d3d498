"""Measure ViT-aware PTQ (Liu et al. 2021) against the pipeline's plain calibration, and mixed-precision
Core ML palettization against uniform palettization. Prints the markdown tables of benchmarks/vit_ptq.md
and writes the raw numbers as JSON.

    python -m benchmarks.vit_ptq_table --model mobilevit_xxs --pte --coreml-mixed \
        --json benchmarks/vit_ptq_mobilevit_xxs.json

W8A8 part (ExecuTorch XNNPACKQuantizer, per-channel int8 weights, int8 activations, torchao pt2e):
one capture (dynamic batch, as the pipeline), one observation pass over the same calibration images,
then three ways to turn the observers into qparams, each converted with convert_pt2e:
  histogram  the pipeline's `--calibration minmax` (XNNPACK's default HistogramObserver for activations,
             PerChannelMinMax for weights)
  minmax     every observer's plain min/max range
  vit        `apply_vit_calibration` (searched steps + ranking loss + bias correction)
Each is evaluated in PyTorch (the converted q/dq graph) on the validation folder: top-1, top-1
agreement with fp32 and SQNR of the logits against fp32. With --pte, the histogram and vit graphs are
also lowered to XNNPACK .pte files and run with the ExecuTorch runtime on the same images.

Core ML part (--coreml-mixed): the fp32 model is converted to an fp16 mlprogram, palettized
(k-means, coremltools) uniformly at 4/6/8 bits and per layer under average-bit budgets
(`plan_mixed_precision`); sizes are the saved .mlpackage sizes. Core ML cannot run on Linux, so top-1
is measured in PyTorch with the *artifact's* weights: every conv/linear weight is read back from the
palettized program (decompressed by coremltools) into the export stage's own read-back reference
(`coreml_schemes.program_weights_reference`: the BN-folded graph, each weight checked against the
uncompressed program first).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

from mobilevit_deploy.checkpoint import artifact_size

REPO = Path(__file__).resolve().parents[1]  # the default data folders are beside the repository


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- data

def load_split(root, deploy_cfg, n=None):
    """(x, y, paths) of an ImageFolder with the model's labels, `n` images evenly spaced."""
    from mobilevit_deploy.data import load_labeled_folder

    return load_labeled_folder(root, deploy_cfg, n)


def prepare_and_observe(model, quantizer, xc, batch):
    """The pipeline's dynamic-batch capture, prepare_pt2e with `quantizer`, one observation pass over
    the calibration images -> (prepared, prepare seconds, observation seconds)."""
    from mobilevit_deploy.quantize import pt2e

    t = time.perf_counter()
    gm = pt2e.capture_dynamic_batch(model, model.deploy_cfg)
    t_capture = time.perf_counter() - t
    t = time.perf_counter()
    prepared = pt2e.prepare_observed(gm, quantizer, xc.split(batch))
    return prepared, t_capture, time.perf_counter() - t


def logits_of(fn, x, batch=100):
    from mobilevit_deploy.verify import batched_logits

    return batched_logits(fn, x, batch)


def metrics(logits, y, ref):
    from mobilevit_deploy.verify import sqnr_db, top1_agreement

    return {"top1": float((logits.argmax(-1) == y).double().mean()) * 100,
            "agree_fp32": top1_agreement(ref, logits) * 100,
            "sqnr_fp32_db": sqnr_db(ref, logits),
            "pred": logits.argmax(-1).tolist()}


def paired(a_pred, b_pred, y):
    """Images right with b but wrong with a (b fixes), and the reverse (b breaks), with the exact
    two-sided McNemar (sign test) p-value: is b's top-1 different from a's beyond chance?"""
    fixes = sum(1 for p, q, t in zip(a_pred, b_pred, y) if p != t and q == t)
    breaks = sum(1 for p, q, t in zip(a_pred, b_pred, y) if p == t and q != t)
    n = fixes + breaks
    if n == 0:
        return fixes, breaks, 1.0
    k = min(fixes, breaks)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return fixes, breaks, p


# ------------------------------------------------------------------------------------------------- W8A8

def w8a8(model, xc, xv, yv, ref, args, results):
    from mobilevit_deploy.quantize import pt2e
    from mobilevit_deploy.quantize.executorch_schemes import xnnpack_quantizer_factory
    from mobilevit_deploy.quantize.vit_ptq import VitPTQConfig, apply_vit_calibration, replace_observers_with_minmax

    q = xnnpack_quantizer_factory(per_channel=True)()
    prepared, t_prep, t_obs = prepare_and_observe(model, q, xc, args.calib_batch)
    log(f"capture+prepare {t_prep:.1f}s, observation pass on {xc.shape[0]} images {t_obs:.1f}s")
    results["observation_s"] = t_obs

    converted = {}
    variants = args.variants or (["histogram", "minmax", "vit"]
                                 + (["vit-fp-inputs", "vit-no-bias-corr", "vit-no-rank"] if args.ablations else []))
    vit_cfg = VitPTQConfig(search_images=args.search_images, n_candidates=args.n_candidates, rounds=args.rounds)
    for v in variants:
        p = copy.deepcopy(prepared)
        t = time.perf_counter()
        extra = {}
        if v == "minmax":
            replace_observers_with_minmax(p)
        elif v.startswith("vit"):
            cfg = vit_cfg
            if v == "vit-fp-inputs":
                cfg = VitPTQConfig(**{**vit_cfg.__dict__, "inputs": "fp"})
            elif v == "vit-no-bias-corr":
                cfg = VitPTQConfig(**{**vit_cfg.__dict__, "bias_correction": False})
            elif v == "vit-no-rank":
                cfg = VitPTQConfig(**{**vit_cfg.__dict__, "ranking_gamma": 0.0})
            apply_vit_calibration(p, list(xc.split(args.calib_batch)), cfg, progress=args.verbose)
            rep = p.meta["vit_ptq"]
            extra = {"search_s": rep["seconds"], "layers": rep["n_layers"],
                     "observers_replaced": rep["n_observers_replaced"], "bias_corrected": rep["n_bias_corrected"],
                     "search_images": rep["search_images"], "config": rep["config"]}
            if v == "vit":
                results["vit_layers"] = rep["layers"]
        t_method = time.perf_counter() - t
        c = pt2e.convert(p)
        converted[v] = c
        m = metrics(logits_of(c, xv), yv, ref)
        m.update(extra)
        m["method_s"] = t_method
        m["calibration_s"] = t_obs + t_method
        results.setdefault("w8a8", {})[v] = m
        log(f"{v:18s} top1 {m['top1']:.2f}  agree {m['agree_fp32']:.2f}  sqnr {m['sqnr_fp32_db']:.2f} dB  "
            f"calib {m['calibration_s']:.1f}s")
    return converted


def pte_check(converted, xv, yv, ref, args, results):
    import torch

    from mobilevit_deploy.export.executorch import lower, save
    from mobilevit_deploy.runtime import load_artifact
    from mobilevit_deploy.verify import sqnr_db, top1_agreement

    out_dir = Path(args.pte_dir or tempfile.mkdtemp(prefix="vit_ptq_pte_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    n = min(args.pte_images, xv.shape[0])
    for v in [v for v in ("histogram", "vit") if v in converted]:
        c = converted[v]
        t = time.perf_counter()
        ep = torch.export.export(c, (xv[:1],))
        et, outside = lower(ep, backend="xnnpack")
        path = save(et, out_dir / f"{args.model}_int8_{v}.pte")
        t_lower = time.perf_counter() - t
        runner = load_artifact(path, num_threads=1)
        lp = torch.cat([runner(xv[i:i + 1]) for i in range(n)])
        lt = logits_of(c, xv[:n])
        r = {"file": str(path), "size_bytes": artifact_size(path), "lower_s": t_lower, "images": n,
             "top1": float((lp.argmax(-1) == yv[:n]).double().mean()) * 100,
             "agree_torch": top1_agreement(lt, lp) * 100, "sqnr_torch_db": sqnr_db(lt, lp),
             "agree_fp32": top1_agreement(ref[:n], lp) * 100, "sqnr_fp32_db": sqnr_db(ref[:n], lp),
             "torch_top1_same_images": float((lt.argmax(-1) == yv[:n]).double().mean()) * 100,
             "ops_outside_delegate": outside}
        # the searched scales are in the artifact: the .pte matches its own torch graph far better
        # than it matches the other calibration's graph
        other = "vit" if v == "histogram" else "histogram"
        if other in converted:
            r["sqnr_vs_other_torch_db"] = sqnr_db(logits_of(converted[other], xv[:n]), lp)
        results.setdefault("pte", {})[v] = r
        log(f"pte {v}: {r['size_bytes'] / 1e6:.2f} MB top1 {r['top1']:.2f} agree(torch) {r['agree_torch']:.2f} "
            f"sqnr(torch) {r['sqnr_torch_db']:.1f} dB, vs other graph "
            f"{r.get('sqnr_vs_other_torch_db', float('nan')):.1f} dB")


# --------------------------------------------------------------------------------- Core ML W8A8 (pt2e)

def _mil_quant_scales(mlmodel) -> list[float]:
    """Scales of the activation quantize ops of a Core ML program."""
    import numpy as np

    out = []
    for f in mlmodel._mil_program.functions.values():
        for op in f.operations:
            if op.op_type == "quantize" and "scale" in op.inputs:
                v = op.inputs["scale"].val
                if v is not None:
                    out += [float(x) for x in np.atleast_1d(v)]
    return out


def coreml_w8a8(model, xc, xv, yv, ref, args, results):
    """CoreMLQuantizer W8A8 (the pipeline's --target coreml --quant int8): min/max vs vit, evaluated on
    the converted q/dq graph in PyTorch (Core ML cannot run here); the vit graph is converted to an
    mlprogram and its quantize ops' scales are compared with the torch graph's."""
    import coremltools as ct
    import torch

    from mobilevit_deploy.quantize import CoreMLInt8Config, pt2e
    from mobilevit_deploy.quantize.coreml_schemes import coreml_quantizer_factory
    from mobilevit_deploy.quantize.vit_ptq import VitPTQConfig, apply_vit_calibration

    prepared, t_prep, t_obs = prepare_and_observe(model, coreml_quantizer_factory(CoreMLInt8Config())(), xc,
                                                  args.calib_batch)
    log(f"coreml w8a8: capture+annotate+prepare {t_prep:.1f}s, observation {t_obs:.1f}s")
    rows = {}
    conv = {}
    for v in ("minmax", "vit"):
        p = copy.deepcopy(prepared)
        t = time.perf_counter()
        extra = {}
        if v == "vit":
            apply_vit_calibration(p, list(xc.split(args.calib_batch)),
                                  VitPTQConfig(search_images=args.search_images, n_candidates=args.n_candidates,
                                               rounds=args.rounds), progress=args.verbose)
            rep = p.meta["vit_ptq"]
            extra = {"search_s": rep["seconds"], "layers": rep["n_layers"],
                     "observers_replaced": rep["n_observers_replaced"]}
        t_method = time.perf_counter() - t
        c = pt2e.convert(p)
        conv[v] = c
        m = metrics(logits_of(c, xv), yv, ref)
        m.update(extra)
        m["calibration_s"] = t_obs + t_method
        rows[v] = m
        log(f"coreml w8a8 {v:8s} top1 {m['top1']:.2f}  agree {m['agree_fp32']:.2f}  sqnr {m['sqnr_fp32_db']:.2f} dB")
    # the searched activation scales are in the Core ML program
    t = time.perf_counter()
    ep = torch.export.export(conv["vit"], (xv[:1],)).run_decompositions({})
    ml = ct.convert(ep, convert_to="mlprogram", inputs=[ct.TensorType(name="image", shape=tuple(xv[:1].shape))],
                    minimum_deployment_target=ct.target.iOS17)
    mil = _mil_quant_scales(ml)

    def scales(g):
        return sorted({float(n.args[1]) for n in g.graph.nodes
                       if n.op == "call_function" and str(n.target).endswith("quantize_per_tensor.default")
                       and "dequantize" not in str(n.target)})

    # The fp16 ML program stores its scales rounded to fp16 (relative error <= 2**-11): match within 1e-3.
    def found_in(vals):
        return sum(any(abs(m_ - s_) <= 1e-3 * s_ for m_ in mil) for s_ in vals)

    torch_scales, minmax_scales = scales(conv["vit"]), scales(conv["minmax"])
    searched = [s_ for s_ in torch_scales if all(abs(s_ - m_) > 1e-3 * s_ for m_ in minmax_scales)]
    minmax_only = [s_ for s_ in minmax_scales if all(abs(s_ - v_) > 1e-3 * s_ for v_ in torch_scales)]
    found, found_searched, found_minmax_only = found_in(torch_scales), found_in(searched), found_in(minmax_only)
    rows["vit"]["mlprogram_check"] = {
        "torch_activation_scales": len(torch_scales), "found_in_mil_quantize_ops": found,
        "searched_scales": len(searched), "searched_found": found_searched,
        "minmax_only_scales": len(minmax_only), "minmax_only_found": found_minmax_only,
        "mil_quantize_ops": len(mil), "tolerance_rel": 1e-3, "convert_s": time.perf_counter() - t}
    log(f"coreml w8a8: {found}/{len(torch_scales)} activation scales of the vit torch graph appear in the mlprogram's "
        f"{len(mil)} quantize ops (fp16-rounded, rel. 1e-3); of the {len(searched)} scales the search changed, "
        f"{found_searched} are in the program; of the {len(minmax_only)} min/max scales it replaced, "
        f"{found_minmax_only}")
    results["coreml_w8a8"] = rows


# --------------------------------------------------------------------------------------------- Core ML

def dir_size(p: Path) -> int:
    return artifact_size(p)


def coreml_mixed(model, xc, xv, yv, ref, args, results):
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    import torch

    from mobilevit_deploy.quantize.coreml_schemes import program_weights_reference
    from mobilevit_deploy.quantize.mixed_precision import MixedPrecisionConfig, plan_mixed_precision

    out_dir = Path(tempfile.mkdtemp(prefix="vit_ptq_coreml_"))
    t = time.perf_counter()
    ep = torch.export.export(model.eval(), (xv[:1],)).run_decompositions({})
    ml = ct.convert(ep, convert_to="mlprogram", inputs=[ct.TensorType(name="image", shape=tuple(xv[:1].shape))],
                    minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT16)
    log(f"coreml convert {time.perf_counter() - t:.1f}s")
    ml.save(str(out_dir / "fp16.mlpackage"))
    # the artifact's weights in PyTorch: the export stage's own read-back reference (the BN-folded graph,
    # every conv/linear weight checked against the uncompressed program, then replaced by the
    # compressed program's decompressed weights)
    base_ref = program_weights_reference(model, model.deploy_cfg)

    def eval_program(mlm):
        r = copy.deepcopy(base_ref)
        r.load_program_weights(ml, mlm)
        return metrics(logits_of(r, xv), yv, ref)

    rows = {}
    fp16 = eval_program(ml)
    fp16["size_bytes"] = dir_size(out_dir / "fp16.mlpackage")
    fp16["avg_bits"] = 16.0
    rows["fp16"] = fp16
    for b in (8, 6, 4):
        cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=b))
        t = time.perf_counter()
        mlp = cto.palettize_weights(ml, cfg)
        r = eval_program(mlp)
        mlp.save(str(out_dir / f"uniform{b}.mlpackage"))
        r["size_bytes"] = dir_size(out_dir / f"uniform{b}.mlpackage")
        r["avg_bits"] = float(b)
        r["palettize_s"] = time.perf_counter() - t
        rows[f"uniform {b}-bit"] = r
        log(f"uniform {b}: {r['size_bytes'] / 1e6:.3f} MB top1 {r['top1']:.2f} sqnr {r['sqnr_fp32_db']:.2f}")
    # sensitivity images: "first" = the first N calibration images (class-grouped folder order: the first
    # classes only); "spread" = N evenly spaced over the calibration set (every class, as the export
    # stage's class-balanced calibration loader gives)
    sens_sets = []
    for pick in args.sensitivity_pick:
        for n in args.sensitivity_images:
            idx = list(range(n)) if pick == "first" else [int(i * xc.shape[0] / n) for i in range(n)]
            sens_sets.append((f"{pick} {n}", xc[idx]))
    for budget in args.budgets:
        for err_model in ("measured", "ideal") if args.ablations else ("measured",):
            for sens_name, xs in sens_sets:
                t = time.perf_counter()
                plan = plan_mixed_precision(model, ml, list(xs.split(args.calib_batch)),
                                            MixedPrecisionConfig(budget_avg_bits=budget, error_model=err_model,
                                                                 sensitivity_images=xs.shape[0]))
                # sensitivities are keyed by the unfolded model's names, which equal the folded copy's
                mlp = cto.palettize_weights(ml, plan.config)
                t_plan = time.perf_counter() - t
                r = eval_program(mlp)
                name = f"mixed {budget:g} ({err_model}, sensitivity: {sens_name} images)"
                fname = f"mixed{budget:g}_{err_model}_{sens_name.replace(' ', '')}.mlpackage"
                mlp.save(str(out_dir / fname))
                r["size_bytes"] = dir_size(out_dir / fname)
                r["sensitivity_images"] = sens_name
                r["avg_bits"] = plan.avg_bits
                r["plan"] = plan.describe()
                r["bits"] = plan.bits
                r["plan_and_palettize_s"] = t_plan
                rows[name] = r
                log(f"{name}: {r['size_bytes'] / 1e6:.3f} MB avg {plan.avg_bits:.2f} bits top1 {r['top1']:.2f} "
                    f"sqnr {r['sqnr_fp32_db']:.2f} {plan.describe()['histogram']}")
    results["coreml"] = rows


# -------------------------------------------------------------------------------------------- reporting

def markdown(results) -> str:
    out = []
    m = results["model"]
    out.append(f"### {m} ({results['weights']})\n")
    out.append(f"fp32 top-1 on {results['val_images']} val images: **{results['fp32_top1']:.2f} %**; calibration: "
               f"{results['calib_images']} train images (observation pass {results['observation_s']:.1f} s).\n")
    cmds = results.get("section_commands") or {k: results["command"] for k in SECTIONS if k in results}
    for c in dict.fromkeys(cmds.values()):
        out.append(f"- `{c}`: {', '.join(k for k, v in cmds.items() if v == c)}")
    out.append("")
    if "w8a8" in results:
        out.append("| W8A8 (XNNPACK quantizer, torch q/dq graph) | top-1 % | top-1 agreement w/ fp32 % "
                   "| SQNR vs fp32 dB | calibration time s | vs histogram: fixed / broken images (McNemar p) |")
        out.append("|---|---:|---:|---:|---:|---:|")
        base = results["w8a8"].get("histogram")
        for k, r in results["w8a8"].items():
            pair = ""
            if base is not None and k != "histogram" and "pred" in r and "pred" in base:
                f, b_, pv = paired(base["pred"], r["pred"], results["labels"])
                pair = f"{f} / {b_} (p={pv:.2f})"
            out.append(f"| {k} | {r['top1']:.2f} | {r['agree_fp32']:.2f} | {r['sqnr_fp32_db']:.2f} | "
                       f"{r['calibration_s']:.1f} | {pair} |")
        out.append("")
    if "pte" in results:
        out.append("| lowered XNNPACK .pte (ExecuTorch runtime) | images | size MB | top-1 % "
                   "| agreement w/ its torch graph % | SQNR vs its torch graph dB "
                   "| SQNR vs the other calibration's graph dB | SQNR vs fp32 dB |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, r in results["pte"].items():
            out.append(f"| {k} | {r['images']} | {r['size_bytes'] / 1e6:.3f} | {r['top1']:.2f} | "
                       f"{r['agree_torch']:.2f} | {r['sqnr_torch_db']:.1f} | "
                       f"{r.get('sqnr_vs_other_torch_db', float('nan')):.1f} | {r['sqnr_fp32_db']:.2f} |")
        out.append("")
    if "coreml_w8a8" in results:
        out.append("| Core ML W8A8 (CoreMLQuantizer, torch q/dq graph) | top-1 % | top-1 agreement w/ fp32 % "
                   "| SQNR vs fp32 dB | calibration time s |")
        out.append("|---|---:|---:|---:|---:|")
        for k, r in results["coreml_w8a8"].items():
            pair = ""
            if k != "minmax" and "pred" in r:
                f, b_, pv = paired(results["coreml_w8a8"]["minmax"]["pred"], r["pred"], results["labels"])
                pair = f" (vs minmax: {f} fixed / {b_} broken, McNemar p={pv:.2f})"
            out.append(f"| {k}{pair} | {r['top1']:.2f} | {r['agree_fp32']:.2f} | {r['sqnr_fp32_db']:.2f} | "
                       f"{r['calibration_s']:.1f} |")
        chk = results["coreml_w8a8"]["vit"].get("mlprogram_check")
        if chk:
            out.append(f"\nvit graph converted to an iOS17 fp16 mlprogram: {chk['found_in_mil_quantize_ops']} of its "
                       f"{chk['torch_activation_scales']} distinct activation scales appear in the program's "
                       f"{chk['mil_quantize_ops']} `quantize` ops (matched within the fp16 rounding of the stored "
                       f"scales, rel. 1e-3); of the {chk.get('searched_scales', '?')} scales the search changed, "
                       f"{chk.get('searched_found', '?')} are in the program, and of the "
                       f"{chk.get('minmax_only_scales', '?')} min/max scales they replaced, "
                       f"{chk.get('minmax_only_found', '?')}.")
        out.append("")
    if "coreml" in results:
        out.append("| Core ML weights (fp16 program, k-means palettization) | avg weight bits | .mlpackage MB "
                   "| top-1 % | agreement w/ fp32 % | SQNR vs fp32 dB |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for k, r in results["coreml"].items():
            out.append(f"| {k} | {r['avg_bits']:.2f} | {r['size_bytes'] / 1e6:.3f} | {r['top1']:.2f} | "
                       f"{r['agree_fp32']:.2f} | {r['sqnr_fp32_db']:.2f} |")
        out.append("")
    return "\n".join(out)


SECTIONS = ("w8a8", "pte", "coreml_w8a8", "coreml")


def merge_results(runs: list[dict]) -> dict:
    """Sections of several runs of one model on the same data; each section keeps the command that measured it."""
    out = dict(runs[0])
    for r in runs:
        if (r["model"], r["weights"], r["val_images"], r["labels"]) != (out["model"], out["weights"],
                                                                          out["val_images"], out["labels"]):
            raise ValueError(f"--from-json: runs of different models or data ({r['model']}, {r['weights']})")
        for k in SECTIONS:
            if k in r:
                out[k] = r[k]
                out.setdefault("section_commands", {})[k] = r["command"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mobilevit_xxs")
    ap.add_argument("--checkpoint", help="weights (.safetensors with a sibling .json deploy_cfg); default: shipped")
    ap.add_argument("--input-size", type=int, default=96, help="for a --checkpoint without a .json: input size")
    ap.add_argument("--crop-pct", type=float, default=1.0, help="for a --checkpoint without a .json")
    ap.add_argument("--calib-dir", default=str(REPO.parent / "shared/data/cifar10/train"))
    ap.add_argument("--val-dir", default=str(REPO.parent / "shared/data/cifar10/val"))
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--calib-batch", type=int, default=32)
    ap.add_argument("--val-size", type=int, default=None, help="default: the whole folder")
    ap.add_argument("--search-images", type=int, default=64)
    ap.add_argument("--n-candidates", type=int, default=36)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pte", action="store_true", help="also lower histogram and vit to XNNPACK .pte and run them")
    ap.add_argument("--pte-images", type=int, default=1000)
    ap.add_argument("--pte-dir")
    ap.add_argument("--coreml-mixed", action="store_true")
    ap.add_argument("--coreml-w8a8", action="store_true", help="CoreMLQuantizer W8A8: min/max vs vit (torch-side)")
    ap.add_argument("--no-w8a8", action="store_true")
    ap.add_argument("--budgets", type=float, nargs="*", default=[5.0, 6.0, 7.0])
    ap.add_argument("--sensitivity-images", type=int, nargs="+", default=[32],
                    help="images for the mixed-precision sensitivity pass (default 32, the export stage's)")
    ap.add_argument("--sensitivity-pick", nargs="+", choices=["first", "spread"], default=["spread"],
                    help="which calibration images: the first N (folder order) or N evenly spaced (default)")
    ap.add_argument("--variants", nargs="*", choices=["histogram", "minmax", "vit", "vit-fp-inputs", "vit-no-bias-corr",
                                                      "vit-no-rank"],
                    help="W8A8 variants (default: histogram minmax vit)")
    ap.add_argument("--ablations", action="store_true",
                    help="vit without bias correction / ranking loss; ideal error model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--from-json", nargs="+", metavar="FILE",
                    help="print the tables of earlier --json runs of one model (later files win per section) "
                         "and measure nothing; with --json, write the merged run")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.from_json:
        merged = merge_results([json.loads(Path(f).read_text()) for f in args.from_json])
        print(markdown(merged))
        if args.json:  # the merged run, each section with the command that measured it
            Path(args.json).write_text(json.dumps(merged, default=lambda o: str(o)) + "\n")
        return

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from mobilevit_deploy.pretrained import load_model

    if args.checkpoint:
        from mobilevit_deploy.pretrained import checkpoint_metadata

        found = checkpoint_metadata(args.checkpoint)
        if found is not None:
            meta = found[0]
            dcfg = None  # the checkpoint's own deploy_cfg
            weights = f"{args.checkpoint} ({meta.get('epochs')} epochs, recorded val top-1 {meta.get('val_top1')})"
        else:  # a raw training checkpoint: CIFAR-10 CPU-recipe preprocessing from the command line
            from dataclasses import replace

            from mobilevit_deploy.models import CIFAR10_LABELS, get_deploy_cfg

            dcfg = replace(get_deploy_cfg(args.model, num_classes=10, labels=CIFAR10_LABELS),
                           input_size=(3, args.input_size, args.input_size), crop_pct=args.crop_pct)
            weights = f"{args.checkpoint} (no metadata; input {args.input_size} px, crop_pct {args.crop_pct})"
        model = load_model(args.model, checkpoint=args.checkpoint, deploy_cfg=dcfg).module
    else:
        loaded = load_model(args.model)
        if not loaded.checkpoint.get("shipped"):
            raise SystemExit(f"no shipped weights for {args.model}: pass --checkpoint")
        meta = loaded.meta
        weights = f"{loaded.source} ({meta.get('epochs')} epochs, recorded val top-1 {meta.get('val_top1')})"
        model = loaded.module
    model.eval()
    cfg = model.deploy_cfg
    t = time.perf_counter()
    xv, yv, _ = load_split(args.val_dir, cfg, args.val_size)
    xc, _, calib_paths = load_split(args.calib_dir, cfg, args.calib_size)
    log(f"data {time.perf_counter() - t:.1f}s: val {tuple(xv.shape)}, calib {tuple(xc.shape)}")
    ref = logits_of(model, xv)
    results = {"model": args.model, "weights": weights, "val_images": int(xv.shape[0]),
               "calib_images": int(xc.shape[0]),
               "input_size": list(cfg.input_size), "fp32_top1": float((ref.argmax(-1) == yv).double().mean()) * 100,
               "command": " ".join(["python", "-m", "benchmarks.vit_ptq_table"]
                                   + (argv if argv is not None else sys.argv[1:])),
               "torch_threads": args.threads, "observation_s": float("nan"), "labels": yv.tolist(),
               "fp32_pred": ref.argmax(-1).tolist()}
    log(f"fp32 top1 {results['fp32_top1']:.2f}")
    def save():  # after every section, so a later section's failure keeps what was measured
        if args.json:
            Path(args.json).write_text(json.dumps(results, default=lambda o: str(o)) + "\n")

    if not args.no_w8a8:
        converted = w8a8(model, xc, xv, yv, ref, args, results)
        save()
        if args.pte:
            pte_check(converted, xv, yv, ref, args, results)
            save()
    if args.coreml_w8a8:
        coreml_w8a8(model, xc, xv, yv, ref, args, results)
        save()
    if args.coreml_mixed:
        coreml_mixed(model, xc, xv, yv, ref, args, results)
        save()
    print(markdown(results))


if __name__ == "__main__":
    main()
