"""`python -m mobilevit_deploy.export --target {coreml,executorch,onnx} [--model mobilevit_xxs]
[--checkpoint PATH] [--num-classes N] [--out artifacts/] [--backend xnnpack|coreml] [--precision fp16|fp32]
[--quant SCHEME [--calib-data DIR] [--calib-size N] [--keep-float LAYER,...|auto:N|none]
[--calibration minmax|vit] [--weight-bits-budget B]] [--size H|HxW]
[--cascade S1,S2|exitK [--exit-data DIR] [--max-drop PTS] [--exit-head HEAD.safetensors]]`

Thin: parse, build the ExportConfig once (`config_from_args`), call `export_model`, print one line
per stage. Exit 0 on success, 2 on bad input (one `error:` line, nothing written), 1 when the
artifact was written but failed verification.
"""
from __future__ import annotations

import os
import sys

from ..cli import ArgumentParser, quiet_toolchain, run_cli
from .config import TARGETS, ExportConfig


def build_parser():
    p = ArgumentParser(
        prog="python -m mobilevit_deploy.export",
        description="Export a model to Core ML (.mlpackage), ExecuTorch (.pte) or ONNX (.onnx), verify it "
                    "against PyTorch on the shipped sample images, and write a manifest beside it.",
    )
    p.add_argument("--target", required=True, choices=TARGETS, help="coreml | executorch | onnx")
    p.add_argument("--model", default="mobilevit_xxs", help="registered model name (default: mobilevit_xxs)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help=".safetensors or .pt weights; default: the shipped weights, else untrained (warned)")
    p.add_argument("--num-classes", type=int, default=None, metavar="N", help="classifier size of the checkpoint")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model option (repeatable; YAML value), e.g. keep_rate=0.7, token_reduction=dynamicvit, "
                        "gather=topk; a checkpoint's JSON model_kwargs are applied first")
    p.add_argument("--out", default="artifacts", metavar="DIR", help="output directory (default: artifacts/)")
    p.add_argument("--backend", default=None,
                   help="executorch: xnnpack (default, CPU) or coreml (ExecuTorch Core ML delegate for iOS)")
    p.add_argument("--precision", default=None, choices=("fp16", "fp32"),
                   help="Core ML compute precision (default fp16); ExecuTorch XNNPACK and ONNX are fp32")
    p.add_argument("--quant", default=None, metavar="SCHEME",
                   help="post-training quantization: executorch int8 | int8-latency (int8 where it is faster here, "
                        "per layer) | int8-dynamic (linears) | int8-dynamic-all (every conv and linear); "
                        "coreml w8 | palette6 | palette4 | palette-mixed | int8 "
                        "(see mobilevit_deploy/quantize)")
    p.add_argument("--calib-data", default=None, metavar="DIR",
                   help="calibration images (ImageFolder or a folder of images); default: the 40 shipped samples")
    p.add_argument("--calib-size", type=int, default=None, metavar="N",
                   help="calibration images to use (class-balanced, deterministic; default 256 with --calib-data)")
    p.add_argument("--keep-float", default=None, metavar="LAYERS|auto:N",
                   help="int8 schemes: leave these modules in float (comma-separated module paths or globs), "
                        "'auto:N' for the N most sensitive by per-layer SQNR, or 'none'")
    p.add_argument("--calibration", default=None, metavar="{minmax,vit}",
                   help="int8 (W8A8) schemes: minmax (default, the quantizer's own observers) or vit (ViT-aware PTQ, "
                        "Liu et al. 2021: searched steps + bias correction on the calibration images)")
    p.add_argument("--weight-bits-budget", type=float, default=None, metavar="B",
                   help="coreml palette-mixed: average weight bits over the palettized weights (default 6.0; "
                        "per-layer 4/6/8-bit palettes)")
    p.add_argument("--size", default=None, metavar="H|HxW",
                   help="input size of the exported graph, e.g. 256 or 256x192 (default: the weights' deploy size)")
    p.add_argument("--cascade", default=None, metavar="S1,S2[,...]|exitK",
                   help="coarse-to-fine cascade (coreml, executorch): one artifact with one graph per input size, "
                        "smallest first (e.g. 32,64), or exitK: an exit head after stage K (e.g. exit3) and the rest "
                        "of the network from its features; stage 1 answers when its max softmax probability reaches "
                        "the threshold chosen on --exit-data")
    p.add_argument("--exit-head", default=None, metavar="HEAD.safetensors",
                   help="--cascade exitK: the exit head's weights (python -m mobilevit_deploy.train.exit_head; "
                        "default: the head shipped for the model)")
    p.add_argument("--exit-data", default=None, metavar="DIR",
                   help="--cascade: ImageFolder the exit threshold is chosen on (default: the 40 shipped samples)")
    p.add_argument("--max-drop", type=float, default=None, metavar="PTS",
                   help="--cascade: top-1 points the cascade may lose against its last stage alone (default 0.5)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    p.add_argument("-v", "--verbose", action="store_true", help="show the toolchain's own logs and progress bars")
    return p


def config_from_args(args, log=print) -> ExportConfig:
    """The ExportConfig of parsed arguments (UserError for bad ones), with a note for flags a scheme
    does not use and for defaults that matter."""
    config = ExportConfig.from_dict({
        "target": args.target, "backend": args.backend, "precision": args.precision, "verify": not args.no_verify,
        "quant": args.quant, "calib_data": args.calib_data, "calib_size": args.calib_size,
        "keep_float": args.keep_float, "calibration": args.calibration, "weight_bits_budget": args.weight_bits_budget,
        "size": args.size, "cascade": args.cascade, "exit_data": args.exit_data, "max_drop": args.max_drop,
        "exit_head": args.exit_head,
    })
    q = config.quant
    if q is None:
        return config
    if "budget_avg_bits" in q.field_names() and args.weight_bits_budget is None:
        log(f"quantize: {config.target} {q.scheme}: no --weight-bits-budget given; using the default "
            f"{q.budget_avg_bits:.1f} average weight bits")
    if not q.calibrated and (args.calib_data is not None or args.calib_size is not None):
        log(f"quantize: {config.target} {q.scheme} needs no calibration; --calib-data/--calib-size are ignored")
    return config


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Before torch starts OpenMP: spinning worker threads make the many small ops of calibration and
    # the ViT-PTQ search several times slower whenever the 2 cores are shared (measured, docs/training.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not args.verbose:
        quiet_toolchain()
    from ..models.options import parse_model_args
    from ..pretrained import ModelSource
    from . import export_model

    config = config_from_args(args)
    src = ModelSource(args.model, args.checkpoint, args.num_classes, model_kwargs=parse_model_args(args.model_arg))
    res = export_model(src, config, out_dir=args.out)
    v = res.manifest.get("verification")
    if v is not None and not v.get("passed", True):
        print(f"error: {res.artifact.name} failed verification (kept for inspection; see {res.manifest_path})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
