"""Benchmark data paths without timing: stats, ModelBench trimming, device reports, paper data, baseline
comparison, reports. Fast; no runtimes."""
import copy
import json
import math
import random
from pathlib import Path

import pytest

from mobilevit_deploy.bench import baseline as bl
from mobilevit_deploy.bench import report as rp
from mobilevit_deploy.bench import stats
from mobilevit_deploy.bench.device_report import (
    build_device_report,
    load_device_report,
    modelbench_stats,
    parse_device_report,
    write_device_report,
)
from mobilevit_deploy.bench.paper import compare_device_report, paper_figure, paper_figures
from mobilevit_deploy.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- stats

def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 5, 50, 101):
        xs = [rng.uniform(1, 20) for _ in range(n)]
        for q in (0, 10, 50, 90, 100):
            assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_summarize_and_errors():
    s = stats.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 5.0, 5)
    assert s["p90"] == pytest.approx(4.6) and s["p10"] == pytest.approx(1.4)
    assert s["spread_pct"] == pytest.approx(100 * 3.2 / 3.0)
    assert s["std"] == pytest.approx(math.sqrt(2.0))
    with pytest.raises(ValueError):
        stats.summarize([])
    with pytest.raises(ValueError):
        stats.summarize([1.0, float("nan")])


def test_paired_ratio_cancels_common_drift():
    ref = [10.0, 20.0, 40.0]  # the machine slows down 4x over the run
    row = [5.0, 10.0, 20.0]  # the row slows down with it
    assert stats.paired_ratio(row, ref) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        stats.paired_ratio([1.0], [1.0, 2.0])


# ---------------------------------------------------------------- ModelBench + device reports

def test_modelbench_stats_trims_each_round():
    # round of 30: 10 lowest (1 ms), 10 middle (5 ms), 10 highest (100 ms) -> kept mean 5
    r1 = [1.0] * 10 + [5.0] * 10 + [100.0] * 10
    r2 = [7.0] * 10 + [100.0] * 10 + [0.5] * 10  # unsorted: trimming must sort first -> kept 7
    out = modelbench_stats([r1, r2], trim_low=10, trim_high=10)
    assert out["rounds_ms"] == [5.0, 7.0]
    assert out["stats_ms"]["median"] == 6.0 and out["stats_ms"]["min"] == 5.0 and out["stats_ms"]["max"] == 7.0
    assert out["stats_ms"]["p90"] == pytest.approx(6.8)
    with pytest.raises(UserError, match="leaves none"):
        modelbench_stats([[1.0] * 20], 10, 10)


def _report(**over):
    rng = random.Random(1)
    rounds = [[7.0 + rng.random() for _ in range(50)] for _ in range(20)]
    meas = modelbench_stats(rounds, 10, 10)
    meas["method"] = {"name": "modelbench", "warmup": 10, "rounds": 20, "inferences_per_round": 50,
                      "trim_low": 10, "trim_high": 10}
    d = build_device_report(device_name="iPhone 12", device_identifier="iPhone13,2", os_name="iOS 18.1",
                            compute_units="all", model="mobilevit_xs", precision="fp32", input_size=[256, 256],
                            artifact_sha256="ab" * 32, measurement=meas)
    d.update(over)
    return d


def test_device_report_roundtrip(tmp_path):
    d = _report()
    p = write_device_report(tmp_path / "r.json", d)
    rep = load_device_report(p)
    assert rep.is_iphone12 and rep.model == "mobilevit_xs" and rep.input_size == (256, 256)
    assert rep.median_ms == pytest.approx(d["stats_ms"]["median"])
    assert rep.to_dict()["rounds_ms"] == d["rounds_ms"]
    d2 = dict(d, future_field={"x": 1})  # unknown keys are ignored
    parse_device_report(d2)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("device"), "device"),
    (lambda d: d["device"].pop("os"), "device.os"),
    (lambda d: d.__setitem__("compute_units", "gpu"), "compute_units"),
    (lambda d: d.__setitem__("schema_version", 2), "schema_version"),
    (lambda d: d.__setitem__("input_size", [256]), "input_size"),
    (lambda d: d["method"].__setitem__("rounds", 0), "method.rounds"),
    (lambda d: d["method"].__setitem__("trim_low", 40), "method.trim_low"),
    (lambda d: d.__setitem__("rounds_ms", d["rounds_ms"][:5]), "rounds_ms"),
    (lambda d: d["rounds_ms"].__setitem__(0, -1.0), "rounds_ms[0]"),
    (lambda d: d["stats_ms"].__setitem__("median", d["stats_ms"]["median"] * 1.1), "stats_ms.median"),
    (lambda d: d["stats_ms"].pop("p90"), "stats_ms.p90"),
    (lambda d: d.__setitem__("model", ""), "model"),
])
def test_device_report_errors_name_the_field(tmp_path, mutate, field):
    d = copy.deepcopy(_report())
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(UserError) as e:
        load_device_report(p)
    assert f"'{field}'" in str(e.value) and str(p) in str(e.value)


def test_device_report_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_device_report(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        load_device_report(tmp_path / "x.json")


# ---------------------------------------------------------------- paper data

def test_paper_figures_come_from_the_data_file():
    data = json.loads((REPO / "benchmarks" / "paper_mobilevit.json").read_text())
    figs = paper_figures()
    assert len(figs) == len(data["latency_ms"])
    by_table = {}
    for f in figs:
        by_table.setdefault(f.table, []).append(f.ms)
        assert f.device == "iPhone 12" and f.precision == "fp32"
    # the figures: Table 11 and Table 6 (by patch size)
    assert sorted(by_table["Table 11"]) == sorted([0.92, 10.99, 10.56, 7.28])
    assert by_table["Table 6"] == [9.85, 14.69, 8.23, 8.20]
    assert paper_figure("mobilevit_xs").ms == 7.28 and paper_figure("mobilevit_xs").table == "Table 11"
    assert paper_figure("mobilevit_s").table == "Table 6"
    assert paper_figure("mobilevit_xxs") is None


def test_device_report_vs_paper():
    from mobilevit_deploy.bench.device_report import parse_device_report as parse

    rep = parse(_report())
    c = compare_device_report(rep)
    assert c["paper_ms"] == 7.28 and c["ratio"] == pytest.approx(rep.median_ms / 7.28)
    other = parse(_report(device={"name": "iPhone 15", "identifier": "iPhone15,4", "os": "iOS 18"}))
    c = compare_device_report(other)
    assert c["ratio"] is None and "iPhone 15" in c["note"]
    xxs = parse(_report(model="mobilevit_xxs"))
    c = compare_device_report(xxs)
    assert c["paper_ms"] is None and "XXS" in c["note"]


# ---------------------------------------------------------------- baseline comparison

def _rows():
    return [
        {"model": "mobilevit_xxs", "target": "eager", "quant": "fp32", "input_size": [256, 256], "status": "ok",
         "median_ms": 20.0, "ratio": 2.0},
        {"model": "mobilevit_xxs", "target": "executorch", "quant": "fp32", "input_size": [256, 256], "status": "ok",
         "median_ms": 8.0, "ratio": 0.8},
        {"model": "mobilevit_xxs", "target": "onnx", "quant": "fp32", "input_size": [256, 256], "status": "ok",
         "median_ms": 5.0, "ratio": 0.5},
    ]


def test_compare_unchanged_passes_and_halved_baseline_fails():
    base = {"rows": _rows()}
    v = bl.compare(_rows(), base, 0.25)
    assert not bl.has_regression(v) and {x["verdict"] for x in v} == {"ok"}
    doctored = copy.deepcopy(base)
    doctored["rows"][1]["ratio"] /= 2  # = the executorch row became 2x slower
    v = bl.compare(_rows(), doctored, 0.25)
    assert bl.has_regression(v)
    assert [x["verdict"] for x in v] == ["ok", "REGRESSION", "ok"]
    assert v[1]["change"] == pytest.approx(2.0)
    text = bl.format_verdicts(v, 0.25)
    assert "REGRESSION" in text and "FAIL" in text


def test_compare_noise_inside_tolerance_and_faster_rows():
    cur = _rows()
    cur[0]["ratio"] *= 1.2  # +20 %: inside 25 %
    cur[2]["ratio"] *= 0.5
    v = bl.compare(cur, {"rows": _rows()}, 0.25)
    assert [x["verdict"] for x in v] == ["ok", "ok", "faster"]


def test_compare_missing_and_new_rows():
    cur = _rows()
    cur[1] = dict(cur[1], status="failed", reason="export broke")
    cur.append({"model": "mobilevit_xs", "target": "onnx", "quant": "fp32", "status": "ok", "median_ms": 9.0,
                "ratio": 1.0})
    v = bl.compare(cur, {"rows": _rows()}, 0.25)
    verdicts = {(x["target"], x["model"]): x for x in v}
    assert verdicts[("executorch", "mobilevit_xxs")]["verdict"] == "MISSING"
    assert "export broke" in verdicts[("executorch", "mobilevit_xxs")]["note"]
    assert verdicts[("onnx", "mobilevit_xs")]["verdict"] == "new"
    assert bl.has_regression(v)
    size = _rows()
    size[0]["input_size"] = [128, 128]
    assert bl.compare(size, {"rows": _rows()}, 0.25)[0]["verdict"] == "MISSING"


def test_load_baseline_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        bl.load_baseline(tmp_path / "none.json")
    p = tmp_path / "b.json"
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(UserError, match="rows"):
        bl.load_baseline(p)
    p.write_text(json.dumps({"rows": [{"model": "m", "target": "eager", "quant": "fp32", "median_ms": 1}]}))
    with pytest.raises(UserError, match="ratio"):
        bl.load_baseline(p)
    with pytest.raises(UserError, match="tolerance"):
        bl.compare([], {"rows": []}, 0)


def test_committed_baseline_is_valid_and_covers_the_ci_rows():
    base = bl.load_baseline(REPO / "benchmarks" / "baseline.json")
    keys = {(r["model"], r["target"], r["quant"]) for r in base["rows"] if r.get("status") == "ok"}
    for t in ("eager", "executorch", "onnx"):
        assert ("mobilevit_xxs", t, "fp32") in keys
    assert base["settings"]["threads"] >= 1


# ---------------------------------------------------------------- report

def _doc():
    rows = _rows()
    for r in rows:
        r.update(p10_ms=r["median_ms"] * 0.9, p90_ms=r["median_ms"] * 1.2, min_ms=r["median_ms"] * 0.8,
                 spread_pct=30.0, artifact_bytes=None if r["target"] == "eager" else 5_100_000, gflops=0.81,
                 gflops_per_s=0.81 / r["median_ms"] * 1e3, peak_share=0.2, threads=1, vs_onnx_fp32=r["ratio"] / 0.5,
                 check={"max_abs_diff": 1e-5, "sqnr_db": 120.0, "top1_agree": True},
                 accuracy={"top1": 61.5, "data": "cifar10"} if r["target"] == "onnx" else None)
    rows.append({"model": "mobilevit_xxs", "target": "executorch", "quant": "int8", "input_size": [256, 256],
                 "status": "skipped", "reason": "quantization is not available yet"})
    return {"machine": {"cpu": "test cpu", "cores": 2, "platform": "linux", "load_avg_1min_at_start": 0.1},
            "tools": {"torch": "x"}, "settings": {"threads": 1, "warmup": 1, "rounds": 2, "iters": 3, "passes": 1},
            "peak": {"gflops_per_s": 100.0, "n": 2048},
            "reference": {"what": "mm", "median_ms": 10.0, "gflops_per_s": 200.0},
            "rows": rows, "command": "python -m mobilevit_deploy.bench"}


def test_report_markdown_plots_and_targets(tmp_path):
    doc = _doc()
    ts = rp.target_status(doc["rows"])
    assert [(t["quant"], t["met"]) for t in ts] == [("fp32", False), ("int8", None)]  # 1.6x ORT: not met
    drows = rp.device_rows([parse_device_report(_report())])
    verdicts = bl.compare(doc["rows"], {"rows": _rows()}, 0.25)
    p = rp.write_report(doc, tmp_path / "out" / "report.md", drows, verdicts, 0.25)
    text = p.read_text()
    for png in ("report_latency.png", "report_latency_vs_size.png", "report_latency_vs_accuracy.png",
                "report_devices.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
        assert f"]({png})" in text
    assert "quantization is not available yet" in text and "**not met**" in text and "7.28" in text
    table = rp.format_table(doc)
    assert "SKIPPED" in table and "NOT MET" in table
    j = rp.write_json(doc, tmp_path / "r.json")
    assert json.loads(j.read_text())["rows"][0]["ratio"] == 2.0
