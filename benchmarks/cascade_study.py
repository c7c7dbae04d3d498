"""Cascade study: top-1 vs mean ExecuTorch latency per image over exit thresholds (issue 14, CF-ViT as a
plain two-resolution cascade), for the default model.

    python -m benchmarks.cascade_study --data ../shared/data/cifar10/val [--limit 1000] \
        [--cascades 32,64 48,64] [--max-drop 0.5] [--threads 1] [--model mobilevit_xxs] [--checkpoint PATH] \
        [--no-coreml] [--out benchmarks]

For every cascade (stage sizes S1,S2, or exitK: the depth cascade with the shipped exit head, measured against
the whole model alone):
1. `export_model(..., ExportConfig("executorch", cascade=CascadeSpec(sizes, exit_data=DATA, max_drop)))`:
   the same path as `python -m mobilevit_deploy.export --target executorch --cascade S1,S2 --exit-data DATA`
   (one .pte, one XNNPACK method per stage; the threshold chosen through the .pte on DATA).
2. Every image of DATA (--limit: that many, evenly spread, the `evaluate --limit` pick) is prepared once at
   every stage size; every stage runs alone over all of them (per-stage top-1 and the probabilities for the
   simulated curve).
3. For a set of thresholds (0 = stage 1 always answers, the exit-rate quantiles 10..90 % of stage 1's max
   probability, the chosen one, 1.0), `cascade_eval.measure_cascade` runs the cascade and the last stage
   alone over every image in the same run (streams over blocks of 20 images, back to back per block, best
   of 3 passes per block): top-1, exit rates, mean latency per image of both.
   The curve beside the measured points is the simulated one (every distinct threshold, top-1 from the
   per-stage probabilities, latency = sum_i P(reach stage i) x stage i's mean latency, with stage 1's
   latency measured at threshold 0 and the last stage's alone).
4. With coremltools' multi-function API, the Core ML cascade package is exported too (iOS 18) and its
   size recorded against the separate per-stage packages.

Writes OUT/cascade_<model>.md (tables), .json (everything, incl. `lscpu` flags and the command) and .png
(top-1 vs mean latency). Latency is model time (the runtime's calls and the exit decision; preprocessing
is outside the timed region), batch 1, --threads ExecuTorch threads (default 1: on this 2-core machine
another job holds one core).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cascade_study", description=__doc__.splitlines()[0])
    p.add_argument("--data", help="ImageFolder of the model's classes (e.g. ../shared/data/cifar10/val)")
    p.add_argument("--render", metavar="JSON", help="only re-write the .md and .png of an earlier run's JSON")
    p.add_argument("--limit", type=int, default=1000, help="images of --data, evenly spread (default 1000)")
    p.add_argument("--cascades", nargs="+", default=["32,64", "48,64"],
                   help="stage sizes per cascade, or exitK for the depth cascade (default 32,64 48,64)")
    p.add_argument("--max-drop", type=float, default=0.5,
                   help="top-1 points the chosen threshold may lose (default 0.5)")
    p.add_argument("--threads", type=int, default=1, help="ExecuTorch threads (default 1)")
    p.add_argument("--model", default="mobilevit_xxs")
    p.add_argument("--checkpoint", default=None, help="weights (default: the shipped weights of --model)")
    p.add_argument("--no-coreml", action="store_true", help="skip the Core ML multi-function package size")
    p.add_argument("--baseline", default=None, metavar="CKPT",
                   help="beside a depth cascade, the simple alternative: a smaller model trained from scratch "
                        "(CKPT with its model.json); its .pte is timed and scored on the same prepared images in the "
                        "same run, against the same whole model")
    p.add_argument("--out", default="benchmarks", help="output directory (default benchmarks/)")
    p.add_argument("--artifacts", default=None, help="keep the exported artifacts here (default: a temporary dir)")
    return p.parse_args(argv)


def cpu_info() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        out = ""
    info = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return {"model_name": info.get("Model name"), "cpus": info.get("CPU(s)"), "flags": info.get("Flags", "").split(),
            "load_avg_1min_at_start": round(os.getloadavg()[0], 2), "platform": platform.platform()}


def sweep_thresholds(stage1_max, chosen: float) -> list[float]:
    import numpy as np

    qs = np.quantile(stage1_max, [0.1, 0.25, 0.5, 0.75, 0.9])  # exit rates ~90 % .. 10 %
    ts = {0.0, 1.0, round(float(chosen), 6)} | {round(float(q), 6) for q in qs}
    return sorted(ts)


def cascade_spec(value: str, **kw):
    """The CascadeSpec of a --cascades value: "32,64" (stage sizes) or "exit3" (depth cascade)."""
    from mobilevit_deploy.export.cascade import CascadeSpec

    spec = CascadeSpec.from_value(value)
    return CascadeSpec(spec.sizes, exit_after=spec.exit_after, **kw)


def stage_labels(c: dict) -> list[str]:
    """How the report names each stage: its size for a size cascade, its method for a depth cascade."""
    return [f"{s} px" for s in c["sizes"]] if c["sizes"] else list(c["stages"])


def study_cascade(value: str, args, source, art_dir: Path) -> dict:
    import numpy as np

    from mobilevit_deploy.cascade import simulate, softmax
    from mobilevit_deploy.cascade_eval import labelled_images, measure_cascade
    from mobilevit_deploy.export import ExportConfig, export_model
    from mobilevit_deploy.runtime import load_cascade

    spec = cascade_spec(value, exit_data=args.data, max_drop=args.max_drop, exit_limit=args.limit)
    t = time.perf_counter()
    res = export_model(source, ExportConfig("executorch", cascade=spec), out_dir=art_dir,
                       log=lambda s: log(f"  export: {s}"))
    export_s = time.perf_counter() - t
    runner = load_cascade(res.artifact, num_threads=args.threads)
    paths, ys = labelled_images(args.data, runner.deploy_cfg.class_labels, args.limit)
    log(f"  preparing {len(paths)} images for {', '.join(runner.stage_names)}")
    inputs = [runner.prepare_all(p) for p in paths]
    probs = [softmax(np.concatenate([runner.run_stage(0, xs[0]).numpy() for xs in inputs]))]
    if spec.depth:  # the rest answers with the whole model's logits
        probs.append(softmax(np.concatenate([runner.alone.run_one(xs[runner.alone_input]).numpy() for xs in inputs])))
    else:
        for i in range(1, len(spec.sizes)):
            probs.append(softmax(np.concatenate([runner.run_stage(i, xs[i]).numpy() for xs in inputs])))
    y = np.asarray(ys)
    stage_top1 = [100.0 * float((p.argmax(1) == y).mean()) for p in probs]
    chosen = float(res.manifest["cascade"]["exit_rule"]["threshold"])
    measured = []
    for thr in sweep_thresholds(probs[0].max(1), chosen):
        m = measure_cascade(runner, inputs, ys, threshold=thr)
        measured.append(m.to_dict())
        log(f"  threshold {thr:.4f}: top-1 {m.top1:.2f} %, exit {m.exit_rates[0] * 100:.1f} %, cascade "
            f"{m.mean_latency_ms:.3f} ms, {runner.alone_what} {m.last_stage_latency_ms:.3f} ms "
            f"({m.latency_ratio:.2f}x)")
    # simulated curve: per-stage latency from the measured extremes (threshold 0: stage 1 only)
    t0 = next(m for m in measured if m["threshold"] == 0.0)
    last_ms = float(np.median([m["last_stage_latency_ms"] for m in measured]))
    if spec.depth:  # stage 2 (the rest) costs what threshold 1 (exit + rest for every image) adds to the exit
        t1 = next(m for m in measured if m["threshold"] == 1.0)
        stage_ms = [t0["mean_latency_ms"], t1["mean_latency_ms"] - t0["mean_latency_ms"]]
    else:
        stage_ms = [t0["mean_latency_ms"], last_ms]
    cands = np.unique(np.concatenate([[0.0, 1.0 + 1e-6], probs[0].max(1)]))
    curve = []
    for thr in cands:
        o = simulate(probs, ys, float(thr))
        curve.append({"threshold": float(min(thr, 1.0)), "top1": o.top1, "exit_rate": o.exit_rates[0],
                      "expected_latency_ms": o.cost(stage_ms)})
    baseline = study_baseline(args, runner, inputs, ys, art_dir) if spec.depth and args.baseline else None
    return {"sizes": list(spec.sizes), "label": value, "kind": runner.kind, "stages": runner.stage_names,
            "baseline": baseline,
            "alone": runner.alone_what, "alone_ms_median": last_ms, "artifact": res.artifact.name,
            "artifact_bytes": res.manifest["artifact"]["size_bytes"],
            "export_s": round(export_s, 1), "manifest_cascade": res.manifest["cascade"],
            "ops_not_delegated": res.manifest["ops_not_delegated"], "verification": res.manifest["verification"],
            "images": len(ys), "stage_top1": stage_top1, "chosen_threshold": chosen, "measured": measured,
            "stage_latency_ms_for_curve": stage_ms, "curve": curve, "threads": runner.num_threads}


class _Alone:
    """One model as a one-stage 'cascade' over the depth cascade's prepared inputs, so that
    `measure_cascade` times it against the same whole model, on the same images, in the same way."""

    def __init__(self, run, cascade_runner):
        self.stages, self.stage_names, self.threshold = [run], ["baseline"], 0.0
        self.alone, self.alone_input = cascade_runner.alone, cascade_runner.alone_input
        self.alone_what, self.num_threads = cascade_runner.alone_what, cascade_runner.num_threads

    def run_prepared(self, inputs):
        from mobilevit_deploy.runtime import CascadeAnswer

        return CascadeAnswer(self.stages[0].run_one(inputs[self.alone_input]), 0, "baseline", ())


def study_baseline(args, runner, inputs, ys, art_dir: Path) -> dict:
    """The smaller from-scratch model of --baseline through its own .pte, beside the depth cascade."""
    from mobilevit_deploy.bench.flops import count_flops
    from mobilevit_deploy.cascade_eval import measure_cascade
    from mobilevit_deploy.export import ExportConfig, export_model
    from mobilevit_deploy.pretrained import load_model
    from mobilevit_deploy.runtime import ExecuTorchRunner

    lm = load_model(args.model, checkpoint=args.baseline)
    want = runner.stage_cfgs[0]
    if (lm.deploy_cfg.image_size, lm.deploy_cfg.mean, lm.deploy_cfg.std) != (want.image_size, want.mean, want.std):
        raise SystemExit(f"error: --baseline {args.baseline} takes other inputs ({lm.deploy_cfg.image_size}) than "
                         f"the cascade ({want.image_size})")
    res = export_model(lm, ExportConfig("executorch"), out_dir=art_dir / "baseline",
                       log=lambda s: log(f"  baseline export: {s}"))
    m = measure_cascade(_Alone(ExecuTorchRunner(res.artifact), runner), inputs, ys)
    log(f"  baseline {args.baseline}: top-1 {m.top1:.2f} %, {m.mean_latency_ms:.3f} ms, {runner.alone_what} "
        f"{m.last_stage_latency_ms:.3f} ms ({m.latency_ratio:.2f}x)")
    return {"checkpoint": args.baseline, "recipe": lm.meta.get("recipe"), "epochs": lm.meta.get("epochs"),
            "params": sum(p.numel() for p in lm.module.parameters()),
            "gflops": count_flops(lm.module, want.image_size)["gflops"],
            "pte_bytes": res.manifest["artifact"]["size_bytes"],
            "verification_passed": res.manifest["verification"]["passed"], **m.to_dict()}


def coreml_sizes(value: str, source, art_dir: Path) -> dict:
    import coremltools as ct

    from mobilevit_deploy.export import ExportConfig, export_model

    if not hasattr(ct.utils, "save_multifunction"):
        return {"skipped": f"coremltools {ct.__version__} has no multi-function API"}
    res = export_model(source, ExportConfig("coreml", cascade=cascade_spec(value)), out_dir=art_dir,
                       log=lambda s: log(f"  export: {s}"))
    return {"sizes": list(cascade_spec(value).sizes), "label": value, "artifact": res.artifact.name,
            **res.manifest["coreml_multifunction"],
            "minimum_deployment_target": res.manifest["minimum_deployment_target"]}


def plot(doc: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for c, col in zip(doc["cascades"], colors):
        lab = c.get("label") or ",".join(map(str, c["sizes"]))
        xs = [p["expected_latency_ms"] for p in c["curve"]]
        ax.plot(xs, [p["top1"] for p in c["curve"]], color=col, alpha=0.5, lw=1,
                label=f"{lab}: simulated over all thresholds")
        ax.scatter([m["mean_latency_ms"] for m in c["measured"]], [m["top1"] for m in c["measured"]], color=col,
                   zorder=3, label=f"{lab}: measured (.pte, {c['images']} images)")
        ch = next(m for m in c["measured"] if abs(m["threshold"] - c["chosen_threshold"]) < 1e-6)
        ax.scatter([ch["mean_latency_ms"]], [ch["top1"]], color=col, marker="*", s=180, zorder=4, edgecolor="k")
        b = c.get("baseline")
        if b:
            ax.scatter([b["mean_latency_ms"]], [b["top1"]], color=col, marker="X", s=90, zorder=4, edgecolor="k",
                       label=f"{lab}: smaller model from scratch ({b['params'] / 1e3:.0f}k params)")
        ax.scatter([c.get("alone_ms_median", c["stage_latency_ms_for_curve"][-1])], [c["stage_top1"][-1]], color=col,
                   marker="s", zorder=4, edgecolor="k",
                   label=f"{lab}: {c.get('alone', 'last stage')} alone (median over the rows)")
    ax.set_xlabel("mean ExecuTorch latency per image (ms, model time)")
    ax.set_ylabel(f"top-1 % on {doc['data']}")
    ax.set_title(f"{doc['model']} coarse-to-fine cascade (star: threshold chosen at max drop {doc['max_drop']:g})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(doc: dict) -> str:
    out = [f"# Coarse-to-fine cascade: {doc['model']}", "",
           f"Measured {doc['created']} by `{doc['command']}` ({doc['elapsed_s']:.0f} s).", "",
           f"Weights: {doc['weights']}. Data: {doc['data']} ({doc['cascades'][0]['images'] if doc['cascades'] else 0} "
           f"images). ExecuTorch XNNPACK, batch 1, {doc['threads']} thread(s); latency = mean model time per image "
           "(the runtime's calls + the exit decision; preprocessing outside), the cascade and the last stage alone "
           "each run as a stream over blocks of 20 images, timed back to back per block in the same run, best of 3 "
           "passes per block (cascade_eval.measure_cascade).", "",
           f"CPU: {doc['cpu']['model_name']} ({doc['cpu']['cpus']} CPUs, load average "
           f"{doc['cpu']['load_avg_1min_at_start']} at start). lscpu flags: `{' '.join(doc['cpu']['flags'])}`", ""]
    for c in doc["cascades"]:
        sel = c["manifest_cascade"]["threshold_selection"]
        alone = c.get("alone", "last stage")
        out += [f"## Cascade {c.get('label') or ','.join(map(str, c['sizes']))} (`{c['artifact']}`, "
                f"{c['artifact_bytes'] / 1e6:.2f} MB)", "",
                "Top-1 alone: " + ", ".join(f"{s} {t:.2f} %" for s, t in zip(stage_labels(c), c["stage_top1"]))
                + f". Chosen threshold {c['chosen_threshold']:.4f} (lowest within {sel['max_drop_points']:g} points of "
                f"the {alone} alone, chosen through the .pte on {sel['images']} images)"
                + (" -- no threshold below 1 qualifies: capped at 1.0" if sel.get("no_exit") else "") + ". "
                + f"Ops outside the delegate: {', '.join(c['ops_not_delegated']) or 'none'}.", "",
                f"| threshold | exit rate stage 1 | top-1 % | {alone} alone top-1 % | mean latency ms | "
                f"{alone} alone ms | ratio |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m in c["measured"]:
            star = " (chosen)" if abs(m["threshold"] - c["chosen_threshold"]) < 1e-6 else ""
            out.append(f"| {m['threshold']:.4f}{star} | {m['exit_rates'][0] * 100:.1f} % | {m['top1']:.2f} | "
                       f"{m['last_stage_top1']:.2f} | {m['mean_latency_ms']:.3f} | {m['last_stage_latency_ms']:.3f} | "
                       f"{m['latency_ratio']:.2f} |")
        out += [""] + observations(c, doc["max_drop"])
        b = c.get("baseline")
        if b:
            out.append(f"- the simple alternative, a smaller model trained from scratch (`{b['checkpoint']}`, "
                       f"{b['params']:,} parameters, {b['gflops']:.3f} GFLOPs, recipe `{b['recipe']}`, "
                       f"{b['epochs']} epochs; its own .pte, {b['pte_bytes'] / 1e6:.2f} MB): top-1 {b['top1']:.2f} %, "
                       f"{b['mean_latency_ms']:.3f} ms per image = {b['latency_ratio']:.2f}x the {b['alone']} alone "
                       f"({b['last_stage_latency_ms']:.3f} ms, {b['last_stage_top1']:.2f} %) on the same images, "
                       "same run")
        out += [""]
    cm = doc.get("coreml")
    if cm:
        out += ["## Core ML multi-function package", ""]
        for c in cm:
            if "skipped" in c:
                out.append(f"- skipped: {c['skipped']}")
                continue
            sep = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in c["separate_packages_bytes"].items())
            lab = c.get("label") or ",".join(map(str, c["sizes"]))
            out.append(f"- {lab}: `{c['artifact']}` {c['size_bytes'] / 1e6:.2f} MB "
                       f"({c['minimum_deployment_target']}) vs separate packages {sep} (total "
                       f"{c['separate_packages_total_bytes'] / 1e6:.2f} MB): {c['size_ratio_vs_separate']:.2f}x")
        out.append("")
    out += [f"![top-1 vs latency]({doc['plot']})", ""]
    return "\n".join(out)


def observations(c: dict, max_drop: float) -> list[str]:
    """Derived figures of one cascade, from its measured rows."""
    ms = {m["threshold"]: m for m in c["measured"]}
    if 0.0 not in ms or 1.0 not in ms:
        return []
    s1, both = ms[0.0]["mean_latency_ms"], ms[1.0]["mean_latency_ms"]
    ok = [m for m in c["measured"] if m["top1"] >= m["last_stage_top1"] - max_drop - 1e-9]
    best = min(ok, key=lambda m: m["latency_ratio"]) if ok else None
    alone = c.get("alone", "last stage")
    out = [f"- stage 1 alone ({stage_labels(c)[0]}, threshold 0): {s1:.3f} ms per image = "
           f"{s1 / ms[0.0]['last_stage_latency_ms']:.2f}x the {alone} alone in the same rows"]
    if c.get("kind") == "depth":
        out.append(f"- every image through exit and rest (threshold 1): {both:.3f} ms = "
                   f"{both / ms[1.0]['last_stage_latency_ms']:.2f}x the {alone} alone (the exit head's cost plus the "
                   "switch between the two methods)")
    else:
        out.append(f"- every image through both stages (threshold 1): {both:.3f} ms = stage 1 + last stage + "
                   f"{both - s1 - ms[1.0]['last_stage_latency_ms']:.3f} ms per image of switching between the two "
                   "methods (measured minus the two streams' times)")
    if best is not None:
        out.append(f"- fastest measured row within {max_drop:g} top-1 points of the {alone} alone: threshold "
                   f"{best['threshold']:.4f}, {best['latency_ratio']:.2f}x the {alone} alone "
                   f"(issue 14 goal: <= 0.7x){'' if best['latency_ratio'] <= 0.7 else ' -- goal not met'}")
    return out


def render(doc: dict, out: Path, stem: str) -> str:
    plot(doc, out / f"{stem}.png")
    text = markdown(doc)
    (out / f"{stem}.md").write_text(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        p = Path(args.render)
        doc = json.loads(p.read_text())
        print(render(doc, p.parent, p.stem))
        return 0
    if not args.data:
        raise SystemExit("error: --data DIR is required (or --render JSON)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mobilevit_deploy.cli import quiet_toolchain

    quiet_toolchain()
    import torch

    from mobilevit_deploy.pretrained import load_model

    torch.set_num_threads(args.threads)
    started = time.time()
    cpu = cpu_info()
    loaded = load_model(args.model, checkpoint=args.checkpoint)
    weights = loaded.source + (f" (sha256 {loaded.checkpoint.get('sha256', '')[:12]})" if loaded.checkpoint else "")
    tmp = None
    if args.artifacts:
        art_dir = Path(args.artifacts)
        art_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="cascade_study_")
        art_dir = Path(tmp.name)
    try:
        cascades, coreml = [], []
        for c in args.cascades:
            log(f"cascade {c}")
            cascades.append(study_cascade(c, args, loaded, art_dir))
            if not args.no_coreml:
                coreml.append(coreml_sizes(c, loaded, art_dir))
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cascade_{args.model}"
    doc = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python -m benchmarks.cascade_study " + " ".join(
               shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
           "model": args.model, "weights": weights, "data": args.data, "max_drop": args.max_drop,
           "threads": args.threads, "cpu": cpu, "cascades": cascades, "coreml": coreml or None,
           "plot": f"{stem}.png", "elapsed_s": round(time.time() - started, 1)}
    from mobilevit_deploy.export.manifest import jsonable

    (out / f"{stem}.json").write_text(json.dumps(jsonable(doc), indent=1) + "\n")
    print(render(doc, out, stem))
    log(f"wrote {out / stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
