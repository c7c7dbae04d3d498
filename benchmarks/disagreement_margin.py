"""Are the images a quantized model disagrees on the ones the fp32 model is unsure of?

Reads a `vit_ptq_table.py --json` run (per-image top-1 of fp32 and of each W8A8 variant), recomputes
the fp32 softmax on the same validation images and prints, per variant, the fp32 top-1 minus top-2
probability margin of the disagreeing images against that of all images.

    python -m benchmarks.disagreement_margin benchmarks/vit_ptq_mobilevit_xxs.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_json", help="a vit_ptq_table.py --json output (shipped weights)")
    ap.add_argument("--val-dir", default=str(REPO.parent / "shared/data/cifar10/val"))
    ap.add_argument("--threshold", type=float, default=0.1, help="a 'near tie': margin below this (default 0.1)")
    args = ap.parse_args(argv)

    import torch

    from mobilevit_deploy.data import load_labeled_folder
    from mobilevit_deploy.pretrained import load_model
    from mobilevit_deploy.verify import batched_logits

    run = json.loads(Path(args.run_json).read_text())
    model = load_model(run["model"]).module
    xv, _, _ = load_labeled_folder(args.val_dir, model.deploy_cfg)
    logits = batched_logits(model, xv)
    top2 = logits.softmax(-1).topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    fp = torch.tensor(run["fp32_pred"])
    if not torch.equal(logits.argmax(-1), fp):
        raise SystemExit("the fp32 predictions differ from the run's: not the same weights or images")
    t = args.threshold
    print("| W8A8 variant | disagreeing images | median fp32 margin: disagreeing / all "
          f"| margin < {t}: disagreeing / all |")
    print("|---|---:|---:|---:|")
    for k, r in run.get("w8a8", {}).items():
        dis = torch.tensor(r["pred"]) != fp
        print(f"| {k} | {int(dis.sum())} | {margin[dis].median():.3f} / {margin.median():.3f} | "
              f"{(margin[dis] < t).double().mean() * 100:.0f} % / {(margin < t).double().mean() * 100:.0f} % |")


if __name__ == "__main__":
    main()
