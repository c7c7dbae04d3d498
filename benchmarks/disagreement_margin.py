"""Are the images a quantized model disagrees on the ones the fp32 model is unsure of?

Reads a `vit_ptq_table.py --json` run (per-image top-1 of fp32 and of each W8A8 variant), recomputes
the fp32 softmax on the same validation images and prints, per variant, the fp32 top-1 minus top-2
probability margin of the disagreeing images against that of all images.

    python benchmarks/disagreement_margin.py benchmarks/vit_ptq_mobilevit_xxs.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_json", help="a vit_ptq_table.py --json output (shipped weights)")
    ap.add_argument("--val-dir", default=str(REPO.parent / "shared/data/cifar10/val"))
    ap.add_argument("--threshold", type=float, default=0.1, help="a 'near tie': margin below this (default 0.1)")
    args = ap.parse_args(argv)

    import torch

    from mobilevit_deploy.pretrained import create_default_model
    from vit_ptq_table import load_split, logits_of

    run = json.loads(Path(args.run_json).read_text())
    model, _ = create_default_model(run["model"])
    model.eval()
    xv, _, _ = load_split(args.val_dir, model.deploy_cfg)
    top2 = logits_of(model, xv).softmax(-1).topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    fp = torch.tensor(run["fp32_pred"])
    if not torch.equal(logits_of(model, xv).argmax(-1), fp):
        raise SystemExit("the fp32 predictions differ from the run's: not the same weights or images")
    t = args.threshold
    print(f"| W8A8 variant | disagreeing images | median fp32 margin: disagreeing / all | margin < {t}: disagreeing / all |")
    print("|---|---:|---:|---:|")
    for k, r in run.get("w8a8", {}).items():
        dis = torch.tensor(r["pred"]) != fp
        print(f"| {k} | {int(dis.sum())} | {margin[dis].median():.3f} / {margin.median():.3f} | "
              f"{(margin[dis] < t).double().mean() * 100:.0f} % / {(margin < t).double().mean() * 100:.0f} % |")


if __name__ == "__main__":
    main()
