"""The timing harness and the CLI: round-robin timing, runners, a real --json run, the doctored baseline.

Timing tests assert only what survives a shared machine: the ratio logic on a virtual clock, and real work
that differs 10x; never absolute speed. The full export of every target runs only in the slow test.
"""
import copy
import json
from pathlib import Path

import pytest

from mobilevit_deploy.bench.__main__ import main
from mobilevit_deploy.bench.timing import Timed, time_round_robin

torch = pytest.importorskip("torch")

FAST = ["--rounds", "3", "--iters", "5", "--warmup", "2", "--threads", "1", "--no-progress", "--weights", "random"]


def _work(units):
    """A fixed amount of CPU work (not a wall-clock wait: a descheduled wait would end late for both)."""
    def fn():
        s = 0
        for i in range(units * 50_000):
            s += i
        return s
    return fn


def test_round_robin_ratio_tracks_a_2x_slower_runner(monkeypatch):
    """On a virtual clock (each call advances it by its cost), so the assertion holds on a loaded machine too:
    the slow runner costs 2x, and in two rounds another process "preempts" it 10x; the per-round medians and
    the paired ratio against the reference must still say 2x."""
    import mobilevit_deploy.bench.timing as timing

    now = [0]
    rounds_seen = []

    def cost(ns, spike_rounds=()):
        def fn():
            r = len(rounds_seen)
            now[0] += ns * (10 if r in spike_rounds else 1)
        return fn

    monkeypatch.setattr(timing.time, "perf_counter_ns", lambda: now[0])
    fast = Timed(("m", "a", "fp32"), cost(1_000_000))
    slow = Timed(("m", "b", "fp32"), cost(2_000_000, spike_rounds=(2, 5)))
    ticks = []

    def tick():
        ticks.append(1)
        if len(ticks) > 3:  # after the 3 warm-up ticks, one tick per timed block: 3 blocks per round
            if (len(ticks) - 3) % 3 == 0:
                rounds_seen.append(1)

    ref = time_round_robin([fast, slow], cost(1_000_000), warmup=1, rounds=9, iters=5, tick=tick)
    assert len(ref) == 9 and len(fast.round_medians) == 9 and len(fast.samples) == 45
    assert len(ticks) == 3 * (9 + 1)
    assert max(slow.round_medians) == 20.0  # the preempted rounds were seen ...
    from mobilevit_deploy.bench.stats import paired_ratio

    r_fast, r_slow = paired_ratio(fast.round_medians, ref), paired_ratio(slow.round_medians, ref)
    assert r_fast == pytest.approx(1.0)
    assert r_slow == pytest.approx(2.0)  # ... and the medians over rounds ignore them


def test_round_robin_times_real_work():
    """The real clock: every call timed, a heavier callable measured slower (10x the work, so a shared
    machine cannot reverse it)."""
    light, heavy = Timed("light", _work(1)), Timed("heavy", _work(10))
    time_round_robin([light, heavy], warmup=1, rounds=3, iters=5)
    assert len(light.samples) == len(heavy.samples) == 15 and all(t > 0 for t in light.samples)
    assert sorted(heavy.samples)[7] > sorted(light.samples)[7]


def _onnx_factory(calls):
    """Artifact factory for tests: ONNX through torch.onnx (TorchScript path, < 1 s), no export stage."""
    def factory(model_name, target, quant, out_dir, *, model, deploy_cfg, **kw):
        from mobilevit_deploy.bench.runners import SkipRow

        calls.append((model_name, target, quant))
        if target != "onnx" or quant != "fp32":
            raise SkipRow(f"test factory makes only onnx fp32, not {target} {quant}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{model_name}.onnx"
        x = torch.zeros(1, *deploy_cfg.input_size)
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"])
        return path, {"output": {"kind": "logits"}}
    return factory


def test_session_rows_with_eager_and_onnx(tmp_path):
    from mobilevit_deploy.bench.harness import BenchConfig, run_benchmark

    calls = []
    cfg = BenchConfig(models=["mobilevit_xxs"], targets=["eager", "onnx", "coreml"], quants=["fp32", "int8"], size=64,
                      threads=1, warmup=2, rounds=3, iters=4, weights="random", peak_n=512)
    doc = run_benchmark(cfg, artifact_factory=_onnx_factory(calls), progress=False, log=lambda s: None)
    rows = {(r["target"], r["quant"]): r for r in doc["rows"]}
    assert set(rows) == {(t, q) for t in ("eager", "onnx", "coreml") for q in ("fp32", "int8")}
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert sorted(ok) == [("eager", "fp32"), ("onnx", "fp32")]
    assert "macOS" in rows[("coreml", "fp32")]["reason"] or rows[("coreml", "fp32")]["status"] == "ok"
    assert "not a deployment runtime" in rows[("eager", "int8")]["reason"]
    on = rows[("onnx", "fp32")]
    assert on["check"]["top1_agree"] and on["check"]["sqnr_db"] > 60  # the artifact computes what eager does
    assert on["threads"] == 1 and on["artifact_bytes"] > 1e6 and on["n"] == 12
    assert on["ratio"] > 0 and on["vs_onnx_fp32"] == pytest.approx(1.0)
    assert on["min_ms"] <= on["median_ms"] <= on["p90_ms"]
    assert on["peak_share"] == pytest.approx(on["gflops_per_s"] / doc["peak"]["gflops_per_s"])
    # FLOPs are counted, so they follow the input: convolutions scale with the area (64x64 = 1/16 of
    # 256x256), attention's bmm faster than the area (N^2), so the total more than 16x
    from mobilevit_deploy import create_model
    from mobilevit_deploy.bench.flops import count_flops

    f256 = count_flops(create_model("mobilevit_xxs"), (256, 256))
    f64 = count_flops(create_model("mobilevit_xxs"), (64, 64))
    assert f64["gflops"] == pytest.approx(on["gflops"])
    assert f256["by_op"]["aten.convolution"] == 16 * f64["by_op"]["aten.convolution"]
    assert f256["by_op"]["aten.bmm"] > 16 * f64["by_op"]["aten.bmm"]
    assert doc["reference"]["median_ms"] > 0 and len(doc["reference"]["round_medians_ms"]) == 3


def test_cli_json_then_doctored_baseline(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["--models", "mobilevit_xxs", "--targets", "eager", "--size", "64", "--json", str(out), *FAST]) == 0
    def no_constants(c):
        raise AssertionError(f"non-standard JSON constant {c} in --json output")

    doc = json.loads(out.read_text(), parse_constant=no_constants)  # strict JSON (no Infinity/NaN)
    assert doc["rows"][0]["check"]["identical"] is True  # eager vs itself
    assert doc["command"].startswith("python -m mobilevit_deploy.bench") and doc["settings"]["threads"] == 1
    row = doc["rows"][0]
    assert row["status"] == "ok" and row["ratio"] > 0

    # unchanged baseline: passes. The margin (0.5) is for a test machine shared with other jobs; the
    # CI check's 0.25 is measured in benchmarks/README.md.
    base = tmp_path / "base.json"
    base.write_text(out.read_text())
    capsys.readouterr()
    assert main(["--models", "mobilevit_xxs", "--targets", "eager", "--size", "64", "--baseline", str(base),
                 "--tolerance", "0.5", *FAST]) == 0
    assert "PASS" in capsys.readouterr().out

    # doctored: the baseline's ratio halved = this run is 2x slower than the baseline -> exit 1
    bad = copy.deepcopy(doc)
    bad["rows"][0]["ratio"] /= 2
    base.write_text(json.dumps(bad))
    rep = tmp_path / "rep" / "report.md"
    assert main(["--models", "mobilevit_xxs", "--targets", "eager", "--size", "64", "--baseline", str(base),
                 "--tolerance", "0.5", "--report", str(rep), *FAST]) == 1
    text = capsys.readouterr().out
    assert "REGRESSION" in text and "FAIL" in text
    assert "REGRESSION" in rep.read_text() and (rep.parent / "report_latency.png").is_file()


def test_cli_settings_come_from_the_baseline(tmp_path, capsys):
    base = {"settings": {"threads": 1, "rounds": 2, "iters": 3, "warmup": 1},
            "rows": [{"model": "mobilevit_xxs", "target": "eager", "quant": "fp32", "input_size": [64, 64],
                      "median_ms": 1.0, "ratio": 1e6, "status": "ok"}]}
    p = tmp_path / "b.json"
    p.write_text(json.dumps(base))
    out = tmp_path / "o.json"
    assert main(["--targets", "eager", "--size", "64", "--baseline", str(p), "--json", str(out), "--no-progress",
                 "--weights", "random"]) == 0
    s = json.loads(out.read_text())["settings"]
    assert (s["threads"], s["rounds"], s["iters"], s["warmup"]) == (1, 2, 3, 1)
    assert "settings from the baseline" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["--models", "resnet50"], "unknown model 'resnet50'"),
    (["--targets", "tflite"], "unknown target 'tflite'"),
    (["--quant", "int4"], "unknown quant 'int4'"),
    (["--tolerance", "0"], "--tolerance must be > 0"),
    (["--baseline", "/nonexistent/b.json"], "baseline not found"),
    (["--device-report", "/nonexistent/r.json"], "device report not found"),
    (["--device-only"], "--device-only needs"),
    (["--reuse-artifacts"], "--reuse-artifacts needs --artifacts"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_cli_bad_input_is_one_error_line_exit_2(argv, msg, capsys):
    from mobilevit_deploy.cli import run_cli

    assert run_cli(main, argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("error: ")


def test_cli_device_only(tmp_path, capsys):
    from test_bench_data import _report

    p = tmp_path / "iphone12.json"
    p.write_text(json.dumps(_report()))
    rep = tmp_path / "dev.md"
    assert main(["--device-only", "--device-report", str(p), "--report", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "7.28" in out and "iPhone 12" in out
    assert "measured / paper" in rep.read_text() and (tmp_path / "dev_devices.png").is_file()


def test_executorch_runner_on_a_tiny_pte(tmp_path):
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from mobilevit_deploy.bench.runners import executorch_runner

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 32, 32)
    ep = torch.export.export(m, (x,))
    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = tmp_path / "tiny.pte"
    path.write_bytes(prog.buffer)
    r = executorch_runner(path, x, num_threads=1)
    assert r.threads == 1 and r.artifact_bytes == path.stat().st_size
    torch.testing.assert_close(r.output(), m(x), rtol=1e-4, atol=1e-5)
    r()  # the timed call runs


@pytest.mark.slow
def test_full_host_run_all_targets(tmp_path):
    """mobilevit_xxs through the real export stage: eager, .pte and .onnx agree with eager and are timed."""
    out = tmp_path / "full.json"
    assert main(["--models", "mobilevit_xxs", "--targets", "eager,executorch,onnx", "--quant", "fp32,int8",
                 "--json", str(out), *FAST]) == 0
    rows = {(r["target"], r["quant"]): r for r in json.loads(out.read_text())["rows"]}
    for t in ("eager", "executorch", "onnx"):
        r = rows[(t, "fp32")]
        assert r["status"] == "ok", r.get("reason")
        assert r["check"]["top1_agree"] and (r["check"]["identical"] or r["check"]["sqnr_db"] > 60)  # eager: None
    assert rows[("executorch", "fp32")]["vs_onnx_fp32"] > 0
    assert rows[("executorch", "int8")]["status"] in ("ok", "skipped")
