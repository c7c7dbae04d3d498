"""Export wall time, ExecuTorch vs ONNX, with the ExecuTorch lowering's phases, in one run.

    python -m benchmarks.profile_export_time --rounds 2 [--all-switches] [--before-tree /tmp/before]
        [--size 256] [--json OUT]

Each round runs, one after another in fresh processes (the order rotating every round, so a busy phase of the
shared machine hits all alike), `python -m mobilevit_deploy.export` for: `onnx`; `executorch` as this tree
does it; `executorch` with each of the lowering's speed-ups of export/et_lowering.py switched off alone
(provenance trimming, lean XNNPACK passes, skipped no-op decompositions, validate-once, the libyaml import,
delegate outputs from metadata; with `--all-switches`) and all off (ExecuTorch's own
`to_edge_transform_and_lower`; the rest of this tree unchanged); and, with `--before-tree DIR` (a copy of the
package before the change, e.g. `git archive HEAD | tar -x -C DIR`), `executorch` by that tree. Every export's
wall time is measured around the process; its manifest's `timings_s` gives the stages and (this tree) the
lowering's phases. Prints a table of medians over rounds and ratios to the ONNX export of the same round, plus
the CPU flags.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `executorch` with some of lower()'s speed-up switches off: {variant name: {keyword: False}}
SWITCHED_OFF = {
    "executorch (no provenance trim)": {"trim_provenance": False},
    "executorch (no lean passes)": {"lean_passes": False},
    "executorch (no skipped decompositions)": {"skip_decompositions": False},
    "executorch (no validate-once)": {"validate_once": False},
    "executorch (no fast import)": {"fast_import": False},
    "executorch (no delegate meta)": {"delegate_meta": False},
    "executorch (no fused edge passes)": {"fuse_edge": False},
    "executorch (no deferred re-traces)": {"defer_retraces": False},
    "executorch (all speed-ups off)": {"trim_provenance": False, "lean_passes": False, "skip_decompositions": False,
                                       "validate_once": False, "fast_import": False, "delegate_meta": False,
                                       "fuse_edge": False, "defer_retraces": False},
}


def switched_off(kwargs: dict) -> str:
    return ("import functools, sys; import mobilevit_deploy.export.executorch as e; "
            f"e.lower = functools.partial(e.lower, **{kwargs!r}); "
            "from mobilevit_deploy.cli import run_cli; from mobilevit_deploy.export.__main__ import main; "
            "sys.exit(run_cli(main, sys.argv[1:]))")


def cpu_flags() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    d = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in ("Model name", "CPU(s)", "Flags"):
            d[k.strip()] = v.strip()
    flags = set(d.get("Flags", "").split())
    d["simd"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    d.pop("Flags", None)
    d["loadavg"] = os.getloadavg()
    return d


def run_variant(name: str, args: list[str], out: Path, before_tree: str | None) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    cwd = REPO
    if name == "executorch (before)":
        env["PYTHONPATH"] = before_tree
        cwd = before_tree
        cmd = [sys.executable, "-m", "mobilevit_deploy.export", *args]
    elif name in SWITCHED_OFF:
        cmd = [sys.executable, "-c", switched_off(SWITCHED_OFF[name]), *args]
    else:
        cmd = [sys.executable, "-m", "mobilevit_deploy.export", *args]
    t = time.perf_counter()
    r = subprocess.run(cmd + ["--out", str(out)], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    man = json.loads(next(out.glob("*.json")).read_text())
    return {"wall_s": wall, "timings_s": man.get("timings_s", {}), "stdout": r.stdout}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before-tree", default=None, help="a copy of the package before the change")
    p.add_argument("--size", default=None, help="export --size (default: the weights' deploy size)")
    p.add_argument("--all-switches", action="store_true",
                   help="also each speed-up switched off alone (default: only all off)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    size = ["--size", a.size] if a.size else []
    variants = {"onnx": ["--target", "onnx", *size], "executorch": ["--target", "executorch", *size]}
    variants.update({n: ["--target", "executorch", *size] for n in SWITCHED_OFF if a.all_switches or "all" in n})
    if a.before_tree:
        if a.size:
            raise SystemExit("--size is new: the before tree has no such option")
        variants["executorch (before)"] = ["--target", "executorch"]
    names = list(variants)
    results: dict[str, list] = {n: [] for n in names}
    flags = cpu_flags()
    print(f"CPU: {flags}", flush=True)
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            with tempfile.TemporaryDirectory(prefix="mvd_export_time_") as d:
                res = run_variant(n, variants[n], Path(d), a.before_tree)
            results[n].append(res)
            print(f"round {r + 1}: {n}: {res['wall_s']:.1f} s wall; "
                  + ", ".join(f"{k} {v:.1f}" for k, v in res["timings_s"].items()), flush=True)
    onnx = [x["wall_s"] for x in results["onnx"]]
    print("\n| export | median wall s | x ONNX (median of per-round ratios) |\n|---|---:|---:|")
    table = []
    for n in names:
        walls = [x["wall_s"] for x in results[n]]
        ratio = statistics.median(w / o for w, o in zip(walls, onnx))
        table.append({"export": n, "median_wall_s": statistics.median(walls), "x_onnx": ratio, "walls": walls})
        print(f"| {n} | {statistics.median(walls):.1f} | {ratio:.2f} |")
    print("\nphases (median over rounds, s):")
    for n in names:
        keys = sorted({k for x in results[n] for k in x["timings_s"]})
        med = {k: statistics.median(x["timings_s"].get(k, 0.0) for x in results[n]) for k in keys}
        print(f"  {n}: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": flags, "command": " ".join(sys.argv), "table": table,
                                            "runs": {n: [{k: v for k, v in x.items() if k != "stdout"}
                                                         for x in results[n]] for n in names}}, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
