"""`python -m mobilevit_deploy.prune [--model M] [--checkpoint C] --data DIR (--target-macs R | --target-latency R)
[--method taylor|magnitude|slim|vtp|nvit|wd|spvit] [--epochs N] [--no-distill] --out DIR`

Structured pruning into a smaller dense model: scores every prunable structure (MV2 expansion
channels, transformer width, attention heads, MLP hidden units, whole transformer layers; with
spvit, attention layers turned into convolutions), removes
the least important per unit of cost until the MACs (or predicted .pte latency) are R x those of
the unpruned model, fine-tunes with KD from the unpruned model, and writes DIR/model.safetensors +
DIR/model.json (with the architecture record: `create_model(name, checkpoint=DIR/model.safetensors)`
rebuilds it). --data is an ImageFolder root with train/ and val/. One line per step. Exit 2 with one
`error:` line (nothing written) on bad input. See docs/pruning.md.
"""
from __future__ import annotations

import os

from ..cli import ArgumentParser, run_cli


def build_parser():
    from .importance import METHODS

    p = ArgumentParser(prog="python -m mobilevit_deploy.prune", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--model", default="mobilevit_xxs", help="registered model name (default: mobilevit_xxs)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights to prune (sibling JSON gives the deploy input size and labels); default: the "
                        "shipped weights of --model")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root with train/ and val/")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-macs", type=float, metavar="R", help="keep this fraction of the MACs, in (0, 1]")
    g.add_argument("--target-latency", type=float, metavar="R",
                   help="keep this fraction of the .pte latency, in (0, 1] (NViT latency table, cached)")
    p.add_argument("--method", default="taylor", metavar="|".join(METHODS),
                   help="importance: taylor (default), magnitude, slim, vtp, nvit, wd (WDPruning: width masks + "
                        "depth by shallow classifiers), spvit (attention -> convolution gates + MLP/MV2 masks)")
    p.add_argument("--epochs", type=int, default=1, help="KD fine-tuning epochs after pruning (default 1; 0: none)")
    p.add_argument("--no-distill", action="store_true",
                   help="fine-tune on the labels only (no KD from the unpruned model)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (model.safetensors + model.json)")
    p.add_argument("--batch-size", type=int, default=32, help="scoring and fine-tuning batch (default 32)")
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning peak learning rate (default 5e-4)")
    p.add_argument("--calib-batches", type=int, default=4, help="scoring batches of train images (default 4)")
    p.add_argument("--mask-steps", type=int, default=30, help="slim/vtp: soft-mask training steps (default 30)")
    p.add_argument("--mask-l1", type=float, default=0.5, help="slim/vtp: L1 weight on the masks (default 0.5)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="use only N train images")
    p.add_argument("--limit-val", type=int, default=None, metavar="N", help="use only N val images")
    p.add_argument("--latency-table", default="measure", choices=("measure", "macs"),
                   help="--target-latency: measure the .pte table (cached) or assume latency ~ MACs")
    p.add_argument("--latency-threads", type=int, default=1, help="threads of the .pte latency measurement (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fine-tuning TrainConfig field, e.g. --set data.cache=true (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other CLIs: the 2 cores are shared
    from tqdm import tqdm

    from .stage import PruneConfig, prune

    cfg = PruneConfig(
        data=args.data, out=args.out, model=args.model, checkpoint=args.checkpoint, target_macs=args.target_macs,
        target_latency=args.target_latency, method=args.method, epochs=args.epochs, distill=not args.no_distill,
        calib_batches=args.calib_batches, batch_size=args.batch_size, mask_steps=args.mask_steps,
        mask_l1=args.mask_l1, lr=args.lr, limit_train=args.limit_train, limit_val=args.limit_val,
        latency_table=args.latency_table, latency_threads=args.latency_threads, train_overrides=tuple(args.overrides),
        threads=args.threads, seed=args.seed, progress=not args.no_progress)
    prune(cfg, log=lambda s: tqdm.write(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
