"""`python -m mobilevit_deploy.bench --profile`: where an XNNPACK `.pte`'s time goes, per delegate call and per op.

    python -m mobilevit_deploy.bench --profile --size 256 --quant fp32,int8 --threads 2 \
        --report benchmarks/profile_mobilevit_xxs_256.md [--artifacts DIR [--reuse-artifacts]] [--runs 30]

For each model and each scheme of `--quant` (fp32 always, beside every quantized scheme) the `.pte`
is exported by the export stage itself (`runners.make_artifact`: the real pipeline at `--size`), then
run `--runs` times with ETDump on (`executorch.runtime`, `enable_etdump=True`) and read back with the
ExecuTorch Inspector. Reported per artifact: wall and `Method::execute` medians, the number of
delegate calls, every XNNPACK op type (median ms per inference, count, share), the int8<->fp32
Converts and the ops left to the portable kernels listed on their own, and the time outside any op
(delegate entry/exit, runtime). One home for this: `benchmarks/profile_pte.py` calls `profile_pte`
here (and adds ONNX Runtime's own profiler).
"""
from __future__ import annotations

import re
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

__all__ = ["profile_pte", "run_profile", "format_profile", "lscpu_flags"]

_SKIP_EVENTS = ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL", "Program::load_method", "Method::init")


def lscpu_flags() -> dict:
    """Model name, cores and the SIMD flags of this machine (recorded with every timing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    d = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        d[k.strip()] = v.strip()
    flags = d.get("Flags", "").split()
    simd = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "vnni"))]
    return {"model_name": d.get("Model name"), "cpus": d.get("CPU(s)"), "simd_flags": simd,
            "vnni": any("vnni" in f for f in flags), "all_flags": " ".join(flags)}


def _kind(name: str, delegated: bool) -> str:
    if not delegated:
        return "portable"
    if name.startswith("Convert"):
        return "convert"
    return "xnnpack"


def profile_pte(pte, x, *, threads: int, runs: int = 30, warmup: int = 5, workdir=None) -> dict:
    """Run `pte` with ETDump: {"wall_ms", "execute_ms", "delegate_calls", "ops": [{name, kind, count, ms}],
    "outside_ops_ms", "runs", "threads"} (ms are medians over runs of the per-run sums)."""
    import tempfile

    import executorch.extension.pybindings.portable_lib as et_lib
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    workdir = Path(workdir or tempfile.mkdtemp(prefix="mvd_profile_"))
    et_lib._unsafe_reset_threadpool(threads)
    prog = Runtime.get().load_program(str(pte), enable_etdump=True, debug_buffer_size=0)
    method = prog.load_method("forward")
    for _ in range(warmup):
        method.execute([x])
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        method.execute([x])
        walls.append((time.perf_counter() - t0) * 1e3)
    etdump = workdir / f"{Path(pte).stem}.etdp"
    prog.write_etdump_result_to_file(str(etdump), str(workdir / f"{Path(pte).stem}.debug.bin"))
    df = Inspector(etdump_path=str(etdump)).to_dataframe()
    df = df[df["event_block_name"] == "Execute"]
    names = list(df["event_name"])
    raws = [list(r) for r in df["raw"]]
    n = min(len(r) for r in raws)
    raws = [r[n - runs:n] if n >= runs else r[:n] for r in raws]  # the timed runs (after the warm-up)
    delegated = list(df["is_delegated_op"])
    total = raws[names.index("Method::execute")]
    groups: dict = defaultdict(lambda: [0.0] * len(total))
    counts: dict = defaultdict(int)
    kinds: dict = {}
    for i, name in enumerate(names):
        if name in _SKIP_EVENTS:
            continue
        key = re.sub(r" #\d+$", "", name)
        k = (key, _kind(key, bool(delegated[i])))
        groups[k] = [a + b for a, b in zip(groups[k], raws[i])]
        counts[k] += 1
        kinds[k] = k[1]
    ops = [{"name": k[0], "kind": k[1], "count": counts[k], "ms": statistics.median(v)} for k, v in groups.items()]
    ops.sort(key=lambda r: -r["ms"])
    op_sums = [sum(groups[k][j] for k in groups) for j in range(len(total))]
    return {"wall_ms": statistics.median(walls), "execute_ms": statistics.median(total),
            "delegate_calls": names.count("DELEGATE_CALL"), "ops": ops,
            "outside_ops_ms": statistics.median(t - s for t, s in zip(total, op_sums)), "runs": runs,
            "threads": threads}


def _summary(p: dict) -> dict:
    by = defaultdict(lambda: [0, 0.0])
    for o in p["ops"]:
        by[o["kind"]][0] += o["count"]
        by[o["kind"]][1] += o["ms"]
    return {k: {"count": c, "ms": ms} for k, (c, ms) in by.items()}


def format_profile(doc: dict) -> str:
    """Markdown of a profile document (what --report writes)."""
    lines = [f"# ExecuTorch profile: {', '.join(doc['models'])} at {doc['size'][0]}x{doc['size'][1]}", "",
             f"Command: `{doc['command']}`", "",
             f"Measured {doc['created']} on {doc['cpu']['model_name']} ({doc['cpu']['cpus']} CPUs, load average "
             f"{doc['loadavg'][0]:.1f} at start), {doc['threads']} threads, {doc['runs']} runs per artifact. "
             f"SIMD flags (lscpu): `{' '.join(doc['cpu']['simd_flags'])}`.", "",
             "Times are ETDump's (ExecuTorch runtime + XNNPACK profiler), medians over runs of the per-run sums, "
             "ms per inference; profiling adds overhead, so compare artifacts within this report. Each artifact was "
             "made by the export stage (`mobilevit_deploy.export`) at this size.", ""]
    lines += ["## Summary", "", "| artifact | wall ms | Method::execute ms | delegate calls | XNNPACK ops | Converts "
              "(ms) | portable ops (ms) | outside any op ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a in doc["artifacts"]:
        s = _summary(a["profile"])
        xn, cv, po = (s.get(k, {"count": 0, "ms": 0.0}) for k in ("xnnpack", "convert", "portable"))
        p = a["profile"]
        lines.append(f"| {a['label']} | {p['wall_ms']:.2f} | {p['execute_ms']:.2f} | {p['delegate_calls']} | "
                     f"{xn['count']} | {cv['count']} ({cv['ms']:.2f}) | {po['count']} ({po['ms']:.2f}) | "
                     f"{p['outside_ops_ms']:.2f} |")
    for a in doc["artifacts"]:
        p = a["profile"]
        lines += ["", f"## {a['label']}", "", f"`{a['file']}` ({a['size_bytes'] / 1e6:.2f} MB); ops outside the "
                  f"delegate at export: {a['ops_not_delegated'] or 'none'}", "",
                  "| op | kind | count | ms | % of execute |", "|---|---|---:|---:|---:|"]
        for o in p["ops"]:
            lines.append(f"| {o['name']} | {o['kind']} | {o['count']} | {o['ms']:.3f} | "
                         f"{100 * o['ms'] / p['execute_ms']:.1f} |")
        lines.append(f"| (outside any op: delegate entry/exit, runtime) | | | {p['outside_ops_ms']:.3f} | "
                     f"{100 * p['outside_ops_ms'] / p['execute_ms']:.1f} |")
        conv = [o for o in p["ops"] if o["kind"] == "convert"]
        port = [o for o in p["ops"] if o["kind"] == "portable"]
        lines += ["", f"Converts: {sum(o['count'] for o in conv)} ({sum(o['ms'] for o in conv):.3f} ms)"
                  + (": " + ", ".join(f"{o['name']} x{o['count']}" for o in conv) if conv else ""),
                  f"Portable ops: {sum(o['count'] for o in port)} ({sum(o['ms'] for o in port):.3f} ms)"
                  + (": " + ", ".join(f"{o['name']} x{o['count']}" for o in port) if port else "")]
    return "\n".join(lines) + "\n"


def _exported(out_dir, name: str, quant: str, size: int, sha: str | None):
    """`<name>[_<quant>].pte` already in `out_dir`, exported (e.g. by `python -m mobilevit_deploy.export
    --size`) from the same checkpoint at this size: (path, manifest), else None."""
    import json

    from ..export.config import artifact_path

    art = artifact_path(out_dir, name, "executorch", "xnnpack", None if quant == "fp32" else quant)
    try:
        m = json.loads(art.with_name(art.name + ".json").read_text())
    except (OSError, ValueError):
        return None
    q = (m.get("quantization") or {}).get("scheme", "fp32")
    if art.is_file() and q == quant and sha and m.get("checkpoint", {}).get("sha256") == sha \
            and m.get("input", {}).get("shape", [])[2:] == [size, size]:
        print(f"profile: reusing {art}", file=__import__("sys").stderr)
        return art, m
    return None


def run_profile(args) -> int:
    """The --profile mode of the bench CLI (args: models, quant, size, threads, runs, artifacts, reuse_artifacts,
    report, json_out)."""
    import json
    import shlex
    import sys
    import tempfile
    from dataclasses import replace

    from ..checkpoint import atomic_write
    from ..export.manifest import utc_now
    from ..pretrained import load_model
    from .harness import bench_input, get_default_size
    from .runners import SkipRow, make_artifact

    quants = ["fp32"] + [q for q in args.quant if q != "fp32"]
    threads = args.threads or 1
    runs = getattr(args, "runs", None) or 30
    tmp = None
    out_dir = args.artifacts
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mvd_profile_")
        out_dir = tmp.name
    cpu = lscpu_flags()
    import os

    doc = {"command": "python -m mobilevit_deploy.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "created": utc_now(), "cpu": cpu, "loadavg": list(os.getloadavg()), "threads": threads, "runs": runs,
           "models": list(args.models), "artifacts": []}
    try:
        for name in args.models:
            loaded = load_model(name)
            size = args.size or get_default_size(name)
            dcfg = replace(loaded.deploy_cfg, input_size=(3, size, size))
            model = loaded.module
            model.deploy_cfg = dcfg
            doc["size"] = [size, size]
            x = bench_input(dcfg)
            for q in quants:
                print(f"profile: {name} {q} at {size}x{size}: exporting", file=sys.stderr)
                found = _exported(out_dir, name, q, size, loaded.checkpoint.get("sha256")) if args.reuse_artifacts \
                    else None
                try:
                    art, man = found or make_artifact(name, "executorch", q, out_dir, model=model, deploy_cfg=dcfg)
                except SkipRow as e:
                    print(f"profile: {name} {q}: skipped ({e})", file=sys.stderr)
                    continue
                p = profile_pte(art, x, threads=threads, runs=runs)
                label = f"{name} {q} `.pte`"
                doc["artifacts"].append({"label": label, "model": name, "quant": q, "file": Path(art).name,
                                         "size_bytes": Path(art).stat().st_size,
                                         "ops_not_delegated": man.get("ops_not_delegated_counts") or {},
                                         "profile": p})
                s = _summary(p)
                print(f"profile: {label}: execute {p['execute_ms']:.2f} ms, {p['delegate_calls']} delegate call(s), "
                      + ", ".join(f"{k} {v['count']} ({v['ms']:.2f} ms)" for k, v in s.items()), file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()
    text = format_profile(doc)
    print(text)
    if args.report:
        rp = Path(args.report)
        atomic_write(rp, lambda t: Path(t).write_text(text, encoding="utf-8"))
        print(f"wrote {rp}")
    if args.json_out:
        jp = Path(args.json_out)
        atomic_write(jp, lambda t: Path(t).write_text(json.dumps(doc, indent=2), encoding="utf-8"))
        print(f"wrote {jp}")
    return 0
