"""Token-reduction study: DeiT-Ti dense vs EViT / DynamicViT / Patch Slimming at keep rates 0.7 and 0.5.

    python -m benchmarks.token_reduction_study [--runs runs/tr_study] [--threads 1]

Input 32 x 32 with 4 px patches (64 patch tokens) on the shared 8,000-image CIFAR-10 subset
(../shared/data/cifar10: the 50k set does not fit this machine's budget). Steps, each skipped when its
output exists (so an interrupted run resumes):
  1. dense DeiT-Ti: `python -m mobilevit_deploy.train --recipe recipes/deit_tiny_cifar10.yaml`;
  2. Patch Slimming masks from 256 real training images (models/patch_slim.py) at each keep rate;
  3. every reduced variant fine-tuned briefly from the dense weights (recipes/deit_tiny_cifar10_finetune.yaml;
     DynamicViT with its losses and the dense model as teacher);
  4. each model exported to ExecuTorch (XNNPACK, verified against eager), its ops outside the delegate
     recorded; top-1 of every .pte on all 1,000 val images; MACs (bench/flops.py);
  5. .pte latency of all rows in ONE round-robin run (bench/timing.py), ratio vs dense paired per round.
  The topk formulation of EViT / DynamicViT at 0.7 is exported from the same weights to show what the
  textbook gather does to delegation and latency.
Writes benchmarks/token_reduction_deit_tiny.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = "../shared/data/cifar10"
BASE_KW = {"img_size": 32, "patch_size": 4}
RATES = (0.7, 0.5)
METHODS = ("evit", "dynamicvit", "patch_slim")
MODEL = "deit_tiny_patch16_224"


def _run(cmd: list[str], log: Path) -> float:
    """Run a command (cwd = repo), output to `log`; seconds taken. Raises on failure."""
    t0 = time.time()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(shlex.quote, cmd))} (see {log})")
    return time.time() - t0


def _train_cmd(out: Path, sets: list[str], recipe: str) -> list[str]:
    cmd = [sys.executable, "-m", "mobilevit_deploy.train", "--recipe", recipe, "--out", str(out), "--set",
           "progress=false"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _train_seconds(run: Path) -> float:
    m = json.loads((run / "metrics.json").read_text())
    return sum(r.get("epoch_time_s", 0) + r.get("val_time_s", 0) for r in m)


def _cpu_flags() -> list[str]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Flags:"):
            return line.split(":", 1)[1].split()
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.token_reduction_study")
    ap.add_argument("--runs", default="runs/tr_study")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9, help="round-robin timing rounds (default 9)")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per slot per round (default 20)")
    ap.add_argument("--reuse-artifacts", action="store_true",
                    help="reuse the .pte (and its measured top-1) of an earlier run in RUNS/artifacts: re-time only")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(a.threads)
    from mobilevit_deploy.bench import stats
    from mobilevit_deploy.bench.flops import count_flops
    from mobilevit_deploy.bench.harness import bench_input
    from mobilevit_deploy.bench.runners import executorch_runner
    from mobilevit_deploy.bench.timing import Timed, time_round_robin
    from mobilevit_deploy.evaluate import evaluate
    from mobilevit_deploy.export import ExportConfig, ModelSource, export_model
    from mobilevit_deploy.export.executorch import inspect_pte
    from mobilevit_deploy.models.patch_slim import calibrate_patch_slimming, load_calibration_images, record_kwargs
    from mobilevit_deploy.pretrained import load_model

    runs = ROOT / a.runs
    runs.mkdir(parents=True, exist_ok=True)
    args_s = " ".join(map(shlex.quote, argv or sys.argv[1:]))
    doc: dict = {"model": MODEL, "input": "32x32, patch 4 (64 patch tokens)", "data": DATA,
                 "command": f"python -m benchmarks.token_reduction_study {args_s}".strip(),
                 "commands": {}, "rows": {}}
    # 1. dense
    dense = runs / "dense"
    cmd = _train_cmd(dense, [], "recipes/deit_tiny_cifar10.yaml")
    doc["commands"]["dense"] = " ".join(map(shlex.quote, cmd[1:]))
    if not (dense / "model.safetensors").is_file():
        print("training dense DeiT-Ti ...", flush=True)
        _run(cmd, runs / "dense.log")
    dense_ckpt = dense / "model.safetensors"
    dense_model = load_model(MODEL, checkpoint=dense_ckpt, model_kwargs=BASE_KW).module
    dcfg = dense_model.deploy_cfg

    # 2. Patch Slimming masks from real calibration images
    slim = {}
    for r in RATES:
        p = runs / f"patch_slim_{r}.json"
        if not p.is_file():
            x, note = load_calibration_images(f"{DATA}/train", dcfg, a.calib_size)
            rec = calibrate_patch_slimming(dense_model, x, r, data_note=note)
            p.write_text(json.dumps(rec))
        slim[r] = json.loads(p.read_text())
        eps = slim[r]["patch_slim"]["epsilon"]
        print(f"patch slimming {r}: counts {slim[r]['slim_counts']} eps {eps:.3f}", flush=True)

    # 3. fine-tune each reduced variant
    variants = {"dense": (dense_ckpt, {})}
    for method in METHODS:
        for r in RATES:
            key = f"{method}_{r}"
            if method == "patch_slim":
                kw = {**BASE_KW, **record_kwargs(slim[r]), "keep_rate": r}
            else:
                kw = {**BASE_KW, "keep_rate": r, "token_reduction": method}
            sets = [f"model.init_checkpoint={dense_ckpt.relative_to(ROOT)}", f"model.kwargs={json.dumps(kw)}"]
            if method == "dynamicvit":
                sets += [f"distill.teacher={MODEL}", f"distill.teacher_checkpoint={dense_ckpt.relative_to(ROOT)}",
                         f"distill.teacher_kwargs={json.dumps(BASE_KW)}", "distill.kd_weight=0.5",
                         "distill.token_weight=0.5"]
            out = runs / key
            cmd = _train_cmd(out, sets, "recipes/deit_tiny_cifar10_finetune.yaml")
            shown = [c if "slim_order" not in c else c[:60] + "...}  (the calibration record)" for c in cmd[1:]]
            doc["commands"][key] = " ".join(map(shlex.quote, shown))
            if not (out / "model.safetensors").is_file():
                print(f"fine-tuning {key} ...", flush=True)
                _run(cmd, runs / f"{key}.log")
            variants[key] = (out / "model.safetensors", {})
    for method in ("evit", "dynamicvit"):  # the textbook gather, same weights
        variants[f"{method}_0.7_topk"] = (runs / f"{method}_0.7" / "model.safetensors", {"gather": "topk"})

    # 4. export, ops outside the delegate, top-1 of the .pte, MACs
    art = runs / "artifacts"
    slots, rows = [], {}
    x = bench_input(dcfg)
    cfg = ExportConfig.from_dict({"target": "executorch"})
    for key, (ckpt, extra) in variants.items():
        kw = {**BASE_KW, **extra} if key == "dense" else extra
        model = load_model(MODEL, checkpoint=ckpt, model_kwargs=kw).module
        macs = count_flops(model, (32, 32))["gflops"] / 2 * 1e3
        pte, top1_file = art / f"deit_tiny_{key}.pte", art / f"deit_tiny_{key}.top1.json"
        if a.reuse_artifacts and pte.is_file() and top1_file.is_file():
            from types import SimpleNamespace

            m = json.loads((art / f"deit_tiny_{key}.pte.json").read_text())
            res = SimpleNamespace(artifact=pte, manifest=m)
            ev = SimpleNamespace(**json.loads(top1_file.read_text()))
        else:
            res = export_model(ModelSource(f"deit_tiny_{key}", module=model), cfg, out_dir=art, log=None)
            m = res.manifest
            ev = evaluate(f"{DATA}/val", artifact=res.artifact, progress=False, threads=a.threads)
            top1_file.write_text(json.dumps({"top1": ev.top1, "total": ev.total}))
        train_s = _train_seconds(ckpt.parent)
        partitions = len(inspect_pte(res.artifact)["delegates"])
        rows[key] = {"checkpoint": str(ckpt.relative_to(ROOT)), "model_kwargs": {k: v for k, v in model_kwargs_of(
            ckpt, extra).items() if k not in ("slim_order",)}, "token_counts": model.token_counts,
            "mmacs": round(macs, 2), "top1": round(ev.top1, 2), "val_images": ev.total,
            "ops_outside": m.get("ops_not_delegated_counts") or {o: 1 for o in m["ops_not_delegated"]},
            "xnnpack_partitions": partitions, "verified": m["verification"]["passed"],
            "sqnr_db": m["verification"].get("sqnr_db"),
            "artifact": str(res.artifact.relative_to(ROOT)), "train_s": round(train_s, 1)}
        print(f"{key}: {rows[key]['top1']} % top-1, {macs:.1f} MMACs, outside {rows[key]['ops_outside']}", flush=True)
        slots.append(Timed(key, executorch_runner(res.artifact, x, a.threads).fn))

    # 5. latency, one round-robin run
    load_before = os.getloadavg()
    time_round_robin(slots, None, warmup=5, rounds=a.rounds, iters=a.iters)
    dense_slot = slots[0]
    for s in slots:
        rows[s.key]["median_ms"] = round(stats.median(s.samples), 3)
        rows[s.key]["latency_ratio"] = round(stats.paired_ratio(s.round_medians, dense_slot.round_medians), 3)
        rows[s.key]["mac_ratio"] = round(rows[s.key]["mmacs"] / rows["dense"]["mmacs"], 3)
    flags = _cpu_flags()
    doc.update(rows=rows, threads=a.threads, load_avg_before_timing=load_before, load_avg_after=os.getloadavg(),
               cpu_model=_cpu_model(), cpu_flags=flags, rounds=a.rounds, iters=a.iters,
               patch_slim={str(r): {k: v for k, v in slim[r].items() if k != "slim_order"} for r in RATES},
               study_cpu_s=round(sum(r["train_s"] for k, r in rows.items() if not k.endswith("topk")), 1),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    out = ROOT / "benchmarks"
    (out / "token_reduction_deit_tiny.json").write_text(json.dumps(doc, indent=1))
    (out / "token_reduction_deit_tiny.md").write_text(_markdown(doc))
    print(_markdown(doc))
    return 0


def model_kwargs_of(ckpt: Path, extra: dict) -> dict:
    from mobilevit_deploy.models.options import recorded_model_kwargs

    return {**recorded_model_kwargs(ckpt), **extra}


def _cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "?"


def _markdown(doc: dict) -> str:
    rows = doc["rows"]
    lines = [
        "# Token reduction on DeiT-Ti: dense vs EViT / DynamicViT / Patch Slimming (CIFAR-10 8k subset, 32 px)",
        "",
        f"Command: `{doc['command']}` ({doc['date']}). Model `{doc['model']}` (12 blocks, dim 192) at "
        f"{doc['input']}, trained on the 8,000-image subset `{doc['data']}/train`; top-1 of each exported `.pte` on "
        "the 1,000 images of `val`. Accuracies are LOW because of the CPU budget: the dense model trained one epoch "
        "from scratch, each reduced variant was fine-tuned on 320 images (10 steps); they compare the formulations "
        "under the same tiny budget, not the methods at convergence.",
        "",
        "| variant | patch tokens per block | MMACs | MAC ratio | top-1 % | .pte latency ratio vs dense (median ms) | "
        "XNNPACK partitions | ops outside the XNNPACK delegate |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for k, r in rows.items():
        tc = r["token_counts"]
        ops = ", ".join(f"{o.replace('aten.', '').replace('.default', '')} x{n}" for o, n in r["ops_outside"].items()) \
            or "none"
        lines.append(f"| {k} | {'-'.join(map(str, tc))} | {r['mmacs']:.1f} | {r['mac_ratio']:.3f} | {r['top1']:.1f} | "
                     f"{r['latency_ratio']:.3f} ({r['median_ms']:.2f}) | {r['xnnpack_partitions']} | {ops} |")
    la, lb = doc["load_avg_before_timing"], doc["load_avg_after"]
    lines += [
        "",
        f"Latency: ExecuTorch runtime, XNNPACK, {doc['threads']} thread, batch 1, all rows in one round-robin run "
        f"(`bench.timing.time_round_robin`: 5 warm-up, {doc['rounds']} rounds x {doc['iters']} timed calls); ratio = "
        "median over "
        "rounds of "
        "row / dense (`bench.stats.paired_ratio`). Load average before / after timing: "
        f"{la[0]:.1f} / {lb[0]:.1f} (a shared 2-core machine; read the ratios, not the ms). "
        f"Machine: {doc['cpu_model']}; `lscpu` flags: {' '.join(doc['cpu_flags'])}.",
        "",
        f"CPU budget: {doc['study_cpu_s'] / 60:.1f} min of training + validation summed over the runs' metrics "
        "(dense + 6 fine-tunes), plus exports, evaluation and timing.",
        "",
        "Patch Slimming calibration (256 real training images, top-down, epsilon bisected to EViT's MAC budget):",
        "",
    ]
    for r, rec in doc["patch_slim"].items():
        ps = rec["patch_slim"]
        lines.append(f"- keep {r}: counts {rec['slim_counts']}, epsilon {ps['epsilon']:.4f}, "
                     f"{ps['calibration_data']}")
    lines += ["", "Commands (repo root):", ""]
    for k, c in doc["commands"].items():
        lines.append(f"- {k}: `python {c}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
