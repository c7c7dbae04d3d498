"""Measure every post-training quantization scheme on one model: the table of the README.

    python -m benchmarks.ptq_table --model mobilevit_xxs \
        --calib-data ../shared/data/cifar10/train --val ../shared/data/cifar10/val \
        --json benchmarks/ptq_mobilevit_xxs.json --md benchmarks/ptq_mobilevit_xxs.md

For fp32 and each scheme: artifact size (and ratio to the fp32 artifact of the same target), top-1 on
the validation folder, top-1 agreement and SQNR of the logits against the fp32 model, and latency on
this machine (ExecuTorch / ONNX Runtime; Core ML cannot run on Linux). Every artifact is produced by
`export_model(..., ExportConfig(quant=...))`, the same path as `python -m mobilevit_deploy.export --quant`.

Where the numbers come from:
- .pte / .onnx: the artifact itself, run by its runtime on every validation image;
- Core ML: the torch-side model of the artifact (`export_model(...).reference`: coremltools' own
  weight compress/decompress on the BN-folded weights, the weights read back from a palette-mixed
  program, or the converted CoreMLQuantizer q/dq graph),
  because Core ML does not run on Linux. Sizes are the saved .mlpackage sizes.

Keep-in-float: the per-layer sensitivity of the ExecuTorch int8 scheme is measured once on the
calibration images (`quantize.sensitivity.rank_units`) and printed; then int8 artifacts keeping the
k most sensitive units in float are exported for each k of --keep-float-sweep (the same as
`--keep-float auto:k`), so the default can be chosen from measured top-1 / agreement.

Latency: every runnable artifact (and eager fp32) is timed round-robin (`bench.timing.time_round_robin`:
in each round every row runs `--iters` inferences after one untimed call, the row order rotating) and
the median over all timed calls is reported, so the shared machine's load shifts all rows alike.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def metrics(logits, y, ref):
    from mobilevit_deploy.verify import sqnr_db, top1_agreement

    return {"top1": float((logits.argmax(-1) == y).double().mean()) * 100,
            "agree_fp32": top1_agreement(ref, logits) * 100, "sqnr_fp32_db": sqnr_db(ref, logits)}


def latency_ms(rows: dict, x1, *, rounds: int, iters: int) -> dict:
    """{name: median ms} of fn(x1) for each row, timed round-robin (see the module docstring)."""
    from mobilevit_deploy.bench import stats
    from mobilevit_deploy.bench.timing import Timed, time_round_robin

    slots = [Timed(name, (lambda fn=fn: fn(x1))) for name, fn in rows.items()]
    time_round_robin(slots, warmup=3, rounds=rounds, iters=iters)
    return {s.key: stats.median(s.samples) for s in slots}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilevit_xxs")
    ap.add_argument("--checkpoint", default=None, help="default: the shipped weights")
    ap.add_argument("--calib-data", default=None, help="default: the shipped sample images")
    ap.add_argument("--calib-size", type=int, default=None)
    ap.add_argument("--val", required=True, help="ImageFolder with the model's labels")
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--schemes", default="executorch:int8,executorch:int8-latency,executorch:int8-dynamic,"
                                          "executorch:int8-dynamic-all,coreml:w8,coreml:palette6,"
                                          "coreml:palette4,coreml:palette-mixed,coreml:int8")
    ap.add_argument("--keep-float-sweep", default="0,1,2,3,4,6",
                    help="k values: ExecuTorch int8 with the k most sensitive units kept in float")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="artifact directory (default: a temporary one, removed)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    return ap.parse_args(argv)


class Table:
    """The rows of the table: every export of one model, measured on the same validation images."""

    def __init__(self, a, loaded, x, y, out: Path):
        from mobilevit_deploy.verify import batched_logits

        self.a, self.loaded, self.x, self.y, self.out = a, loaded, x, y, out
        self.ref = batched_logits(loaded.module, x)
        self.rows, self.runners = [], {}

    def export(self, target, quant=None, sub=None, keep_float=None):
        from mobilevit_deploy.export import ExportConfig, ModelSource, export_model

        a = self.a
        # int8-latency: the per-layer plan timed at the table's thread count
        q = {"scheme": quant, "plan_threads": a.threads} if quant == "int8-latency" else quant
        config = ExportConfig.from_dict({"target": target, "quant": q, "keep_float": keep_float,
                                         "calib_data": a.calib_data if quant else None,
                                         "calib_size": a.calib_size if quant else None})
        source = ModelSource(a.model, module=self.loaded.module, deploy_cfg=self.loaded.deploy_cfg)
        t = time.perf_counter()
        res = export_model(source, config, out_dir=self.out / (sub or quant or "fp32") / target,
                           log=lambda s: log("  " + s))
        return res, time.perf_counter() - t

    def add(self, name, target, scheme, res, run, numerics, extra=None, timed: bool = False):
        from mobilevit_deploy.verify import batched_logits

        if timed:
            self.runners[name] = run
        m = res.manifest if res is not None else {}
        qb = m.get("quantization") or {}
        row = {"name": name, "target": target, "scheme": scheme, "numerics_from": numerics,
               "artifact": str(res.artifact) if res else None,
               "size_bytes": m.get("artifact", {}).get("size_bytes"),
               "size_ratio_fp32": qb.get("size_ratio_fp32", 1.0 if res is not None else None),
               **metrics(batched_logits(run, self.x), self.y, self.ref), "manifest_accuracy": qb.get("accuracy"),
               "keep_float": (qb.get("keep_float") or {}).get("units"), **(extra or {})}
        self.rows.append(row)
        log(f"{name}: {row['size_bytes'] and row['size_bytes'] / 1e6:.2f} MB, top-1 {row['top1']:.2f}, agree "
            f"{row['agree_fp32']:.1f} %, SQNR {row['sqnr_fp32_db']:.1f} dB ({numerics})")

    def add_artifact(self, name, target, scheme, res, dt, extra=None):
        from mobilevit_deploy.runtime import load_artifact

        run = load_artifact(res.artifact, num_threads=self.a.threads)
        self.add(name, target, scheme, res, run, f"{target} artifact", {"export_s": dt, **(extra or {})}, timed=True)


def measure_rows(table: Table, ranked: list[str], sweep: list[int]) -> None:
    """fp32 rows of every target, then each scheme (ExecuTorch int8 once per keep-float k)."""
    for target in ("executorch", "onnx"):
        res, dt = table.export(target)
        table.add_artifact(f"{target} fp32", target, "fp32", res, dt)
    res, dt = table.export("coreml")
    table.add("coreml fp16", "coreml", "fp16", res, table.loaded.module, "fp32 PyTorch (Core ML fp16 not run on Linux)",
              {"export_s": dt})
    for target, scheme in (s.split(":") for s in table.a.schemes.split(",") if s):
        if target == "executorch" and scheme == "int8":
            for k in sweep:
                kf = ",".join(ranked[:k]) if k else "none"
                res, dt = table.export(target, scheme, sub=f"int8_keepfloat{k}", keep_float=kf)
                table.add_artifact(f"executorch int8 (keep-float {k})", target, scheme, res, dt, {"keep_float_k": k})
            continue
        res, dt = table.export(target, scheme)
        if target == "coreml":  # Core ML does not run on Linux: the export's own torch-side reference
            numerics = "torch-side (" + res.manifest["quantization"]["torch_side"] + ")"
            table.add(f"coreml {scheme}", target, scheme, res, res.reference, numerics, {"export_s": dt})
        else:
            table.add_artifact(f"{target} {scheme}", target, scheme, res, dt)


def main(argv=None):
    a = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    from mobilevit_deploy.data import load_labeled_folder
    from mobilevit_deploy.pretrained import load_model
    from mobilevit_deploy.quantize import load_calibration
    from mobilevit_deploy.quantize.executorch_schemes import xnnpack_quantizer_factory
    from mobilevit_deploy.quantize.sensitivity import format_report, rank_units

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    loaded = load_model(a.model, checkpoint=a.checkpoint)
    if loaded.source == "untrained":
        raise SystemExit(f"no shipped weights for {a.model} (mobilevit_deploy/assets/weights): pass --checkpoint")
    model, cfg = loaded.module, loaded.deploy_cfg
    calib = load_calibration(a.calib_data, a.calib_size)
    log(f"model {a.model} ({loaded.source}), input {cfg.input_size[1]}x{cfg.input_size[2]}; calibration: "
        f"{len(calib)} images from {calib.source}")
    x, y, _ = load_labeled_folder(a.val, cfg, a.val_limit)
    tmp = None
    out = Path(a.out) if a.out else Path(tmp := tempfile.mkdtemp(prefix="ptq_table_"))
    out.mkdir(parents=True, exist_ok=True)
    table = Table(a, loaded, x, y, out)
    fp32 = metrics(table.ref, y, table.ref)
    log(f"fp32 eager: top-1 {fp32['top1']:.2f} % on {len(y)} images")
    doc = {"model": a.model, "weights": loaded.source, "weights_meta_val_top1": loaded.meta.get("val_top1"),
           "input_size": list(cfg.input_size), "val": str(a.val), "val_images": len(y),
           "calibration": calib.describe(), "threads": a.threads, "rows": [], "sensitivity": None}

    # per-layer sensitivity (ExecuTorch int8) and the keep-float sweep built on it
    sweep = [int(k) for k in a.keep_float_sweep.split(",") if k.strip()]
    t = time.perf_counter()
    rep = rank_units(model, xnnpack_quantizer_factory(True), calib, cfg, scheme="executorch int8",
                     eval_images=64, curve_max=max(sweep + [0]), progress=False)
    log(format_report(rep, top=20))
    doc["sensitivity"] = {**rep.to_dict(), "time_s": time.perf_counter() - t}
    measure_rows(table, rep.ranked(), sweep)

    # cross-check: the evaluate CLI's function on the int8 .pte gives the same top-1
    from mobilevit_deploy.evaluate import evaluate

    for row in table.rows:
        if row["name"] == "executorch int8 (keep-float 0)" and a.val_limit is None:
            ev = evaluate(a.val, artifact=row["artifact"], progress=False, threads=a.threads)
            row["evaluate_cli_top1"] = ev.top1
            log(f"python -m mobilevit_deploy.evaluate --artifact {Path(row['artifact']).name}: top-1 {ev.top1:.2f}")

    def eager(t):
        with torch.inference_mode():
            return model(t)

    lat = latency_ms({"eager fp32": eager, **table.runners}, x[:1].contiguous(), rounds=a.rounds, iters=a.iters)
    for row in table.rows:
        row["latency_ms"] = lat.get(row["name"])
    doc.update(eager_fp32_latency_ms=lat["eager fp32"], eager_fp32=fp32, rows=table.rows,
               time_s=time.perf_counter() - t0)
    md = markdown(doc)
    print(md)
    if a.json:
        from mobilevit_deploy.export.manifest import jsonable

        Path(a.json).write_text(json.dumps(jsonable(doc), indent=1) + "\n")
    if a.md:
        Path(a.md).write_text(md + "\n")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def markdown(doc) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        f"PTQ of {doc['model']} ({doc['weights']}), input {doc['input_size'][1]}x{doc['input_size'][2]}; "
        f"top-1 on {doc['val']} ({doc['val_images']} images); calibration {doc['calibration']['images']} images "
        f"from {doc['calibration']['source']}; latency: median of round-robin timed calls, batch 1, "
        f"{doc['threads']} threads (eager fp32 PyTorch: {doc['eager_fp32_latency_ms']:.2f} ms).",
        "",
        "| target | scheme | size MB | x fp32 | top-1 % | agreement % | SQNR dB | latency ms | numerics from |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in doc["rows"]:
        sq = r["sqnr_fp32_db"]
        lines.append(
            f"| {r['target']} | {r['name'].split(' ', 1)[1]} | {f(r['size_bytes'] and r['size_bytes'] / 1e6, '.2f')} | "
            f"{f(r['size_ratio_fp32'], '.2f')} | {r['top1']:.2f} | {r['agree_fp32']:.1f} | "
            f"{'inf' if sq is None or sq == float('inf') else format(sq, '.1f')} | {f(r.get('latency_ms'), '.2f')} | "
            f"{r['numerics_from'].split(' (')[0]} |")
    for n in doc.get("notes", []):
        lines += ["", n]
    s = doc.get("sensitivity")
    if s:
        lines += ["", "Per-layer sensitivity (ExecuTorch int8; one unit quantized at a time, SQNR of the logits vs "
                      f"fp32 on {s['images']} calibration images; all quantized: {s['full_sqnr_db']:.1f} dB):", "",
                  "| rank | unit | type | SQNR dB | agreement % |", "| ---: | --- | --- | ---: | ---: |"]
        for i, u in enumerate(s["units"][:12]):
            lines.append(f"| {i + 1} | `{u['unit']}` | {u['kind']} | {u['sqnr_db']:.1f} | "
                         f"{u['top1_agreement'] * 100:.0f} |")
        lines += ["", "Keep the k most sensitive in float (simulation on the same images): " + ", ".join(
            f"k={c['keep_float']}: {c['sqnr_db']:.1f} dB" for c in s["keep_float_curve"])]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
