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
Pruned models already in OUT/<method>_<R>/ (model.json present) are reused with --reuse, and so are
.pte files newer than their checkpoint. --prune-only stops after pruning (no measurement, nothing
tabulated): a long study can be run in pieces and measured in one final run with --reuse.

From-scratch baseline rows (`--scratch ROW`, repeatable, ROW a pruned row label such as taylor@0.7):
the pruned row's architecture (its architecture record), re-initialised at random (every module's
`reset_parameters` + the model's `_init_weights`), trained from scratch with labels only on DATA by
the project trainer with the reference recipe (`--recipe`, default recipes/<model>_cifar10.yaml, at
the deploy input size as the only train size, batch 64, no variable batch) for --scratch-epochs
(default: the reference's `epochs` + --epochs, i.e. the same total epochs as reference + fine-tuning).
Same architecture => same MACs and .pte latency as the pruned row, so the comparison is at equal
latency by construction.

`--train-reference N` trains the reference itself from scratch first (same recipe and settings, N
epochs, into OUT/reference; reused with --reuse) and uses it as --checkpoint: an affordable
mini-study in which "same total epochs" is exact (reference N + fine-tune E vs scratch N + E).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
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
    p.add_argument("--only", default=None,
                   help="comma-separated row labels (e.g. taylor@0.7,slim@0.7): only these of the methods x targets "
                        "grid (budget cut; the rest are listed as not run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="fine-tuning TrainConfig overrides")
    p.add_argument("--prior", default=None, metavar="JSON",
                   help="take top-1 of pruned rows pruned here with --prior-rows at --epochs 0 from an earlier "
                        "study JSON (same label, params and MACs); marked in the table")
    p.add_argument("--prior-rows", default="", help="comma-separated method names pruned with 0 epochs for --prior")
    p.add_argument("--epochs-at", action="append", default=[], metavar="R=E",
                   help="fine-tuning epochs E for the rows of target R instead of --epochs (budget cuts; the "
                        "table's FT column shows them)")
    p.add_argument("--pte-existing-only", action="store_true",
                   help="with --reuse: time only rows whose .pte already exists (no new exports; budget cut)")
    p.add_argument("--reuse-top1", action="store_true",
                   help="pruned rows: top-1 as measured by the pruning stage (model.json val_top1, same val split "
                        "and preprocessing) instead of evaluating again")
    p.add_argument("--prune-only", action="store_true", help="prune + fine-tune the rows, measure nothing")
    p.add_argument("--scratch", action="append", default=[], metavar="ROW",
                   help="a from-scratch row with the architecture of pruned row ROW (e.g. taylor@0.7; repeatable)")
    p.add_argument("--scratch-epochs", type=int, default=None,
                   help="from-scratch training epochs (default: the reference's epochs + --epochs)")
    p.add_argument("--train-reference", type=int, default=None, metavar="N",
                   help="train the reference from scratch for N epochs first (mini-study; see the docstring)")
    p.add_argument("--recipe", default=None, help="recipe of --train-reference / --scratch training "
                                                  "(default recipes/<model>_cifar10.yaml)")
    p.add_argument("--train-size", type=int, default=64, help="input size of --train-reference (default 64)")
    p.add_argument("--train-batch", type=int, default=64, help="batch of --train-reference / --scratch training")
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


def _recipe(args) -> str:
    if args.recipe:
        return args.recipe
    return str(Path(__file__).resolve().parents[1] / "recipes" / f"{args.model}_cifar10.yaml")


def scratch_train_config(args, size: int, epochs: int, init_checkpoint: str | None, name: str):
    """The reference recipe at the deploy size only (fixed batch), labels only, for `epochs` epochs."""
    from mobilevit_deploy.train.config import load_recipe

    ov = [f"schedule.epochs={epochs}", f"data.train_sizes=[{size}]", f"data.base_size={size}",
          f"data.batch_size={args.train_batch}", "data.variable_batch=false", f"data.eval_size={size}",
          "progress=false", f"name={name}"]
    if args.threads:
        ov.append(f"threads={args.threads}")
    if args.limit_train:
        ov.append(f"data.limit_train={args.limit_train}")
    if init_checkpoint:
        ov.append(f"model.init_checkpoint={init_checkpoint}")
    return load_recipe(_recipe(args), ov), ov


def train_reference(args, data: Path, out: Path) -> str:
    """--train-reference N: the reference trained from scratch into OUT/reference (reused with --reuse)."""
    from mobilevit_deploy.models import get_deploy_cfg
    from mobilevit_deploy.train.loop import train

    d = out / "reference"
    w = d / "model.safetensors"
    if args.reuse and w.is_file() and (d / "model.json").is_file():
        log(f"== reference: reusing {w}")
        return str(w)
    size = args.train_size or int(get_deploy_cfg(args.model).input_size[1])
    tc, ov = scratch_train_config(args, size, args.train_reference, None, "prune-study-reference")
    log(f"== reference: {args.model} from scratch, {args.train_reference} epoch(s), {_recipe(args)} + {ov} -> {d}")
    res = train(tc, data=str(data), out=str(d), recipe_path=_recipe(args))
    return str(res.weights)


def reinit_(model) -> None:
    """Random re-initialisation in place: every module's reset_parameters, then the model's own init."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(model, "_init_weights"):
        model._init_weights(True)


def scratch_row(args, data: Path, out: Path, src: dict, epochs: int) -> dict:
    """Train the architecture of pruned row `src` from scratch (see the docstring); returns the row."""
    import shutil

    import torch

    from mobilevit_deploy.checkpoint import load_checkpoint
    from mobilevit_deploy.pretrained import ModelSource
    from mobilevit_deploy.prune import write_pruned
    from mobilevit_deploy.train.loop import train

    label = f"scratch:{src['label']}"
    d = out / f"scratch_{src['label'].replace('@', '_')}"
    row = {"label": label, "kind": "scratch", "model": src["model"], "checkpoint": str(d / "model.safetensors"),
           "architecture_of": src["label"], "scratch_epochs": epochs}
    if args.reuse and (d / "model.json").is_file():
        log(f"== {label}: reusing {d}")
        sc = json.loads((d / "model.json").read_text()).get("scratch", {})
        row["train_s"] = sc.get("train_s") or _epoch_s(d / "train")
        return row
    t0 = time.perf_counter()
    loaded = ModelSource(src["model"], src["checkpoint"]).load()
    model = loaded.module
    torch.manual_seed(0)
    reinit_(model)
    size = int(loaded.deploy_cfg.image_size[0])
    work = d / ".init"
    init, _, _ = write_pruned(model, src["model"], work, {"note": "random init of the pruned architecture"},
                              stem="init")
    tc, ov = scratch_train_config(args, size, epochs, str(init), f"scratch-{src['label']}")
    log(f"== {label}: the architecture of {src['label']} from scratch, {epochs} epoch(s), labels only, "
        f"{_recipe(args)} + {ov} -> {d}")
    res = train(tc, data=str(data), out=str(d / "train"), recipe_path=_recipe(args))
    load_checkpoint(model, res.weights)
    model.deploy_cfg = loaded.deploy_cfg
    row["train_s"] = time.perf_counter() - t0
    write_pruned(model, src["model"], d, {"recipe": "scratch", "epochs": epochs, "val_top1": res.val_top1,
                                          "scratch": {"architecture_of": src["checkpoint"], "train_overrides": ov,
                                                      "recipe": _recipe(args), "train_s": row["train_s"]}})
    shutil.rmtree(work, ignore_errors=True)
    for f in ("model.safetensors", "model.json"):
        (d / "train" / f).unlink(missing_ok=True)
    shutil.rmtree(d / "train" / "checkpoint", ignore_errors=True)
    return row


def _export_pte(loaded, row: dict, pte_dir: Path, reuse: bool, existing_only: bool = False) -> Path | None:
    from mobilevit_deploy.export import ExportConfig, export_model

    d = pte_dir / row["label"]
    ck = row.get("checkpoint")
    arch = loaded.meta.get("architecture")
    if reuse and d.is_dir():
        old = sorted(d.glob("*.pte"))
        src_mtime = Path(ck).stat().st_mtime if ck else 0
        if old and old[0].stat().st_mtime > src_mtime:
            return old[0]
        # a .pte lowered from the same architecture (e.g. before fine-tuning): latency and size do not depend
        # on the weight values of a dense fp32 model, so it is reused when the architecture records are equal
        rec = d / "architecture.json"
        if old and arch is not None and rec.is_file() and json.loads(rec.read_text()) == arch:
            row["pte_from_same_architecture"] = True
            return old[0]
    if existing_only:
        return None
    res = export_model(loaded, ExportConfig("executorch", verify=False), out_dir=d, log=None)
    if arch is not None:
        _atomic_text(d / "architecture.json", json.dumps(arch))
    return Path(res.artifact)


def _epoch_s(train_dir: Path) -> float | None:
    """Sum of the trainer's epoch + validation times (metrics.csv), or None."""
    import csv

    f = train_dir / "metrics.csv"
    if not f.is_file():
        return None
    with open(f) as fh:
        return sum(float(r["epoch_time_s"] or 0) + float(r.get("val_time_s") or 0) for r in csv.DictReader(fh))


def _removed_by_kind(removed: dict) -> dict:
    """{kind: units removed} from a prune meta's {group id: units removed}."""
    out: dict = {}
    for gid, n in removed.items():
        k = gid.split(":")[0]
        out[k] = out.get(k, 0) + int(n)
    return out


def _ref_epochs(checkpoint: str | None, model: str) -> int:
    from mobilevit_deploy.pretrained import ModelSource

    e = ModelSource(model, checkpoint).load().meta.get("epochs")
    if not isinstance(e, int):
        raise SystemExit("--scratch: the reference's epochs are unknown; pass --scratch-epochs")
    return e


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _sha(checkpoint: str | None, model: str) -> str | None:
    from mobilevit_deploy.checkpoint import file_sha256
    from mobilevit_deploy.pretrained import shipped_weights

    if checkpoint is None:
        sw = shipped_weights(model)
        checkpoint = sw.path if sw is not None else None
    return file_sha256(checkpoint) if checkpoint else None


def _cpu() -> dict:
    import platform

    flags, name = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "model name" and not name:
                name = v.strip()
            if k.strip() == "flags" and not flags:
                flags = v.strip()
    except OSError:
        pass
    import os

    keep = [f for f in flags.split() if f.startswith(("avx", "fma", "amx"))]
    return {"model": name or platform.processor(), "cpus": os.cpu_count(), "simd_flags": keep}


def _apply_prior(rows: list[dict], prior: Path) -> None:
    """--prior JSON: for pruned rows whose label, params and MACs equal a row of an earlier study run
    (the same architecture), take top-1 from that run (their fine-tuned weights were not rebuilt)."""
    old = {r["label"]: r for r in json.loads(prior.read_text())["rows"]}
    for r in rows:
        o = old.get(r["label"])
        if r["kind"] != "pruned" or o is None or not r.get("prior_ok"):
            continue
        if o["params"] == r["params"] and o["macs"] == r["macs"]:
            r["top1_rebuilt_epochs0"] = r["top1"]
            r["rebuild_s"] = r.pop("prune_finetune_s", None)  # the 0-epoch rebuild here, not the prior fine-tuning
            r["top1"] = o["top1"]
            r["ft_epochs"] = f"{o.get('epochs')} (prior run)"
            if r.get("latency_ratio") is None and o.get("latency_ratio") is not None:
                # no .pte timed here (budget cut): the prior run's own round-robin ratio, marked
                r["latency_ms"], r["latency_ratio"] = None, o["latency_ratio"]  # ms of another run: not shown
                r["pte_bytes"] = o.get("pte_bytes")
                r["latency_source"] = f"{prior} (its own one-run measurement against its reference .pte)"
            r["top1_source"] = f"{prior} (same architecture: params and MACs equal)"
        else:
            log(f"--prior: {r['label']} differs from {prior} (params/MACs): its top-1 is this run's (0 epochs)")
            r["top1_source"] = "this run, 0 fine-tuning epochs (architecture differs from the prior run)"


def measure_row(row: dict, data: Path, limit_val: int | None, pte_dir: Path | None, reuse: bool = False,
                existing_only: bool = False, reuse_top1: bool = False) -> dict:
    from mobilevit_deploy.evaluate import evaluate
    from mobilevit_deploy.pretrained import ModelSource
    from mobilevit_deploy.prune import count_macs, count_params

    loaded = ModelSource(row["model"], row["checkpoint"]).load()
    m, dcfg = loaded.module, loaded.deploy_cfg
    row["params"] = count_params(m)
    row["macs"] = count_macs(m, dcfg.image_size)
    row["input"] = list(dcfg.image_size)
    row["epochs"] = loaded.meta.get("epochs")
    if row["kind"] == "pruned":
        row["ft_epochs"] = row["epochs"]
    elif row["kind"] == "scratch":
        row["ft_epochs"] = f"{row['epochs']} (scratch)"
    stage_top1 = loaded.meta.get("val_top1") if row["kind"] == "pruned" and reuse_top1 else None
    if stage_top1 is not None and loaded.meta.get("prune", {}).get("val_images") and limit_val is None:
        # measured by the pruning stage itself: same val split, eval_transform(deploy_cfg), fp32
        row["top1"] = float(stage_top1)
        row["val_images"] = loaded.meta["prune"]["val_images"]
        row.setdefault("top1_source", "the pruning stage's own val measurement (model.json)")
    else:
        ev = evaluate(data / "val", checkpoint=row["checkpoint"] or None, model=row["model"], limit=limit_val,
                      progress=False, deploy_cfg=dcfg)
        row["top1"] = ev.top1
        row["val_images"] = ev.total
    if pte_dir is not None:
        pte = _export_pte(loaded, row, pte_dir, reuse, existing_only)
        if pte is not None:
            row["pte"] = str(pte)
            row["pte_bytes"] = pte.stat().st_size
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
    markers = {"reference": "*", "pruned": "o", "baseline": "s", "scratch": "s"}
    for r in rows:
        if r.get(x) is None:
            continue
        ax.scatter(r[x], r["top1"], marker=markers[r["kind"]], s=120 if r["kind"] == "reference" else 50)
        lab = r["label"] + (" (prior run)" if r.get("latency_source") or r.get("top1_source", "").startswith("runs/")
                            else "") + (f" [{r['ft_epochs']} ep]" if r.get("ft_epochs") == 0 else "")
        ax.annotate(lab, (r[x], r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
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
             "| row | kind | FT epochs | top-1 % | params M | MACs M | MACs ratio | .pte MB | latency ms "
             "| latency ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        ft = r.get("ft_epochs", "-")
        lines.append(f"| {r['label']} | {r['kind']} | {ft} | {f(r.get('top1'), '.2f')} | {r['params'] / 1e6:.3f} | "
                     f"{r['macs'] / 1e6:.1f} | {f(r.get('macs_ratio'), '.3f')} | "
                     f"{f(r['pte_bytes'] / 1e6 if r.get('pte_bytes') else None, '.2f')} | "
                     f"{f(r.get('latency_ms'), '.3f')} | {f(r.get('latency_ratio'), '.3f')} |")
    lines += ["", "| row | time s (prune + fine-tune, or scratch training) | removed | top-1 (and latency) from |",
              "|---|---:|---|---|"]
    for r in rows:
        secs = r.get("prune_finetune_s") or r.get("train_s")
        rem = ", ".join(f"{k} -{v}" for k, v in (r.get("removed") or {}).items()) or "-"
        if r["kind"] == "scratch":
            rem = f"architecture of {r['architecture_of']}, {r['scratch_epochs']} epochs from scratch"
        src = r.get("top1_source", "this run")
        if r.get("latency_source"):
            src += f"; latency: {r['latency_source']}"
        lines.append(f"| {r['label']} | {f(secs, '.0f')} | {rem} | {src} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from mobilevit_deploy.errors import UserError
    from mobilevit_deploy.prune import PruneConfig, measure_pte_latency, prune

    out = Path(args.out)
    data = Path(args.data)
    targets = [float(t) for t in args.targets.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    t_ref = None
    prior_rows = [m for m in args.prior_rows.split(",") if m] if args.prior else []
    errors: dict = {}
    epochs_at = {float(k): int(v) for k, v in (e.split("=") for e in args.epochs_at)}
    if args.train_reference:
        t0 = time.perf_counter()
        args.checkpoint = train_reference(args, data, out)
        t_ref = _epoch_s(out / "reference") if args.reuse else time.perf_counter() - t0
    rows = [{"label": "reference", "kind": "reference", "model": args.model, "checkpoint": args.checkpoint}]
    only = {x for x in args.only.split(",") if x} if args.only else None
    for method in methods:
        for t in targets:
            if only is not None and f"{method}@{t:g}" not in only:
                errors[f"{method}@{t:g}"] = "not run (--only: budget cut)"
                continue
            d = out / f"{method}_{t:g}"
            timing = d / "study_time.json"
            err = out / f"{method}_{t:g}.error.txt"
            if args.reuse and err.is_file() and not (d / "model.json").is_file():
                errors[f"{method}@{t:g}"] = err.read_text().strip()
                log(f"error (earlier run): {method} {t:g}: {errors[f'{method}@{t:g}']}")
                continue
            if not (args.reuse and (d / "model.json").is_file()):
                log(f"== prune {method} to {t:g} x MACs, {args.epochs} epoch(s) -> {d}")
                t0 = time.perf_counter()
                ep = 0 if method in prior_rows else epochs_at.get(t, args.epochs)
                try:
                    prune(PruneConfig(data=str(data), out=str(d), model=args.model, checkpoint=args.checkpoint,
                                      target_macs=t, method=method, epochs=ep, batch_size=args.batch_size,
                                      lr=args.lr, calib_batches=args.calib_batches, limit_train=args.limit_train,
                                      limit_val=args.limit_val, threads=args.threads, progress=False,
                                      train_overrides=tuple(args.overrides)), log=log)
                except UserError as e:
                    log(f"error: {method} {t:g}: {e}")
                    errors[f"{method}@{t:g}"] = str(e)
                    out.mkdir(parents=True, exist_ok=True)
                    _atomic_text(err, str(e))
                    continue
                timing.write_text(json.dumps({"prune_finetune_s": time.perf_counter() - t0}))
            row = {"label": f"{method}@{t:g}", "kind": "pruned", "model": args.model,
                   "checkpoint": str(d / "model.safetensors"), "method": method, "target": t,
                   "prior_ok": method in prior_rows}
            if timing.is_file():
                row["prune_finetune_s"] = json.loads(timing.read_text())["prune_finetune_s"]
            meta = json.loads((d / "model.json").read_text()).get("prune", {})
            row["removed"] = _removed_by_kind(meta.get("removed", {}))
            rows.append(row)
    rows += _baselines(args.baseline)
    if args.scratch:
        ref_epochs = _ref_epochs(args.checkpoint, args.model)
        epochs = args.scratch_epochs if args.scratch_epochs is not None else ref_epochs + args.epochs
        by_label = {r["label"]: r for r in rows if r["kind"] == "pruned"}
        for lab in args.scratch:
            if lab not in by_label:
                raise SystemExit(f"--scratch {lab}: no pruned row of that label (rows: {', '.join(by_label)})")
            rows.append(scratch_row(args, data, out, by_label[lab], epochs))
    if args.prune_only:
        log("== --prune-only: done")
        return 0

    pte_dir = None if args.no_pte else out / "pte"
    for r in rows:
        measure_row(r, data, args.limit_val, pte_dir, reuse=args.reuse, existing_only=args.pte_existing_only,
                    reuse_top1=args.reuse_top1)
    ref = rows[0]
    for r in rows:
        r["macs_ratio"] = r["macs"] / ref["macs"]
    if pte_dir is not None:
        log(f"== .pte latency of {len(rows)} rows, round-robin, {args.latency_threads} thread(s)")
        ms = measure_pte_latency({}, threads=args.latency_threads, rounds=args.rounds, iters=args.iters,
                                 pte_paths={r["label"]: r["pte"] for r in rows if r.get("pte")})
        for r in rows:
            if r["label"] in ms:
                r["latency_ms"] = ms[r["label"]]
                r["latency_ratio"] = ms[r["label"]] / ms[ref["label"]]

    if args.prior:
        _apply_prior(rows, Path(args.prior))
    meta = {"model": args.model, "reference": args.checkpoint or "shipped weights",
            "reference_sha256": _sha(args.checkpoint, args.model), "data": str(data),
            "epochs": args.epochs, "targets": targets, "methods": methods, "latency_threads": args.latency_threads,
            "limit_val": args.limit_val, "command": "python -m benchmarks.prune_study " + " ".join(sys.argv[1:] if argv
                                                                                               is None else argv),
            "cpu": _cpu(), "train_reference_s": t_ref, "errors": errors}
    jpath = Path(args.json) if args.json else out / "prune_study.json"
    mpath = Path(args.md) if args.md else out / "prune_study.md"
    jpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.parent.mkdir(parents=True, exist_ok=True)
    png = jpath.with_suffix(".png")
    tmp_png = plot(rows, png.with_name(png.stem + ".tmp.png"), f"{args.model}: pruning vs from-scratch")
    tmp_png.replace(png)
    _atomic_text(jpath, json.dumps({"meta": meta, "rows": rows, "plot": str(png)}, indent=1))
    md = markdown(rows, meta) + "".join(
        f"\n{k}: {v}\n" if v.startswith("not run") else f"\n{k}: not reached ({v})\n" for k, v in errors.items())
    md += f"\n![latency vs top-1]({png.name})\n"
    _atomic_text(mpath, md)
    print(md)
    log(f"wrote {jpath}, {mpath}, {png}")
    return 0


if __name__ == "__main__":
    from mobilevit_deploy.cli import run_cli

    raise SystemExit(run_cli(main))
