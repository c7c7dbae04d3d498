"""Printing and writing benchmark results: a console table, the Markdown report with PNG plots, JSON.

Performance targets of this project (issue): on this CPU, in one run, the fp32 `.pte` at most 1.0x
ONNX Runtime fp32 and the int8 `.pte` at most 0.6x ONNX Runtime fp32 (`vs_onnx_fp32` of the rows).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

PTE_TARGETS = {"fp32": 1.0, "int8": 0.6}  # executorch row's vs_onnx_fp32 must be <= this


def _f(x, fmt=".2f", none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def _mb(b):
    return None if b is None else b / 1e6


def target_status(rows: list[dict]) -> list[dict]:
    """The performance targets, one line per model and quant that has an executorch row."""
    out = []
    for r in rows:
        if r.get("target") != "executorch" or r.get("quant") not in PTE_TARGETS:
            continue
        limit = PTE_TARGETS[r["quant"]]
        v = r.get("vs_onnx_fp32") if r.get("status") == "ok" else None
        out.append({"model": r["model"], "quant": r["quant"], "limit": limit, "vs_onnx_fp32": v,
                    "met": None if v is None else v <= limit,
                    "note": "" if v is not None else (r.get("reason") or "no onnx fp32 row in this run")})
    return out


def format_table(doc: dict) -> str:
    """The console table (plain text)."""
    peak = doc["peak"]
    ref = doc["reference"]
    lines = [
        f"machine: {doc['machine']['cpu']} ({doc['machine']['cores']} cores), threads {doc['settings']['threads']}",
        f"fp32 matmul peak: {peak['gflops_per_s']:.1f} GFLOP/s ({peak['n']}x{peak['n']}, best of runs) -- "
        f"the physical-limit column '%peak' is each row's achieved GFLOP/s over this",
        f"reference for ratios: {ref['what']}: median {ref['median_ms']:.2f} ms "
        f"({ref['gflops_per_s']:.1f} GFLOP/s); ratio = row median / reference median, paired per round",
    ]
    head = (f"{'model':<14} {'target':<10} {'quant':<5} {'size':>7} {'median':>8} {'p90':>8} {'min':>8} {'spread':>7} "
            f"{'MB':>6} {'GFLOPs':>6} {'GFLOP/s':>7} {'%peak':>6} {'ratio':>7} {'vs ORT':>7} {'vs eager':>8}  check")
    lines += [head, "-" * len(head)]
    for r in doc["rows"]:
        size = "x".join(str(s) for s in r.get("input_size", []))
        if r.get("status") != "ok":
            lines.append(f"{r['model']:<14} {r['target']:<10} {r['quant']:<5} {size:>7}  "
                         f"{r['status'].upper()}: {r['reason']}")
            continue
        c = r.get("check") or {}
        chk = (f"top1 {'ok' if c.get('top1_agree') else 'DIFF'}, "
               + ("identical" if c.get("identical") else f"sqnr {_f(c.get('sqnr_db'), '.0f')} dB")
               if "sqnr_db" in c else c.get("error", "-"))
        lines.append(
            f"{r['model']:<14} {r['target']:<10} {r['quant']:<5} {size:>7} {_f(r['median_ms']):>8} "
            f"{_f(r['p90_ms']):>8} "
            f"{_f(r['min_ms']):>8} {_f(r['spread_pct'], '.0f') + '%':>7} {_f(_mb(r['artifact_bytes'])):>6} "
            f"{_f(r['gflops']):>6} {_f(r['gflops_per_s'], '.1f'):>7} {_f(100 * r['peak_share'], '.1f'):>6} "
            f"{_f(r['ratio'], '.3f'):>7} {_f(r.get('vs_onnx_fp32')):>7} {_f(r.get('vs_eager_fp32')):>8}  {chk}")
    lines.append("times in ms; spread = (p90 - p10) / median; MB = artifact size; GFLOPs = 2 x MACs, counted")
    ts = target_status(doc["rows"])
    if ts:
        lines.append("performance targets (.pte vs ONNX Runtime fp32, same run):")
        for t in ts:
            verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
            lines.append(f"  {t['model']} {t['quant']} .pte: {_f(t['vs_onnx_fp32'], '.3f')}x ORT fp32 "
                         f"(target <= {t['limit']:.1f}x) {verdict} {t['note']}")
    return "\n".join(lines)


def device_rows(reports) -> list[dict]:
    """Device reports beside the paper's figure for the same model and device."""
    from .paper import compare_device_report

    out = []
    for rep in reports:
        cmp_ = compare_device_report(rep)
        out.append({"device": rep.device_name, "identifier": rep.device_identifier, "os": rep.os,
                    "compute_units": rep.compute_units, "model": rep.model, "precision": rep.precision,
                    "input_size": list(rep.input_size), "median_ms": rep.median_ms, "p90_ms": rep.stats_ms["p90"],
                    "min_ms": rep.stats_ms["min"], "rounds": len(rep.rounds_ms), "method": rep.method.get("name"),
                    "paper_ms": cmp_["paper_ms"], "ratio_to_paper": cmp_["ratio"], "paper_source": cmp_["source"],
                    "note": cmp_["note"], "file": rep.path})
    return out


def format_device_rows(drows: list[dict]) -> str:
    lines = ["device reports (ModelBench method) vs the MobileViT paper (iPhone 12, Core ML fp32):"]
    for d in drows:
        lines.append(f"  {d['device']} ({d['identifier']}, {d['os']}, {d['compute_units']}) {d['model']} "
                     f"{d['precision']}: "
                     f"median {d['median_ms']:.2f} ms; paper {_f(d['paper_ms'])} ms; ratio {_f(d['ratio_to_paper'])}"
                     + (f" -- {d['note']}" if d["note"] else ""))
    return "\n".join(lines)


def _finite(x):
    """JSON has no inf/nan: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(doc: dict, path: str | os.PathLike) -> Path:
    from ..checkpoint import atomic_write

    text = json.dumps(_finite(doc), indent=1, default=str, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _label(r):
    return f"{r['model']} {r['target']} {r['quant']}"


def write_plots(doc: dict, out_dir: Path, stem: str, drows: list[dict] | None = None) -> dict[str, str]:
    """PNG plots next to the report; returns {title: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import atomic_write

    ok = [r for r in doc["rows"] if r.get("status") == "ok"]
    plots = {}

    def save(fig, name, title):
        atomic_write(out_dir / name, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
        plt.close(fig)
        plots[title] = name

    if ok:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(ok) + 1.2))
        ys = range(len(ok))
        med = [r["median_ms"] for r in ok]
        lo = [r["median_ms"] - r["p10_ms"] for r in ok]
        hi = [r["p90_ms"] - r["median_ms"] for r in ok]
        colors = {"eager": "tab:gray", "executorch": "tab:blue", "onnx": "tab:orange", "coreml": "tab:green"}
        ax.barh(list(ys), med, xerr=[lo, hi], color=[colors.get(r["target"], "tab:purple") for r in ok],
                alpha=0.85, capsize=3)
        ax.set_yticks(list(ys), [_label(r) for r in ok])
        ax.invert_yaxis()
        ax.set_xlabel(f"latency, ms (median, p10-p90), batch 1, {doc['settings']['threads']} threads")
        ax.set_title("Latency per model / target")
        save(fig, f"{stem}_latency.png", "Latency per model and target")

        sized = [r for r in ok if r.get("artifact_bytes")]
        if sized:
            fig, ax = plt.subplots(figsize=(6, 4))
            for r in sized:
                ax.scatter(r["artifact_bytes"] / 1e6, r["median_ms"], color=colors.get(r["target"], "tab:purple"))
                ax.annotate(_label(r), (r["artifact_bytes"] / 1e6, r["median_ms"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("artifact size, MB")
            ax.set_ylabel("latency, ms (median)")
            ax.set_title("Latency vs artifact size")
            save(fig, f"{stem}_latency_vs_size.png", "Latency vs artifact size")

        acc = [r for r in ok if r.get("accuracy")]
        if acc:
            fig, ax = plt.subplots(figsize=(6, 4))
            for r in acc:
                top1 = float(r["accuracy"]["top1"])
                top1 = 100 * top1 if top1 <= 1 else top1  # a fraction or a percentage
                ax.scatter(r["median_ms"], top1, color=colors.get(r["target"], "tab:purple"))
                ax.annotate(_label(r), (r["median_ms"], top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("latency, ms (median)")
            ax.set_ylabel("top-1, % (shipped weights, their val split)")
            ax.set_title("Latency vs accuracy")
            save(fig, f"{stem}_latency_vs_accuracy.png", "Latency vs accuracy")

    if drows:
        cmp_rows = [d for d in drows if d["paper_ms"] is not None]
        if cmp_rows:
            fig, ax = plt.subplots(figsize=(6, 0.5 * len(cmp_rows) + 1.5))
            ys = list(range(len(cmp_rows)))
            ax.barh([y - 0.2 for y in ys], [d["median_ms"] for d in cmp_rows], height=0.4, label="device report")
            ax.barh([y + 0.2 for y in ys], [d["paper_ms"] for d in cmp_rows], height=0.4, label="paper (iPhone 12)")
            ax.set_yticks(ys, [f"{d['model']} {d['precision']}\n{d['device']}" for d in cmp_rows])
            ax.invert_yaxis()
            ax.set_xlabel("latency, ms")
            ax.legend()
            ax.set_title("Devices vs the MobileViT paper")
            save(fig, f"{stem}_devices.png", "Devices vs the paper")
    return plots


def markdown_devices(drows: list[dict]) -> list[str]:
    out = ["## Devices vs the MobileViT paper", "",
           "Device reports use the ModelBench method (warm-up, rounds of inferences, each round trimmed of its "
           "lowest and highest times); the paper's figures are iPhone 12, Core ML, fp32, mean of 100 runs.", "",
           "| device | OS | compute units | model | precision | input | median ms | p90 ms | paper ms "
           "| measured / paper | source | note |",
           "|---|---|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for d in drows:
        out.append(f"| {d['device']} ({d['identifier']}) | {d['os']} | {d['compute_units']} | {d['model']} | "
                   f"{d['precision']} | {'x'.join(map(str, d['input_size']))} | {_f(d['median_ms'])} | "
                   f"{_f(d['p90_ms'])} | {_f(d['paper_ms'])} | {_f(d['ratio_to_paper'])} | "
                   f"{d['paper_source'] or '-'} | {d['note'] or ''} |")
    out.append("")
    return out


def markdown(doc: dict, plots: dict[str, str], drows: list[dict] | None = None, verdicts: list[dict] | None = None,
             tolerance: float | None = None) -> str:
    m, s, peak, ref = doc["machine"], doc["settings"], doc["peak"], doc["reference"]
    out = ["# Latency benchmark", ""]
    if doc.get("command"):
        out += [f"Command: `{doc['command']}`", ""]
    out += [
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; load average at start "
        f"{m.get('load_avg_1min_at_start')}",
        "- Tools: " + ", ".join(f"{k} {v}" for k, v in doc["tools"].items() if v),
        f"- Threads: {s['threads']} for every runtime; warm-up {s['warmup']}; {s['passes']} pass(es) x {s['rounds']} "
        f"rounds x {s['iters']} timed inferences per row, runners interleaved round-robin",
        f"- fp32 matmul peak: **{peak['gflops_per_s']:.1f} GFLOP/s** ({peak['n']}x{peak['n']}, best of runs)",
        f"- Reference for ratios: {ref['what']}, median {ref['median_ms']:.2f} ms; "
        f"ratio = row median / reference median of the same round, median over rounds",
        "",
        "| model | target | quant | input | median ms | p90 ms | min ms | spread | artifact MB | GFLOPs | GFLOP/s "
        "| % peak | ratio | vs ORT fp32 | vs eager fp32 | check |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    skipped = []
    for r in doc["rows"]:
        size = "x".join(str(v) for v in r.get("input_size", []))
        if r.get("status") != "ok":
            skipped.append(f"- {r['model']} {r['target']} {r['quant']}: **{r['status']}** -- {r['reason']}")
            continue
        c = r.get("check") or {}
        chk = (f"top-1 {'same' if c.get('top1_agree') else 'DIFFERS'}, "
               + ("identical" if c.get("identical") else f"{_f(c.get('sqnr_db'), '.0f')} dB")
               if "sqnr_db" in c else c.get("error", "-"))
        out.append(f"| {r['model']} | {r['target']} | {r['quant']} | {size} | {_f(r['median_ms'])} | "
                   f"{_f(r['p90_ms'])} | {_f(r['min_ms'])} | {_f(r['spread_pct'], '.0f')}% | "
                   f"{_f(_mb(r['artifact_bytes']))} | {_f(r['gflops'])} | "
                   f"{_f(r['gflops_per_s'], '.1f')} | {_f(100 * r['peak_share'], '.1f')} | {_f(r['ratio'], '.3f')} | "
                   f"{_f(r.get('vs_onnx_fp32'))} | {_f(r.get('vs_eager_fp32'))} | {chk} |")
    out += ["", "spread = (p90 - p10) / median. GFLOPs = 2 x MACs counted with FlopCounterMode on the eager model "
            "(the paper's FLOPs are MACs). check = the runner's output on the bench input vs eager fp32.", ""]
    if skipped:
        out += ["## Not measured", ""] + skipped + [""]
    ts = target_status(doc["rows"])
    if ts:
        out += ["## Performance targets", "", "| model | .pte | vs ORT fp32 | target | status |",
                "|---|---|---:|---:|---|"]
        for t in ts:
            st = "n/a " + t["note"] if t["met"] is None else ("met" if t["met"] else "**not met**")
            out.append(f"| {t['model']} | {t['quant']} | {_f(t['vs_onnx_fp32'], '.3f')}x | <= {t['limit']:.1f}x "
                       f"| {st} |")
        out.append("")
    if drows:
        out += markdown_devices(drows)
    if verdicts is not None:
        out += [f"## Regression check (tolerance {tolerance:.0%} on the ratio)", "",
                "| model | target | quant | before ms | after ms | before ratio | after ratio | change | verdict |",
                "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for v in verdicts:
            out.append(f"| {v['model']} | {v['target']} | {v['quant']} | {_f(v['base_ms'])} | {_f(v['cur_ms'])} | "
                       f"{_f(v['base_ratio'], '.3f')} | {_f(v['cur_ratio'], '.3f')} | "
                       f"{_f(v['change'])}{'x' if v['change'] is not None else ''} | {v['verdict']} {v['note']} |")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{t}]({f})" for t, f in plots.items()] + [""]
    return "\n".join(out)


def write_report(doc: dict, path: str | os.PathLike, drows: list[dict] | None = None,
                 verdicts: list[dict] | None = None, tolerance: float | None = None) -> Path:
    """Markdown report at `path` with its PNG plots next to it (`<stem>_*.png`)."""
    from ..checkpoint import atomic_write

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(doc, p.parent, p.stem, drows)
    text = markdown(doc, plots, drows, verdicts, tolerance)
    return atomic_write(p, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
