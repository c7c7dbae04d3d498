"""`python -m mobilevit_deploy.bench`: host latency benchmark, device reports, regression check.

Exit status: 0 done (and no regression); 1 a row regressed (or went missing) against --baseline;
2 bad input (one `error:` line).
"""
from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

from ..cli import ArgumentParser, run_cli

# Timing settings; with --baseline, any not given on the command line are taken from the baseline's
# "settings", because ratios are only comparable when measured the same way.
DEFAULTS = {"threads": os.cpu_count() or 1, "warmup": 10, "rounds": 7, "iters": 20, "size": None}


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def build_parser():
    p = ArgumentParser(prog="python -m mobilevit_deploy.bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", type=_csv, default=["mobilevit_xxs"], help="comma-separated (default mobilevit_xxs)")
    p.add_argument("--targets", type=_csv, default=["eager", "executorch", "onnx"],
                   help="eager,executorch,onnx,coreml (coreml only on macOS; default eager,executorch,onnx)")
    p.add_argument("--quant", type=_csv, default=["fp32"], help="fp32,int8 (default fp32)")
    p.add_argument("--size", type=int, default=None, help="input H = W (default: the model's DeployCfg size)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"threads for every runtime (default: all cores, {os.cpu_count()})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed inferences per runner first (default {DEFAULTS['warmup']})")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"round-robin rounds per pass (default {DEFAULTS['rounds']})")
    p.add_argument("--iters", type=int, default=None,
                   help=f"timed inferences per runner per round (default {DEFAULTS['iters']})")
    p.add_argument("--passes", type=int, default=1, help="timing passes; ratios are medians over passes (default 1)")
    p.add_argument("--weights", default="shipped", choices=["shipped", "random"],
                   help="shipped weights when the package has them, else random init (default shipped)")
    p.add_argument("--artifacts", default=None, help="keep exported artifacts in this folder (default: temporary)")
    p.add_argument("--reuse-artifacts", action="store_true",
                   help="with --artifacts: reuse artifacts exported earlier for the same weights and input size "
                        "(for iterating on the benchmark; a changed exporter is then NOT re-run)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results JSON here")
    p.add_argument("--report", default=None, help="write a Markdown report here (PNG plots next to it)")
    p.add_argument("--baseline", default=None, help="baseline JSON (a --json output): exit 1 on a regression")
    p.add_argument("--tolerance", type=float, default=0.25, help="allowed slowdown of the in-run ratio (default 0.25)")
    p.add_argument("--retries", type=int, default=2,
                   help="with --baseline: extra timing passes when a row looks regressed; ratios become "
                        "medians over all passes (default 2)")
    p.add_argument("--device-report", action="append", default=[], metavar="FILE",
                   help="a device report JSON (iOS app / macOS CI); repeatable")
    p.add_argument("--device-only", action="store_true", help="no host benchmark: only show the device reports")
    p.add_argument("--modelbench-out", default=None, metavar="DIR",
                   help="macOS: time each Core ML row by the ModelBench method and write device reports here")
    p.add_argument("--compute-units", default="cpuOnly", choices=["all", "cpuAndNeuralEngine", "cpuAndGPU", "cpuOnly"],
                   help="Core ML compute units (macOS; default cpuOnly)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cascade", type=_csv, default=None, metavar="S1,S2|exitK",
                   help="also time the cascade .pte of these stage sizes (e.g. 32,64), or the depth cascade exitK "
                        "(exit head after stage K, shipped weights) and its last stage / whole model alone "
                        "over the 40 shipped sample images: rows pte_cascade / pte_last_stage (per-image latency, "
                        "exit rate)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: ETDump + Inspector profile of each .pte (fp32 beside every --quant "
                        "scheme), per delegate call and per op, Converts and portable ops listed (bench/profile.py)")
    p.add_argument("--runs", type=int, default=30, help="--profile: profiled inferences per artifact (default 30)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model option for every benchmarked model (repeatable; YAML value), e.g. keep_rate=0.7")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import UserError
    from . import baseline as bl
    from . import report as rp
    from .device_report import load_device_report

    if args.tolerance <= 0:
        raise UserError(f"--tolerance must be > 0, got {args.tolerance}")
    if args.passes < 1 or args.retries < 0:
        raise UserError("--passes must be >= 1 and --retries >= 0")
    if args.profile:
        if args.reuse_artifacts and not args.artifacts:
            raise UserError("--reuse-artifacts needs --artifacts DIR")
        if args.runs < 1:
            raise UserError(f"--runs must be >= 1, got {args.runs}")
        from .profile import run_profile

        return run_profile(args)
    reports = [load_device_report(p) for p in args.device_report]  # validate before any long work
    base = bl.load_baseline(args.baseline) if args.baseline else None
    drows = rp.device_rows(reports) if reports else None
    if args.device_only:
        if not reports:
            raise UserError("--device-only needs at least one --device-report FILE")
        print(rp.format_device_rows(drows))
        if args.report:
            from pathlib import Path

            from ..checkpoint import atomic_write

            p = Path(args.report)
            plots = rp.write_plots({"rows": [], "settings": {"threads": 0}}, p.parent, p.stem, drows)
            text = "# Device reports\n\n" + "\n".join(rp.markdown_devices(drows)) + "\n" + "".join(
                f"![{t}]({f})\n" for t, f in plots.items())
            atomic_write(p, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            print(f"wrote {p}")
        return 0

    from ..models.options import parse_model_args
    from .harness import BenchConfig, BenchSession

    inherited = []
    for k, default in DEFAULTS.items():
        if getattr(args, k) is None:
            from_base = (base or {}).get("settings", {}).get(k)
            if from_base is not None:
                inherited.append(f"{k}={from_base}")
            setattr(args, k, from_base if from_base is not None else default)
    if inherited:
        print(f"settings from the baseline: {', '.join(inherited)}", file=sys.stderr)
    cfg = BenchConfig(models=args.models, targets=args.targets, quants=args.quant, size=args.size,
                      threads=args.threads, warmup=args.warmup, rounds=args.rounds, iters=args.iters,
                      weights=args.weights, artifacts_dir=args.artifacts,
                      reuse_artifacts=args.reuse_artifacts, coreml_compute_units=args.compute_units,
                      model_kwargs=parse_model_args(args.model_arg),
                      cascade=tuple(args.cascade) if args.cascade else None)
    if args.reuse_artifacts and not args.artifacts:
        raise UserError("--reuse-artifacts needs --artifacts DIR")
    verdicts = None
    with BenchSession(cfg, progress=not args.no_progress) as session:
        session.prepare()
        for _ in range(args.passes):
            session.measure()
        doc = session.result()
        if base is not None:
            verdicts = bl.compare(doc["rows"], base, args.tolerance)
            retries = 0
            while bl.has_regression(verdicts) and retries < args.retries and any(
                    v["verdict"] == "REGRESSION" for v in verdicts):
                retries += 1
                print(f"a row looks slower than the baseline; timing pass {len(session.passes) + 1} "
                      f"(retry {retries} of {args.retries}) -- ratios become medians over passes", file=sys.stderr)
                session.measure()
                doc = session.result()
                verdicts = bl.compare(doc["rows"], base, args.tolerance)
        if args.modelbench_out:
            _modelbench(session, doc, args)
    doc["command"] = "python -m mobilevit_deploy.bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if drows:
        doc["device_reports"] = drows
    if verdicts is not None:
        doc["regression"] = {"baseline": args.baseline, "tolerance": args.tolerance, "verdicts": verdicts,
                             "failed": bl.has_regression(verdicts)}

    print(rp.format_table(doc))
    if drows:
        print(rp.format_device_rows(drows))
    if args.json_out:
        print(f"wrote {rp.write_json(doc, args.json_out)}")
    if args.report:
        print(f"wrote {rp.write_report(doc, args.report, drows, verdicts, args.tolerance)}")
    if verdicts is not None:
        print(bl.format_verdicts(verdicts, args.tolerance))
        return 1 if bl.has_regression(verdicts) else 0
    return 0


def _modelbench(session, doc, args):
    """macOS: ModelBench-time each Core ML runner and write one device report per artifact."""
    import platform
    import subprocess
    from pathlib import Path

    from ..checkpoint import file_sha256
    from .device_report import build_device_report, run_modelbench, write_device_report

    out_dir = Path(args.modelbench_out)
    if not any(s.key[1] == "coreml" for s in session.slots):
        print("--modelbench-out: no Core ML row ran here (Core ML runs only on macOS); no device report written",
              file=sys.stderr)
    for slot in session.slots:
        model, target, quant = slot.key
        if target != "coreml":
            continue
        meas = run_modelbench(slot.runner.fn)
        mac = platform.mac_ver()[0]
        try:
            hw = subprocess.run(["sysctl", "-n", "hw.model"], capture_output=True, text=True).stdout.strip()
        except OSError:
            hw = ""
        rep = build_device_report(
            device_name=f"Mac ({platform.machine()})", device_identifier=hw or platform.machine(),
            os_name=f"macOS {mac}" if mac else platform.platform(), compute_units=args.compute_units, model=model,
            precision=quant if quant != "fp32" else (slot.runner.info.get("manifest") or {}).get("precision", "fp32"),
            input_size=doc["models"][model]["input_size"],
            artifact_sha256=file_sha256(slot.runner.artifact), measurement=meas)
        path = write_device_report(out_dir / f"{model}_{quant}_device_report.json", rep)
        print(f"wrote {path} (median {rep['stats_ms']['median']:.2f} ms)")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
