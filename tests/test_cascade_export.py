"""Cascade artifacts (issue 14): export -> one .pte with one delegated method per stage -> the runtime's
cascade -> every method against eager at its size; the Core ML multi-function package; evaluate --json;
every bad input one error line, exit 2, nothing written.

Fast: a small random-weight model (conftest.make_tiny_model) at 32 and 48 px, exported once per module.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilevit_deploy.cli import run_cli
from mobilevit_deploy.errors import UserError
from mobilevit_deploy.export import ExportConfig, export_model
from mobilevit_deploy.export.cascade import CascadeSpec, cascade_section, stage_cfgs

from conftest import assert_one_error_line, make_tiny_model

SIZES = (32, 48)
NAMES = ["forward_32", "forward_48"]


def _check_contract(section, input_hw):
    """The Swift decoder's rules (tests/test_ios_cascade_contract.py) on a manifest cascade section."""
    contract = pytest.importorskip("test_ios_cascade_contract")
    contract.check_cascade(json.loads(json.dumps(section)), input_hw=list(input_hw))


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model(size=48)


@pytest.fixture(scope="module")
def pte(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade_pte")
    res = export_model(tiny, ExportConfig("executorch", cascade=CascadeSpec(SIZES)), out_dir=out, log=None)
    return res


# ------------------------------------------------------------------------------------------ export chain


def test_pte_has_one_delegated_method_per_stage(pte):
    from mobilevit_deploy.export.executorch import inspect_pte

    assert pte.artifact.name == "mobilevit_cascade_32_48.pte" or pte.artifact.name.endswith("_cascade_32_48.pte")
    info = inspect_pte(pte.artifact)
    assert sorted(info["methods"]) == NAMES
    assert info["delegates"] and set(info["delegates"]) == {"XnnpackBackend"}
    m = pte.manifest  # the tiny model leaves its qkv select/expand outside XNNPACK (MobileViT: none, slow test)
    assert len(m["ops_not_delegated"]) == len(info["operators"]) and set(m["ops_not_delegated_by_method"]) == set(NAMES)
    assert sorted(p.name for p in pte.artifact.parent.iterdir()) == sorted([pte.artifact.name,
                                                                         pte.artifact.name + ".json"])


def test_manifest_cascade_section_is_the_contract(pte):
    m = pte.manifest
    assert m["input"]["shape"] == [1, 3, 48, 48], "input.shape is the last stage's"
    c = m["cascade"]
    _check_contract(c, m["input"]["shape"][2:])
    assert [s["name"] for s in c["stages"]] == NAMES and [s["input_size"] for s in c["stages"]] == [[32, 32], [48, 48]]
    assert c["exit_rule"]["kind"] == "max_probability" and 0 <= c["exit_rule"]["threshold"] <= 1
    sel = c["threshold_selection"]
    assert sel["images"] == 40 and "shipped samples" in sel["data"] and sel["max_drop_points"] == 0.5
    assert sel["measured_with"].startswith("the artifact")
    assert sel["cascade_top1"] >= sel["last_stage_top1"] - 0.5 - 1e-9
    v = m["verification"]
    assert v["passed"] and [s["name"] for s in v["stages"]] == NAMES and all(s["sqnr_db"] > 60 for s in v["stages"])
    assert json.loads(Path(pte.manifest_path).read_text())["cascade"] == json.loads(json.dumps(c))


def test_runtime_cascade_runs_stage2_only_when_needed_and_matches_eager(pte, tiny):
    from mobilevit_deploy.data import load_rgb, sample_images
    from mobilevit_deploy.runtime import load_artifact, load_cascade

    runner = load_cascade(pte.artifact)
    assert runner.stage_names == NAMES and runner.stage_sizes == [(32, 32), (48, 48)]
    paths = [p for p, _ in sample_images()[::5]]
    # every method against eager at its own size, on inputs the runner prepared from the same image
    for p in paths:
        xs = runner.prepare_all(p)
        for i, (x, size) in enumerate(zip(xs, SIZES)):
            assert tuple(x.shape) == (1, 3, size, size)
            with torch.no_grad():
                ref = tiny(x)
            torch.testing.assert_close(runner.run_stage(i, x), ref, rtol=1e-4, atol=1e-4)
    # the decision: threshold 0 -> stage 1 always answers; above every stage-1 probability -> stage 2
    runner.threshold = 0.0
    ans = runner(load_rgb(paths[0]))
    assert ans.stage == 0 and ans.name == "forward_32" and len(ans.max_probabilities) == 1
    p1 = max(runner(p).max_probabilities[0] for p in paths)
    runner.threshold = min(1.0, p1 + 1e-6)
    answers = [runner(p) for p in paths]
    assert all(a.stage == 1 and len(a.max_probabilities) == 2 for a in answers)
    with torch.no_grad():
        for p, a in zip(paths, answers):  # stage 2 answers with the 48 px logits of the same image
            torch.testing.assert_close(a.logits, tiny(runner.prepare(p, 1)), rtol=1e-4, atol=1e-4)
    # the plain loader points to load_cascade
    with pytest.raises(UserError, match="load_cascade"):
        load_artifact(pte.artifact)


def test_evaluate_json_has_top1_and_cascade_latencies(pte, sample_folder, tmp_path, capsys):
    from mobilevit_deploy.evaluate import main

    out = tmp_path / "eval.json"
    rc = run_cli(main, ["--data", str(sample_folder), "--artifact", str(pte.artifact), "--json", str(out),
                        "--no-progress", "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "exit rate" in text and "mean latency per image" in text and "last stage alone" in text
    d = json.loads(out.read_text())
    assert 0 <= d["top1"] <= 100 and d["total"] == 40
    c = d["cascade"]
    assert {"exit_rates", "mean_latency_ms", "last_stage_latency_ms"} <= set(c)
    assert len(c["exit_rates"]) == 2 and abs(sum(c["exit_rates"]) - 1) < 1e-9
    assert c["mean_latency_ms"] > 0 and c["last_stage_latency_ms"] > 0
    # the exit rates measured through the runtime are those the export chose on the same 40 images
    assert c["exit_rates"] == pytest.approx(pte.manifest["cascade"]["threshold_selection"]["exit_rates"], abs=1e-3)


# ------------------------------------------------------------------------------------------ Core ML


def test_coreml_cascade_is_one_multifunction_package(tiny, tmp_path):
    ct = pytest.importorskip("coremltools")
    if not hasattr(ct.utils, "save_multifunction"):
        pytest.skip(f"coremltools {ct.__version__} has no multi-function API")
    res = export_model(tiny, ExportConfig("coreml", cascade=CascadeSpec(SIZES)), out_dir=tmp_path, log=None)
    assert res.artifact.suffix == ".mlpackage" and res.artifact.is_dir()
    spec = ct.models.MLModel(str(res.artifact), skip_model_load=True).get_spec()
    assert [f.name for f in spec.description.functions] == NAMES
    assert set(spec.mlProgram.functions) == set(NAMES)
    assert spec.description.defaultFunctionName == "forward_48"
    assert spec.specificationVersion == ct.target.iOS18.value
    for f, s in zip(spec.description.functions, SIZES):
        img = f.input[0].type.imageType
        assert (img.height, img.width) == (s, s)
    m = res.manifest
    assert m["minimum_deployment_target"] == "iOS18" and m["verification"]["passed"]
    mf = m["coreml_multifunction"]
    assert mf["size_bytes"] == m["artifact"]["size_bytes"] and set(mf["separate_packages_bytes"]) == set(NAMES)
    assert mf["size_bytes"] < mf["separate_packages_total_bytes"], "shared weights are stored once"
    assert m["cascade"]["threshold_selection"]["measured_with"].startswith("torch-side")
    _check_contract(m["cascade"], m["input"]["shape"][2:])


# ------------------------------------------------------------------------------------------ threshold


def test_threshold_that_nobody_passes_is_capped_within_the_contract():
    from mobilevit_deploy.cascade import choose_threshold

    s1 = np.array([[0.9, 0.1], [0.8, 0.2]])  # confident and wrong on both
    s2 = np.array([[0.1, 0.9], [0.2, 0.8]])
    y = [1, 1]
    choice = choose_threshold([s1, s2], y, 0.5)
    assert choice.threshold > 1
    spec = CascadeSpec((32, 64))
    sec = cascade_section(spec, choice, [s1, s2], y, "fixture", "fixture")
    assert sec["exit_rule"]["threshold"] == 1.0 and sec["threshold_selection"]["no_exit"] is True
    assert sec["threshold_selection"]["exit_rates"] == [0.0, 1.0]
    _check_contract(sec, [64, 64])


def test_config_round_trip_and_stage_cfgs():
    cfg = ExportConfig.from_dict({"target": "executorch", "cascade": "32,64", "max_drop": 1.0})
    assert cfg.cascade.sizes == (32, 64) and cfg.cascade.max_drop == 1.0
    assert ExportConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.artifact_path("out", "m").name == "m_cascade_32_64.pte"
    assert ExportConfig("coreml", cascade=CascadeSpec((32, 64))).deployment_target == "iOS18"
    from mobilevit_deploy.models import DeployCfg

    assert [c.image_size for c in stage_cfgs(DeployCfg(input_size=(3, 64, 64)), (32, 64))] == [(32, 32), (64, 64)]


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def empty_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--cascade", "64,32"], "strictly increasing"),
    (["--cascade", "32,32"], "strictly increasing"),
    (["--cascade", "64"], "at least two"),
    (["--cascade", "16,64"], "cannot be taken by the model"),
    (["--cascade", "32,a"], "--cascade takes input sizes"),
    (["--cascade", "32,64", "--target", "onnx"], "not available for --target onnx"),
    (["--cascade", "32,64", "--exit-data", "{tmp}/missing"], "directory not found"),
    (["--cascade", "32,64", "--exit-data", "{tmp}/empty"], "no class folders"),
    (["--cascade", "32,64", "--exit-data", "{tmp}/noimg"], "no images"),
    (["--cascade", "32,64", "--max-drop", "-1"], "--max-drop"),
    (["--exit-data", "{tmp}/empty"], "need --cascade"),
    (["--cascade", "32,64", "--quant", "int8"], "--quant is not offered"),
    (["--cascade", "32,64", "--backend", "coreml"], "--backend coreml is not offered"),
])
def test_bad_cascade_input_is_one_error_line_exit_2_nothing_written(args, message, empty_dirs, capsys):
    from mobilevit_deploy.export.__main__ import main

    out = empty_dirs / "out"
    argv = ["--target", "executorch", "--out", str(out)] + [a.format(tmp=empty_dirs) for a in args]
    if "--target" in args:
        argv = argv[2:]
    assert_one_error_line(main, argv, message, capsys, out)


def test_a_size_the_model_cannot_take_fails_before_anything_is_written(tmp_path):
    class OnlySmall(torch.nn.Module):
        """Takes at most 32 px (like a plain ViT with a fixed position table)."""

        def __init__(self):
            super().__init__()
            self.inner = make_tiny_model(size=32)
            self.deploy_cfg = self.inner.deploy_cfg

        def forward(self, x):
            if x.shape[-1] > 32:
                raise ValueError(f"position table built for 32x32, got {x.shape[-1]}")
            return self.inner(x)

    out = tmp_path / "out"
    with pytest.raises(UserError, match="cannot take a 48x48 input"):
        export_model(OnlySmall(), ExportConfig("executorch", cascade=CascadeSpec((32, 48))), out_dir=out, log=None)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_mobilevit_cascade_pte_delegates_every_op(tmp_path):
    """MobileViT-XXS (random weights) at 32 and 64 px: every op of both methods inside XNNPACK."""
    from mobilevit_deploy.export.executorch import inspect_pte
    from mobilevit_deploy.pretrained import ModelSource

    res = export_model(ModelSource("mobilevit_xxs", deploy_cfg=None, module=None), ExportConfig(
        "executorch", cascade=CascadeSpec((32, 64))), out_dir=tmp_path, log=None)
    info = inspect_pte(res.artifact)
    assert sorted(info["methods"]) == ["forward_32", "forward_64"] and info["operators"] == []
    assert res.manifest["ops_not_delegated"] == [] and res.manifest["verification"]["passed"]


# ------------------------------------------------------------------------------------------ bench rows


def test_bench_cascade_rows_are_per_image():
    from mobilevit_deploy.bench.cascade import per_image
    from mobilevit_deploy.bench.runners import BoundCall
    from mobilevit_deploy.bench.timing import Timed, time_round_robin

    calls = []
    bc = BoundCall("pte_cascade", "fp32", lambda: calls.append(1), None, 1, info={"images_per_call": 40})
    plain = BoundCall("eager", "fp32", lambda: None, None, 1)
    slots = [Timed(("m", "pte_cascade", "fp32"), bc.fn, bc), Timed(("m", "eager", "fp32"), plain.fn, plain)]
    before = {s.key: 0 for s in slots}
    time_round_robin(slots, warmup=0, rounds=2, iters=3)
    raw = list(slots[0].samples), list(slots[0].round_medians), list(slots[1].samples)
    per_image(slots, 2 * 3, before)
    assert slots[0].samples == pytest.approx([t / 40 for t in raw[0]])
    assert slots[0].round_medians == pytest.approx([t / 40 for t in raw[1]])
    assert slots[1].samples == raw[2], "ordinary rows are untouched"


@pytest.mark.slow
def test_bench_harness_times_the_cascade_and_its_last_stage():
    from mobilevit_deploy.bench.harness import BenchConfig, run_benchmark

    doc = run_benchmark(BenchConfig(targets=("eager",), cascade=(32, 64), weights="shipped", threads=1, warmup=1,
                                    rounds=2, iters=2), progress=False, log=lambda s: None)
    rows = {r["target"]: r for r in doc["rows"]}
    c, last = rows["pte_cascade"], rows["pte_last_stage"]
    assert c["status"] == last["status"] == "ok" and c["input_size"] == [64, 64]
    assert len(c["cascade"]["exit_rates"]) == 2 and c["cascade"]["images"] == 40
    assert 0 < c["median_ms"] and 0 < last["median_ms"] and c["gflops"] <= sum(c["cascade"]["stage_gflops"])
