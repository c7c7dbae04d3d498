"""Measure every post-training quantization scheme on one model: the table of the README.

    python benchmarks/ptq_table.py --model mobilevit_xxs \
        --calib-data ../shared/data/cifar10/train --val ../shared/data/cifar10/val \
        --json benchmarks/ptq_mobilevit_xxs.json --md benchmarks/ptq_mobilevit_xxs.md

For fp32 and each scheme: artifact size (and ratio to the fp32 artifact of the same target), top-1 on
the validation folder, top-1 agreement and SQNR of the logits against the fp32 model, and latency on
this machine (ExecuTorch / ONNX Runtime; Core ML cannot run on Linux). Every artifact is produced by
`export_model(..., quant=...)`, the same path as `python -m mobilevit_deploy.export --quant`.

Where the numbers come from:
- .pte / .onnx: the artifact itself, run by its runtime on every validation image;
- Core ML: the torch-side model of the scheme (`export_model(...).quantized.reference`: coremltools' own
  weight compress/decompress on the BN-folded weights, or the converted CoreMLQuantizer q/dq graph),
  because Core ML does not run on Linux. Sizes are the saved .mlpackage sizes.

Keep-in-float: the per-layer sensitivity of the ExecuTorch int8 scheme is measured once on the
calibration images (`quantize.sensitivity.rank_units`) and printed; then int8 artifacts keeping the
k most sensitive units in float are exported for each k of --keep-float-sweep (the same as
`--keep-float auto:k`), so the default can be chosen from measured top-1 / agreement.

Latency: every runnable artifact (and eager fp32) is timed round-robin -- in each round every row
runs `--iters` inferences after one untimed call, the row order rotating -- and the median over all
timed calls is reported, so the shared machine's load shifts all rows alike.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load_model(name, checkpoint):
    from mobilevit_deploy.models import DeployCfg, create_model

    if checkpoint is None:
        from mobilevit_deploy.pretrained import shipped_weights

        sw = shipped_weights(name)
        if sw is None:
            raise SystemExit(f"no shipped weights for {name} (mobilevit_deploy/assets/weights): pass --checkpoint")
        return create_model(name, checkpoint=str(sw.path), deploy_cfg=sw.deploy_cfg), f"shipped {sw.path.name}", sw.meta
    p = Path(checkpoint)
    meta_p = p.with_suffix(".json")
    meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    cfg = DeployCfg.from_dict(meta["deploy_cfg"]) if "deploy_cfg" in meta else None
    return create_model(name, checkpoint=str(p), deploy_cfg=cfg), f"checkpoint {p}", meta


def load_val(root, cfg, limit=None):
    import torch

    from mobilevit_deploy.data import list_image_folder, load_batch

    samples, classes = list_image_folder(root)
    labels = cfg.class_labels
    if sorted(classes) != sorted(labels):
        raise SystemExit(f"class folders {classes} do not match the model's labels {labels}")
    if limit and limit < len(samples):
        step = len(samples) / limit
        samples = [samples[int(i * step)] for i in range(limit)]
    x = torch.cat([load_batch([p for p, _ in samples[i:i + 200]], cfg) for i in range(0, len(samples), 200)])
    y = torch.tensor([labels.index(classes[c]) for _, c in samples])
    return x, y


def logits_of(fn, x, batch=100):
    import torch

    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch]).float() for i in range(0, x.shape[0], batch)])


def metrics(logits, y, ref):
    from mobilevit_deploy.verify import sqnr_db, top1_agreement

    return {"top1": float((logits.argmax(-1) == y).double().mean()) * 100,
            "agree_fp32": top1_agreement(ref, logits) * 100, "sqnr_fp32_db": sqnr_db(ref, logits)}


def time_round_robin(rows: dict, x1, *, rounds: int, iters: int) -> dict:
    """{name: median ms} of fn(x1) for each row, interleaved round-robin (see module docstring)."""
    import statistics

    names = list(rows)
    samples = {n: [] for n in names}
    for n in names:  # warm-up
        for _ in range(3):
            rows[n](x1)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            rows[n](x1)
            for _ in range(iters):
                t = time.perf_counter()
                rows[n](x1)
                samples[n].append((time.perf_counter() - t) * 1e3)
    return {n: statistics.median(v) for n, v in samples.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilevit_xxs")
    ap.add_argument("--checkpoint", default=None, help="default: the shipped weights")
    ap.add_argument("--calib-data", default=None, help="default: the shipped sample images")
    ap.add_argument("--calib-size", type=int, default=None)
    ap.add_argument("--val", required=True, help="ImageFolder with the model's labels")
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--schemes", default="executorch:int8,executorch:int8-dynamic,coreml:w8,coreml:palette6,"
                                          "coreml:palette4,coreml:palette-mixed,coreml:int8")
    ap.add_argument("--keep-float-sweep", default="0,1,2,3,4,6",
                    help="k values: ExecuTorch int8 with the k most sensitive units kept in float")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="artifact directory (default: a temporary one, removed)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    from mobilevit_deploy.export import export_model
    from mobilevit_deploy.quantize import load_calibration
    from mobilevit_deploy.quantize.executorch_schemes import xnnpack_quantizer_factory
    from mobilevit_deploy.quantize.sensitivity import format_report, rank_units
    from mobilevit_deploy.runtime import load_artifact

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, source, meta = load_model(a.model, a.checkpoint)
    cfg = model.deploy_cfg
    calib = load_calibration(a.calib_data, a.calib_size)
    log(f"model {a.model} ({source}), input {cfg.input_size[1]}x{cfg.input_size[2]}; calibration: "
        f"{len(calib)} images from {calib.source}")
    x, y = load_val(a.val, cfg, a.val_limit)
    ref = logits_of(model, x)
    fp32 = metrics(ref, y, ref)
    log(f"fp32 eager: top-1 {fp32['top1']:.2f} % on {len(y)} images")

    tmp = None
    out = Path(a.out) if a.out else Path(tmp := tempfile.mkdtemp(prefix="ptq_table_"))
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": a.model, "weights": source, "weights_meta_val_top1": meta.get("val_top1"),
           "input_size": list(cfg.input_size), "val": str(a.val), "val_images": len(y),
           "calibration": calib.describe(), "threads": a.threads, "rows": [], "sensitivity": None}

    # per-layer sensitivity (ExecuTorch int8) and the keep-float sweep built on it
    sweep = [int(k) for k in a.keep_float_sweep.split(",") if k.strip()]
    t = time.perf_counter()
    rep = rank_units(model, xnnpack_quantizer_factory(True), calib, cfg, scheme="executorch int8",
                     eval_images=64, curve_max=max(sweep + [0]), progress=False)
    log(format_report(rep, top=20))
    doc["sensitivity"] = {**rep.to_dict(), "time_s": time.perf_counter() - t}
    ranked = rep.ranked()

    runners, rows = {}, []

    def add_row(name, target, scheme, res, logits_fn, numerics, extra=None):
        m = res.manifest if res is not None else {}
        qb = m.get("quantization") or {}
        lg = logits_of(logits_fn, x)
        row = {"name": name, "target": target, "scheme": scheme, "numerics_from": numerics,
               "artifact": str(res.artifact) if res else None,
               "size_bytes": m.get("artifact", {}).get("size_bytes"),
               "size_ratio_fp32": qb.get("size_ratio_fp32", 1.0 if res is not None else None),
               **metrics(lg, y, ref), "manifest_accuracy": qb.get("accuracy"),
               "keep_float": (qb.get("keep_float") or {}).get("units"), **(extra or {})}
        rows.append(row)
        log(f"{name}: {row['size_bytes'] and row['size_bytes'] / 1e6:.2f} MB, top-1 {row['top1']:.2f}, agree "
            f"{row['agree_fp32']:.1f} %, SQNR {row['sqnr_fp32_db']:.1f} dB ({numerics})")
        return row

    def export(target, quant=None, sub=None, **kw):
        t = time.perf_counter()
        res = export_model(a.model, target, model=model, deploy_cfg=cfg, out_dir=out / (sub or quant or "fp32") / target,
                           quant=quant, calib_data=a.calib_data if quant else None,
                           calib_size=a.calib_size if quant else None, log=lambda s: log("  " + s), **kw)
        return res, time.perf_counter() - t

    wanted = [s.split(":") for s in a.schemes.split(",") if s]
    # fp32 rows
    for target in ("executorch", "onnx"):
        res, dt = export(target)
        r = load_artifact(res.artifact, num_threads=a.threads)
        runners[f"{target} fp32"] = r
        add_row(f"{target} fp32", target, "fp32", res, r, f"{target} artifact", {"export_s": dt})
    res, dt = export("coreml")
    add_row("coreml fp16", "coreml", "fp16", res, model, "fp32 PyTorch (Core ML fp16 not run on Linux)",
            {"export_s": dt})

    for target, scheme in wanted:
        if target == "executorch" and scheme == "int8":
            for k in sweep:
                kf = ",".join(ranked[:k]) if k else "none"
                res, dt = export(target, scheme, sub=f"int8_keepfloat{k}", keep_float=kf)
                r = load_artifact(res.artifact, num_threads=a.threads)
                name = f"executorch int8 (keep-float {k})"
                runners[name] = r
                add_row(name, target, scheme, res, r, "executorch artifact", {"export_s": dt, "keep_float_k": k})
            continue
        res, dt = export(target, scheme)
        if target == "coreml":  # Core ML does not run on Linux: the export's own torch-side reference
            q = res.quantized
            add_row(f"coreml {scheme}", target, scheme, res, q.reference, "torch-side (" + q.info["torch_side"] + ")",
                    {"export_s": dt})
        else:
            r = load_artifact(res.artifact, num_threads=a.threads)
            runners[f"{target} {scheme}"] = r
            add_row(f"{target} {scheme}", target, scheme, res, r, f"{target} artifact", {"export_s": dt})

    # cross-check: the evaluate CLI's function on the int8 .pte gives the same top-1
    from mobilevit_deploy.evaluate import evaluate

    for row in rows:
        if row["name"] == "executorch int8 (keep-float 0)" and a.val_limit is None:
            ev = evaluate(a.val, artifact=row["artifact"], progress=False, threads=a.threads)
            row["evaluate_cli_top1"] = ev.top1
            log(f"python -m mobilevit_deploy.evaluate --artifact {Path(row['artifact']).name}: top-1 {ev.top1:.2f}")

    # latency
    x1 = x[:1].contiguous()
    def eager(t):
        with torch.inference_mode():
            return model(t)

    lat = time_round_robin({"eager fp32": eager, **runners}, x1, rounds=a.rounds, iters=a.iters)
    for row in rows:
        row["latency_ms"] = lat.get(row["name"])
    doc["eager_fp32_latency_ms"] = lat["eager fp32"]
    doc["eager_fp32"] = fp32
    doc["rows"] = rows
    doc["time_s"] = time.perf_counter() - t0
    md = markdown(doc)
    print(md)
    if a.json:
        from mobilevit_deploy.export.manifest import _jsonable

        Path(a.json).write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
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
        lines += ["", f"Per-layer sensitivity (ExecuTorch int8; one unit quantized at a time, SQNR of the logits vs fp32 "
                      f"on {s['images']} calibration images; all quantized: {s['full_sqnr_db']:.1f} dB):", "",
                  "| rank | unit | type | SQNR dB | agreement % |", "| ---: | --- | --- | ---: | ---: |"]
        for i, u in enumerate(s["units"][:12]):
            lines.append(f"| {i + 1} | `{u['unit']}` | {u['kind']} | {u['sqnr_db']:.1f} | {u['top1_agreement'] * 100:.0f} |")
        lines += ["", "Keep the k most sensitive in float (simulation on the same images): " + ", ".join(
            f"k={c['keep_float']}: {c['sqnr_db']:.1f} dB" for c in s["keep_float_curve"])]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
