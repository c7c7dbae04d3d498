"""Pruning study: every method at every MACs target, fine-tuned alike, against from-scratch baselines.

    python -m benchmarks.prune_study --data ../shared/data/cifar10 \
        [--model mobilevit_xxs --checkpoint REF.safetensors] [--targets 0.7,0.5] \
        [--methods taylor,magnitude,slim,vtp,nvit] [--epochs 5] \
        [--baseline "xxs-narrow=mobilevit_xxs:runs/narrow/model.safetensors" ...] \
        [--out runs/prune_study] [--json benchmarks/prune_study.json] [--md benchmarks/prune_study.md]

For the reference checkpoint (default: the shipped weights of --model), each method prunes to each
target fraction of the MACs (`mobilevit_deploy.prune.prune`, the same stage as
`python -m mobilevit_deploy.prune`) and fine-tunes for --epochs with KD from the reference. Every
row -- the reference, each pruned model and each --baseline (LABEL=MODEL:CHECKPOINT, e.g. a smaller
architecture trained from scratch for the same total epochs as reference + fine-tuning) -- gets:

  top-1     on DATA/val (`mobilevit_deploy.evaluate.evaluate`, the deploy preprocessing; --limit-val)
  params    parameters of the PyTorch model
  MACs      counted at the deploy input size (FlopCounterMode / 2)
  pte_MB    size of the fp32 ExecuTorch XNNPACK .pte (`export_model`, verification off)
  latency   median .pte latency, every row timed in ONE run round-robin (`prune.measure_pte_latency`:
            rows rotate each round, so machine load shifts all alike); reported as a ratio to the
            reference row and in ms

Writes a markdown table (--md), the rows as JSON (--json) and a latency-ratio vs top-1 Pareto plot
(PNG beside the JSON, matplotlib Agg). --no-pte skips the .pte export and latency (MACs only).
Pruned models already in OUT/<method>_<R>/ (model.json present) are reused with --reuse.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.prune_study", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--model", default="mobilevit_xxs")
    p.add_argument("--checkpoint", default=None, help="reference weights (default: the shipped weights of --model)")
    p.add_argument("--targets", default="0.7,0.5", help="MACs fractions (default 0.7,0.5)")
    p.add_argument("--methods", default="taylor,magnitude,slim,vtp,nvit")
    p.add_argument("--epochs", type=int, default=1, help="KD fine-tuning epochs of every pruned model")
    p.add_argument("--baseline", action="append", default=[], metavar="LABEL=MODEL:CHECKPOINT",
                   help="a from-scratch baseline row (repeatable)")
    p.add_argument("--out", default="runs/prune_study", help="pruned models and .pte files go here")
    p.add_argument("--json", default=None, help="rows as JSON (default OUT/prune_study.json)")
    p.add_argument("--md", default=None, help="markdown table (default OUT/prune_study.md)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-val", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads for pruning / fine-tuning")
    p.add_argument("--latency-threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-pte", action="store_true", help="skip the .pte export and latency")
    p.add_argument("--reuse", action="store_true", help="reuse pruned models already in OUT")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="fine-tuning TrainConfig overrides")
    return p.parse_args(argv)


def _baselines(specs):
    out = []
    for s in specs:
        label, _, rest = s.partition("=")
        model, _, ckpt = rest.partition(":")
        if not (label and model and ckpt):
            raise SystemExit(f"--baseline {s!r}: expected LABEL=MODEL:CHECKPOINT")
        out.append({"label": label, "kind": "baseline", "model": model, "checkpoint": ckpt})
    return out


def measure_row(row: dict, data: Path, limit_val: int | None, pte_dir: Path | None) -> dict:
    from mobilevit_deploy.evaluate import evaluate
    from mobilevit_deploy.export import ExportConfig, export_model
    from mobilevit_deploy.pretrained import ModelSource
    from mobilevit_deploy.prune import count_macs, count_params

    loaded = ModelSource(row["model"], row["checkpoint"]).load()
    m, dcfg = loaded.module, loaded.deploy_cfg
    row["params"] = count_params(m)
    row["macs"] = count_macs(m, dcfg.image_size)
    row["input"] = list(dcfg.image_size)
    row["epochs"] = loaded.meta.get("epochs")
    ev = evaluate(data / "val", checkpoint=row["checkpoint"] or None, model=row["model"], limit=limit_val,
                  progress=False, deploy_cfg=dcfg)
    row["top1"] = ev.top1
    row["val_images"] = ev.total
    if pte_dir is not None:
        res = export_model(loaded, ExportConfig("executorch", verify=False), out_dir=pte_dir / row["label"], log=None)
        row["pte"] = str(res.artifact)
        row["pte_bytes"] = Path(res.artifact).stat().st_size
    log(f"{row['label']}: top-1 {row['top1']:.2f} %, {row['params'] / 1e6:.3f} M params, {row['macs'] / 1e6:.1f} M MACs"
        + (f", .pte {row['pte_bytes'] / 1e6:.2f} MB" if "pte_bytes" in row else ""))
    return row


def pareto(rows: list[dict], x: str, y: str) -> list[dict]:
    """Rows not dominated (lower x and higher y is better)."""
    pts = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [r for r in pts if not any(o is not r and o[x] <= r[x] and o[y] >= r[y] and (o[x] < r[x] or o[y] > r[y])
                                      for o in pts)]


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = "latency_ratio" if any(r.get("latency_ratio") is not None for r in rows) else "macs_ratio"
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {"reference": "*", "pruned": "o", "baseline": "s"}
    for r in rows:
        if r.get(x) is None:
            continue
        ax.scatter(r[x], r["top1"], marker=markers[r["kind"]], s=120 if r["kind"] == "reference" else 50)
        ax.annotate(r["label"], (r[x], r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted(pareto(rows, x, "top1"), key=lambda r: r[x])
    if len(front) > 1:
        ax.plot([r[x] for r in front], [r["top1"] for r in front], "k--", lw=1, label="Pareto front")
        ax.legend()
    ax.set_xlabel(".pte latency / reference (one run, round-robin)" if x == "latency_ratio" else "MACs / reference")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Pruning study: {meta['model']}", "",
             f"Reference: {meta['reference']}; data {meta['data']}; fine-tuning {meta['epochs']} epoch(s) with KD; "
             f"latency: fp32 XNNPACK .pte, {meta['latency_threads']} thread(s), all rows in one round-robin run.", "",
             "| row | kind | top-1 % | params M | MACs M | MACs ratio | .pte MB | latency ms | latency ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        lines.append(f"| {r['label']} | {r['kind']} | {f(r.get('top1'), '.2f')} | {r['params'] / 1e6:.3f} | "
                     f"{r['macs'] / 1e6:.1f} | {f(r.get('macs_ratio'), '.3f')} | "
                     f"{f(r['pte_bytes'] / 1e6 if r.get('pte_bytes') else None, '.2f')} | "
                     f"{f(r.get('latency_ms'), '.3f')} | {f(r.get('latency_ratio'), '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from mobilevit_deploy.errors import UserError
    from mobilevit_deploy.prune import PruneConfig, measure_pte_latency, prune

    out = Path(args.out)
    data = Path(args.data)
    targets = [float(t) for t in args.targets.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    rows = [{"label": "reference", "kind": "reference", "model": args.model, "checkpoint": args.checkpoint}]
    for method in methods:
        for t in targets:
            d = out / f"{method}_{t:g}"
            if not (args.reuse and (d / "model.json").is_file()):
                log(f"== prune {method} to {t:g} x MACs, {args.epochs} epoch(s) -> {d}")
                try:
                    prune(PruneConfig(data=str(data), out=str(d), model=args.model, checkpoint=args.checkpoint,
                                      target_macs=t, method=method, epochs=args.epochs, batch_size=args.batch_size,
                                      lr=args.lr, calib_batches=args.calib_batches, limit_train=args.limit_train,
                                      limit_val=args.limit_val, threads=args.threads, progress=False,
                                      train_overrides=tuple(args.overrides)), log=log)
                except UserError as e:
                    log(f"error: {method} {t:g}: {e}")
                    continue
            rows.append({"label": f"{method}@{t:g}", "kind": "pruned", "model": args.model,
                         "checkpoint": str(d / "model.safetensors"), "method": method, "target": t})
    rows += _baselines(args.baseline)

    pte_dir = None if args.no_pte else out / "pte"
    for r in rows:
        measure_row(r, data, args.limit_val, pte_dir)
    ref = rows[0]
    for r in rows:
        r["macs_ratio"] = r["macs"] / ref["macs"]
    if pte_dir is not None:
        log(f"== .pte latency of {len(rows)} rows, round-robin, {args.latency_threads} thread(s)")
        ms = measure_pte_latency({}, threads=args.latency_threads, rounds=args.rounds, iters=args.iters,
                                 pte_paths={r["label"]: r["pte"] for r in rows})
        for r in rows:
            r["latency_ms"] = ms[r["label"]]
            r["latency_ratio"] = ms[r["label"]] / ms[ref["label"]]

    meta = {"model": args.model, "reference": args.checkpoint or "shipped weights", "data": str(data),
            "epochs": args.epochs, "targets": targets, "methods": methods, "latency_threads": args.latency_threads,
            "limit_val": args.limit_val}
    jpath = Path(args.json) if args.json else out / "prune_study.json"
    mpath = Path(args.md) if args.md else out / "prune_study.md"
    jpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.parent.mkdir(parents=True, exist_ok=True)
    png = plot(rows, jpath.with_suffix(".png"), f"{args.model}: pruning vs from-scratch")
    jpath.write_text(json.dumps({"meta": meta, "rows": rows, "plot": str(png)}, indent=1))
    md = markdown(rows, meta) + f"\n![latency vs top-1]({png.name})\n"
    mpath.write_text(md)
    print(md)
    log(f"wrote {jpath}, {mpath}, {png}")
    return 0


if __name__ == "__main__":
    from mobilevit_deploy.cli import run_cli

    raise SystemExit(run_cli(main))
