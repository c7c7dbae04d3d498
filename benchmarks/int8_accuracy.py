"""Top-1 on val of the fp32 and int8 `.pte` of the shipped weights, and their agreement: one command.

    python -m benchmarks.int8_accuracy [--size 256] [--data ../shared/data/cifar10/val] [--out /tmp/int8_acc]
        [--reuse] [--limit N] [--json OUT.json]

Exports (the real CLI, `python -m mobilevit_deploy.export --target executorch [--quant int8] --size S`)
the fp32 and the int8 `.pte` into --out (with --reuse: artifacts already there from the same
checkpoint at this size are used), then runs both over the val images with the ExecuTorch runtime
(`mobilevit_deploy.runtime.load_artifact`, preprocessing from the manifest, as `python -m
mobilevit_deploy.evaluate --artifact` does) and prints top-1 of each, the difference in points and
the top-1 agreement int8 vs fp32. Rerun it after the shipped weights change.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _export(out: Path, size: str, quant: str | None, reuse: bool) -> Path:
    from mobilevit_deploy.checkpoint import file_sha256
    from mobilevit_deploy.pretrained import shipped_weights

    name = "mobilevit_xxs" + (f"_{quant}" if quant else "") + ".pte"
    art = out / name
    if reuse and art.is_file():
        m = json.loads(art.with_name(name + ".json").read_text())
        sw = shipped_weights("mobilevit_xxs")
        h = int(size.split("x")[0])
        if sw is not None and m["checkpoint"].get("sha256") == file_sha256(sw.path) \
                and m["input"]["shape"][2] == h:
            return art
    cmd = [sys.executable, "-m", "mobilevit_deploy.export", "--target", "executorch", "--size", size,
           "--out", str(out)] + (["--quant", quant] if quant else [])
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return art


def _predict(art: Path, data: str, limit: int | None):
    """(predictions, labels) of the artifact over the ImageFolder `data` (preprocessing from its manifest)."""
    import torch

    from mobilevit_deploy.data import list_image_folder, load_batch
    from mobilevit_deploy.export.manifest import read_manifest
    from mobilevit_deploy.models import DeployCfg
    from mobilevit_deploy.runtime import load_artifact

    cfg = DeployCfg.from_dict(read_manifest(art)["deploy_cfg"])
    samples, classes = list_image_folder(data)
    labels = cfg.class_labels
    if limit and limit < len(samples):
        step = len(samples) / limit
        samples = [samples[int(i * step)] for i in range(limit)]
    run = load_artifact(art)
    preds, ys = [], []
    for i in range(0, len(samples), 50):
        chunk = samples[i:i + 50]
        with torch.no_grad():
            preds += run(load_batch([q for q, _ in chunk], cfg)).argmax(-1).tolist()
        ys += [labels.index(classes[c]) for _, c in chunk]
    return preds, ys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256")
    p.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10/val"))
    p.add_argument("--out", default="/tmp/int8_acc")
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    arts = {"fp32": _export(out, a.size, None, a.reuse), "int8": _export(out, a.size, "int8", a.reuse)}
    res = {k: _predict(v, a.data, a.limit) for k, v in arts.items()}
    labels = res["fp32"][1]
    n = len(labels)
    top1 = {k: 100.0 * sum(int(p == y) for p, y in zip(v[0], labels)) / n for k, v in res.items()}
    agree = 100.0 * sum(int(x == y) for x, y in zip(res["fp32"][0], res["int8"][0])) / n
    doc = {"size": a.size, "data": a.data, "images": n, "top1": top1,
           "int8_minus_fp32_points": top1["int8"] - top1["fp32"],
           "agreement_int8_fp32": agree, "artifacts": {k: str(v) for k, v in arts.items()},
           "command": "python -m benchmarks.int8_accuracy " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"{n} images of {a.data} at {a.size}: top-1 fp32 {top1['fp32']:.2f} %, int8 {top1['int8']:.2f} % "
          f"({doc['int8_minus_fp32_points']:+.2f} points); int8 agrees with fp32 on {agree:.1f} %")
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
