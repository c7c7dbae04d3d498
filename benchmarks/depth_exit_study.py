"""Depth-exit cascade study (issue 14, item 4: CF-ViT's feature reuse taken to its limit): an exit head after
stage K of the default model, and the rest of the network continuing from stage K's features when the exit
is not confident, measured through one ExecuTorch program against the plain two-resolution cascade.

    python -m benchmarks.depth_exit_study --train-data ../shared/data/cifar10-50k/train \
        --data ../shared/data/cifar10/val [--after 3] [--head mv2] [--epochs 15] [--threads 1] \
        [--out benchmarks] [--work runs/depth_exit]

Why: the plain cascade (benchmarks/cascade_mobilevit_xxs.md) runs the whole network twice on the slow path,
and at 32-64 px per-operator overhead makes the 32 px stage 0.64x of the 64 px model, so no threshold within
0.5 points gets under 1.2x. Here the slow path wastes nothing: stage 2 is the remainder of the same network
from stage K's features (the shipped weights, frozen: the last stage's answers are the shipped model's).

1. The shipped backbone is frozen; stage K's features of every --train-data image (the deploy preprocessing,
   random horizontal flips while training) and the shipped model's logits are computed once; the exit head
   is trained on them for --epochs with 0.5 x label-smoothed cross-entropy + 0.5 x KL to the full model's
   softmax (AdamW, one-cycle lr 2e-3, batch 256, seed 0). Weights: WORK/exit_head_<K>_<head>.safetensors.
2. One `.pte` (XNNPACK, fp32, every op delegated) with three methods lowered together by
   `export.executorch.lower`: `exit` (image -> exit logits, stage K features), `rest` (features -> logits)
   and `forward` (the whole model, the "last stage alone"); each checked against torch on 8 images.
3. Every --data image is prepared once (the deploy transform); the exit and the full model run over all of
   them through the .pte (per-stage top-1, the threshold rule of the plain cascade: the lowest max-softmax
   threshold whose top-1 is within --max-drop points of the full model, chosen through the .pte).
4. For thresholds 0 (the exit always answers), the exit-rate quantiles, the chosen one and 1 (every image
   through exit + rest), `cascade_eval.measure_cascade` times the depth cascade and the full model alone
   over every image in the same run (blocks of 20 images back to back, best of 3 passes per block).

Writes OUT/depth_exit_<model>_<K>_<head>.md / .json (with `lscpu` flags and the command). Latency is model time (the
runtime calls and the exit decision; preprocessing outside), batch 1, --threads ExecuTorch threads.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mobilevit_deploy.models.exit_head import HEADS

from benchmarks.cascade_study import cpu_info, sweep_thresholds


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.depth_exit_study", description=__doc__.splitlines()[0])
    p.add_argument("--train-data", required=True, help="ImageFolder the exit head trains on")
    p.add_argument("--data", required=True, help="ImageFolder the threshold is chosen and measured on")
    p.add_argument("--after", type=int, default=3, help="exit after this many stages (1-4; default 3)")
    p.add_argument("--head", default="mv2", choices=sorted(HEADS), help="exit head (models/exit_head.py; default mv2)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--limit", type=int, default=1000, help="images of --data, evenly spread (default 1000)")
    p.add_argument("--max-drop", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="ExecuTorch threads (default 1)")
    p.add_argument("--model", default="mobilevit_xxs")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--work", default="runs/depth_exit", help="exit head weights and the .pte go here")
    p.add_argument("--reuse", action="store_true", help="reuse WORK's exit head weights")
    return p.parse_args(argv)


@dataclass
class _Stage:
    method: object

    def run_one(self, x):
        return self.method.execute([x])[0].clone()


class DepthCascade:
    """The depth cascade on a loaded program: `exit` on the image; its answer when its max softmax
    probability >= threshold, else `rest` on the exit's features. The `measure_cascade` runner interface
    (stages[-1] = the whole model alone on the same prepared image)."""

    def __init__(self, program, threshold: float, num_threads: int):
        self.exit, self.rest = program.load_method("exit"), program.load_method("rest")
        self.stages = [_Stage(self.exit), _Stage(self.rest)]
        self.alone, self.alone_input = _Stage(program.load_method("forward")), 0  # the whole model on the image
        self.stage_names = ["exit", "rest"]
        self.threshold, self.num_threads = threshold, num_threads

    def run_prepared(self, inputs):
        from mobilevit_deploy.cascade import softmax
        from mobilevit_deploy.runtime import CascadeAnswer

        logits, feats = self.exit.execute([inputs[0]])
        p = float(softmax(logits.numpy()).max())
        if p >= self.threshold:
            return CascadeAnswer(logits.clone(), 0, "exit", (p,))
        out = self.rest.execute([feats])[0].clone()
        return CascadeAnswer(out, 1, "rest", (p, float(softmax(out.numpy()).max())))


def main(argv=None) -> int:
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from mobilevit_deploy.cascade import choose_threshold, simulate, softmax
    from mobilevit_deploy.cascade_eval import labelled_images, measure_cascade
    from mobilevit_deploy.export.executorch import lower
    from mobilevit_deploy.models.exit_head import ExitBranch, RestBranch
    from mobilevit_deploy.pretrained import load_model
    from mobilevit_deploy.train.exit_head import stage_features, train_exit_head

    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    lm = load_model(args.model)
    model, cfg = lm.module.eval(), lm.deploy_cfg
    for p in model.parameters():
        p.requires_grad_(False)
    ncls = len(cfg.class_labels)
    exit_mod, rest_mod = ExitBranch(model, args.after, args.head, ncls), RestBranch(model, args.after)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    wpath = work / f"exit_head_{args.after}_{args.head}.safetensors"
    train_s = None
    if args.reuse and wpath.is_file():
        exit_mod.head.load_state_dict(load_file(str(wpath)))
        log(f"reusing {wpath}")
    else:
        log(f"training the exit head ({args.head}) after stage {args.after} on {args.train_data}")
        cache = work / f"features_{args.after}.pt"
        f, teacher, y = stage_features(exit_mod, rest_mod, args.train_data, cfg, cache=cache)
        train_s = train_exit_head(exit_mod.head, f, teacher, y, args.epochs, log)
        save_file({k: v.contiguous() for k, v in exit_mod.head.state_dict().items()}, str(wpath))
    exit_mod.eval()
    rest_mod.eval()
    h, w = cfg.input_size[1:]
    x0 = torch.zeros(1, 3, h, w)
    with torch.no_grad():
        f0 = exit_mod(x0)[1]
    eps = {"exit": torch.export.export(exit_mod, (x0,)), "rest": torch.export.export(rest_mod, (f0,)),
           "forward": torch.export.export(model, (x0,))}
    t = time.perf_counter()
    manager, outside = lower(eps)
    export_s = time.perf_counter() - t
    pte = work / f"{args.model}_depth_exit_{args.after}_{args.head}.pte"
    with tempfile.NamedTemporaryFile(dir=work, suffix=".tmp", delete=False) as tmp:
        manager.write_to_file(tmp)
    Path(tmp.name).replace(pte)
    log(f"lowered {pte} ({pte.stat().st_size / 1e6:.2f} MB) in {export_s:.1f} s; ops outside the delegate: {outside}")

    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(args.threads)
    program = Runtime.get().load_program(str(pte))
    runner = DepthCascade(program, 1.0, int(portable_lib._threadpool_get_thread_count()))
    paths, ys = labelled_images(args.data, cfg.class_labels, args.limit)
    from mobilevit_deploy.data import eval_transform, load_rgb

    tf = eval_transform(cfg)
    xs = [tf(load_rgb(p)).unsqueeze(0).contiguous() for p in paths]
    # numerics: the three methods against torch on 8 images
    diffs = {}
    with torch.no_grad():
        for x in xs[:8]:
            le, fe = runner.exit.execute([x])
            te, tf_ = exit_mod(x)
            lr_ = runner.rest.execute([fe])[0]
            lf = runner.alone.method.execute([x])[0]
            for name, a, b in (("exit", le, te), ("features", fe, tf_), ("rest", lr_, rest_mod(tf_)),
                               ("forward", lf, model(x))):
                diffs[name] = max(diffs.get(name, 0.0), float((a - b).abs().max()))
    log(f"max |pte - torch| over 8 images: {diffs}")
    p_exit = softmax(np.concatenate([runner.stages[0].run_one(x).numpy() for x in xs]))
    p_full = softmax(np.concatenate([runner.alone.run_one(x).numpy() for x in xs]))
    y = np.asarray(ys)
    stage_top1 = [100.0 * float((p.argmax(1) == y).mean()) for p in (p_exit, p_full)]
    choice = choose_threshold([p_exit, p_full], ys, args.max_drop)
    log(f"top-1 exit head {stage_top1[0]:.2f} %, full model {stage_top1[1]:.2f} %; chosen threshold "
        f"{choice.threshold:.4f}")
    inputs = [[x, x] for x in xs]
    measured = []
    for thr in sweep_thresholds(p_exit.max(1), choice.threshold):
        m = measure_cascade(runner, inputs, ys, threshold=thr)
        measured.append(m.to_dict())
        log(f"  threshold {thr:.4f}: top-1 {m.top1:.2f} %, exit {m.exit_rates[0] * 100:.1f} %, cascade "
            f"{m.mean_latency_ms:.3f} ms, full model {m.last_stage_latency_ms:.3f} ms ({m.latency_ratio:.2f}x)")
    curve = []
    for thr in np.unique(np.concatenate([[0.0], p_exit.max(1)])):
        o = simulate([p_exit, p_full], ys, float(thr))
        curve.append({"threshold": float(thr), "top1": o.top1, "exit_rate": o.exit_rates[0]})
    doc = {"command": "python -m benchmarks.depth_exit_study " + shlex.join(sys.argv[1:] if argv is None else argv),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_info(),
           "model": args.model, "weights": lm.source, "after_stage": args.after, "head": args.head,
           "head_params": sum(p.numel() for p in exit_mod.head.parameters()), "epochs": args.epochs,
           "train_data": args.train_data, "train_s": train_s, "data": args.data, "images": len(ys),
           "pte": str(pte), "pte_bytes": pte.stat().st_size, "export_s": round(export_s, 1),
           "ops_not_delegated": outside, "max_abs_diff_vs_torch": diffs, "stage_top1": stage_top1,
           "chosen_threshold": choice.threshold, "max_drop": args.max_drop, "measured": measured, "curve": curve,
           "threads": runner.num_threads}
    out = Path(args.out)
    stem = f"depth_exit_{args.model}_{args.after}_{args.head}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(doc))
    log(f"wrote {out / stem}.md / .json")
    return 0


def markdown(doc: dict) -> str:
    c = doc["cpu"]
    best = [m for m in doc["measured"] if m["top1"] >= m["last_stage_top1"] - doc["max_drop"]]
    best = min(best, key=lambda m: m["latency_ratio"]) if best else None
    lines = [f"# Depth-exit cascade: {doc['model']}", "",
             f"Measured {doc['measured_at']} by `{doc['command']}`.", "",
             f"Weights: {doc['weights']} (frozen). Exit head `{doc['head']}` ({doc['head_params']:,} parameters) "
             f"after stage {doc['after_stage']}, trained {doc['epochs']} epochs on {doc['train_data']} "
             + (f"({doc['train_s']:.0f} s)" if doc["train_s"] else "(weights of an earlier run, --reuse)")
             + f". Data: {doc['data']} ({doc['images']} images). One `.pte` "
             f"({doc['pte_bytes'] / 1e6:.2f} MB) with methods `exit`, `rest`, `forward`; ops outside the delegate: "
             f"{doc['ops_not_delegated']}; max |pte - torch| on 8 images: "
             + ", ".join(f"{k} {v:.1e}" for k, v in doc["max_abs_diff_vs_torch"].items()) + ".", "",
             f"CPU: {c['model_name']} ({c['cpus']} CPUs, load average {c['load_avg_1min_at_start']} at start), "
             f"ExecuTorch XNNPACK, batch 1, {doc['threads']} thread(s). lscpu flags: `{' '.join(c['flags'])}`", "",
             f"Top-1 alone: exit head {doc['stage_top1'][0]:.2f} %, full model {doc['stage_top1'][1]:.2f} %. "
             f"Chosen threshold {doc['chosen_threshold']:.4f} (lowest within {doc['max_drop']} points of the full "
             "model, through the .pte).", "",
             "| threshold | exit rate | top-1 % | full model top-1 % | mean latency ms | full model alone ms | ratio |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in doc["measured"]:
        chosen = " (chosen)" if abs(m["threshold"] - doc["chosen_threshold"]) < 1e-6 else ""
        lines.append(f"| {m['threshold']:.4f}{chosen} | {m['exit_rates'][0] * 100:.1f} % | {m['top1']:.2f} | "
                     f"{m['last_stage_top1']:.2f} | {m['mean_latency_ms']:.3f} | {m['last_stage_latency_ms']:.3f} | "
                     f"{m['latency_ratio']:.2f} |")
    lines.append("")
    if best:
        lines.append(f"- fastest measured row within {doc['max_drop']} top-1 points of the full model: threshold "
                     f"{best['threshold']:.4f}, {best['latency_ratio']:.2f}x the full model alone (issue 14 goal: "
                     f"<= 0.7x) -- goal {'met' if best['latency_ratio'] <= 0.7 else 'not met'}")
    chosen = [m for m in doc["measured"] if abs(m["threshold"] - doc["chosen_threshold"]) < 1e-6]
    if chosen and chosen[0]["exit_rates"][0] >= 0.999:
        lines.append("- at the chosen threshold (almost) every image exits: the exit head alone is within the allowed "
                     "drop, so the cascade is then the truncated model (stem, stages 1-"
                     f"{doc['after_stage']}, exit head); the rows above it trade latency for the rest's answers")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
