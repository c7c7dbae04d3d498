"""`python -m mobilevit_deploy.quantize {sensitivity,schemes}`

    python -m mobilevit_deploy.quantize sensitivity --model mobilevit_xxs [--checkpoint PATH] [--num-classes N]
        [--target executorch|coreml] [--calib-data DIR] [--calib-size N] [--eval-images N] [--top N] [--size S]
    python -m mobilevit_deploy.quantize schemes

`sensitivity`: the per-layer sensitivity of the target's calibrated int8 (W8A8) scheme on the
calibration images (`sensitivity.rank_units`: one unit fake-quantized at a time, SQNR of the logits
against fp32), most sensitive first, then every quantizable unit -- the names `--keep-float` takes.
`schemes`: the quantization schemes per target. Exit 0, or 2 with one `error:` line for bad input.
"""
from __future__ import annotations

import os

from ..cli import ArgumentParser, quiet_toolchain, run_cli

W8A8_TARGETS = ("executorch", "coreml")


def build_parser():
    p = ArgumentParser(prog="python -m mobilevit_deploy.quantize",
                       description="Per-layer quantization sensitivity and the list of schemes.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sensitivity", help="rank the quantizable layers of a model by per-layer SQNR")
    s.add_argument("--model", default="mobilevit_xxs", help="registered model name (default: mobilevit_xxs)")
    s.add_argument("--checkpoint", default=None, metavar="PATH", help="weights; default: the shipped weights")
    s.add_argument("--num-classes", type=int, default=None, metavar="N", help="classifier size of the checkpoint")
    s.add_argument("--target", default="executorch", choices=W8A8_TARGETS,
                   help="whose int8 quantizer: executorch (XNNPACKQuantizer, default) or coreml (CoreMLQuantizer)")
    s.add_argument("--calib-data", default=None, metavar="DIR",
                   help="calibration images (default: the shipped samples)")
    s.add_argument("--calib-size", type=int, default=None, metavar="N", help="calibration images to use")
    s.add_argument("--eval-images", type=int, default=32, metavar="N",
                   help="calibration images the SQNR is measured on (default 32)")
    s.add_argument("--top", type=int, default=15, metavar="N", help="rows of the ranking to print (default 15)")
    s.add_argument("--size", type=int, default=None, metavar="S", help="input side (default: the model's)")
    sub.add_parser("schemes", help="list the quantization schemes per target")
    return p


def _schemes() -> int:
    from . import list_schemes, scheme_config_class

    for target, names in list_schemes().items():
        for name in names:
            cls = scheme_config_class(target, name)
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            print(f"{target:<11} {name:<14} {'calibrated' if cls.calibrated else '          '}  {doc}")
    return 0


def _sensitivity(args) -> int:
    from dataclasses import replace

    from ..errors import UserError
    from ..pretrained import load_model
    from . import get_config
    from .sensitivity import format_report, rank_units

    if args.eval_images < 1 or args.top < 1:
        raise UserError("--eval-images and --top must be >= 1")
    cfg = get_config(args.target, "int8", calib_data=args.calib_data, calib_size=args.calib_size)
    calib = cfg.calibration_set()  # a missing or empty folder fails before the model is built
    loaded = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes, log=print)
    dcfg = loaded.deploy_cfg if args.size is None else replace(loaded.deploy_cfg, input_size=(3, args.size, args.size))
    if args.target == "executorch":
        from .executorch_schemes import xnnpack_quantizer_factory

        factory = xnnpack_quantizer_factory(cfg.per_channel)
    else:
        from .coreml_schemes import coreml_quantizer_factory

        factory = coreml_quantizer_factory(cfg)
    rep = rank_units(loaded.module, factory, calib, dcfg, scheme=f"{args.target} int8", eval_images=args.eval_images,
                     batch_size=cfg.calib_batch_size, curve_max=min(8, args.top), progress=False)
    print(format_report(rep, top=args.top))
    print(f"quantizable units ({len(rep.units)}; --keep-float takes these names or fnmatch globs over them):")
    for u in sorted(rep.units, key=lambda u: u.unit):
        print(f"  {u.unit}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "schemes":
        return _schemes()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    quiet_toolchain()
    return _sensitivity(args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
