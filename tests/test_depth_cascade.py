"""The depth cascade (issue 14, `export --cascade exit3`): the shipped exit head after stage 3 of the shipped
model, exported as one .pte (methods exit_3, rest_3, forward) and one multi-function .mlpackage; the runtime
feeds stage 1's features to stage 2; evaluate measures it against the whole model; bad input is one line.

The .pte is exported once per module from the shipped weights (~25 s).
"""
from __future__ import annotations

import json

import pytest
import torch

from mobilevit_deploy.cli import run_cli
from mobilevit_deploy.errors import UserError
from mobilevit_deploy.export import ExportConfig, ModelSource, export_model
from mobilevit_deploy.export.cascade import CascadeSpec
from mobilevit_deploy.models.exit_head import load_depth_split, shipped_exit_head, split_model

from conftest import assert_one_error_line

NAMES = ["exit_3", "rest_3"]


@pytest.fixture(scope="module")
def shipped():
    from mobilevit_deploy.pretrained import load_model

    lm = load_model("mobilevit_xxs")
    split = load_depth_split(lm.module, "mobilevit_xxs", 3, backbone_sha256=lm.checkpoint["sha256"])
    return lm, split


@pytest.fixture(scope="module")
def pte(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth_pte")
    config = ExportConfig("executorch", cascade=CascadeSpec.from_value("exit3"))
    return export_model(ModelSource("mobilevit_xxs"), config, out_dir=out, log=None)


# ------------------------------------------------------------------------------------------ the split and its head


def test_shipped_head_is_for_the_shipped_weights(shipped):
    lm, split = shipped
    hw = shipped_exit_head("mobilevit_xxs")
    assert hw is not None and hw.after == 3 and hw.head == "mv2s2"
    assert hw.meta["backbone_sha256"] == lm.checkpoint["sha256"]
    from mobilevit_deploy.checkpoint import file_sha256

    assert hw.meta["sha256"] == file_sha256(hw.path), "the JSON names the file it ships with"
    assert sum(p.numel() for p in split.exit_branch.head.parameters()) == hw.meta["params"]


def test_rest_of_the_exit_features_is_the_whole_model(shipped):
    _, split = shipped
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, f = split.exit_branch(x)
        assert logits.shape == (3, 10) and f.shape == (3, 48, 8, 8)
        torch.testing.assert_close(split.rest_branch(f), split.model(x), rtol=0, atol=0)


def test_shipped_head_classifies_the_shipped_samples(shipped):
    """The trained head is not random: on the 40 shipped (training) images it agrees with the labels far
    above chance (10 %)."""
    from mobilevit_deploy.data import load_batch, sample_images

    lm, split = shipped
    samples = sample_images()
    x = load_batch([p for p, _ in samples], lm.deploy_cfg)
    y = torch.tensor([lm.deploy_cfg.class_labels.index(c) for _, c in samples])
    with torch.no_grad():
        acc = float((split.exit_branch(x)[0].argmax(1) == y).float().mean())
    assert acc >= 0.6, acc


def test_no_head_wrong_stage_or_other_weights_is_refused():
    from mobilevit_deploy.models import create_model

    m = create_model("mobilevit_xxs", num_classes=10)
    with pytest.raises(UserError, match="no exit head is shipped for mobilevit_xs"):
        load_depth_split(create_model("mobilevit_xs", num_classes=10), "mobilevit_xs", 3)
    with pytest.raises(UserError, match="sits after stage 3, not 2"):
        load_depth_split(m, "mobilevit_xxs", 2)
    with pytest.raises(UserError, match="trained on other weights"):
        load_depth_split(m, "mobilevit_xxs", 3, backbone_sha256="0" * 64)
    with pytest.raises(UserError, match="after stage 1..4"):
        split_model(m, 5)


def test_trained_head_round_trips_through_its_files(tmp_path):
    """train.exit_head's pieces: features of a folder, a short training, fp16 file + JSON, read back."""
    from mobilevit_deploy.models import create_model
    from mobilevit_deploy.models.exit_head import ExitBranch, read_exit_head
    from mobilevit_deploy.train.exit_head import save_exit_head, train_exit_head

    torch.manual_seed(0)
    m = create_model("mobilevit_xxs", num_classes=10).eval()
    e = ExitBranch(m, 2, "pool_fc")
    f = torch.randn(64, 24, 16, 16)  # stage 2 of mobilevit_xxs: 24 channels
    y = torch.randint(0, 10, (64,))
    before = e.head[-1].weight.clone()
    train_exit_head(e.head, f, torch.randn(64, 10), y, epochs=1, log=lambda s: None, batch=32)
    assert not torch.equal(before, e.head[-1].weight)
    out = save_exit_head(e, tmp_path / "h.safetensors", {"model": "mobilevit_xxs", "after_stage": 2, "head": "pool_fc"})
    hw = read_exit_head(out)
    assert hw.after == 2 and hw.head == "pool_fc" and len(hw.meta["sha256"]) == 64
    e2 = ExitBranch(m, 2, "pool_fc")
    hw.load_into(e2)
    torch.testing.assert_close(e2.head[-1].weight, e.head[-1].weight.half().float())


# ------------------------------------------------------------------------------------------ export -> runtime


def test_pte_has_three_delegated_methods_and_a_depth_manifest(pte):
    from mobilevit_deploy.export.executorch import inspect_pte

    assert pte.artifact.name == "mobilevit_xxs_cascade_exit3.pte"
    info = inspect_pte(pte.artifact)
    assert sorted(info["methods"]) == sorted(NAMES + ["forward"])
    assert set(info["delegates"]) == {"XnnpackBackend"} and pte.manifest["ops_not_delegated"] == []
    c = pte.manifest["cascade"]
    assert c["kind"] == "depth" and [s["name"] for s in c["stages"]] == NAMES
    assert [s["input"] for s in c["stages"]] == ["image", "features"]
    assert c["stages"][1]["features_from"] == "exit_3" and c["stages"][1]["features_shape"] == [1, 48, 8, 8]
    assert c["whole_model"] == {"name": "forward", "input_size": [64, 64]}
    assert c["exit_head"]["sha256"] == shipped_exit_head("mobilevit_xxs").meta["sha256"]
    sel = c["threshold_selection"]
    assert sel["images"] == 40 and sel["cascade_top1"] >= sel["last_stage_top1"] - 0.5 - 1e-9
    v = pte.manifest["verification"]
    assert v["passed"] and [s["name"] for s in v["stages"]] == NAMES + ["forward"]
    assert all(s["sqnr_db"] > 60 for s in v["stages"]) and v["features_max_abs_diff"] < 1e-3
    contract = pytest.importorskip("test_ios_cascade_contract")
    contract.check_cascade(json.loads(json.dumps(c)), input_hw=pte.manifest["input"]["shape"][2:])


def test_runtime_feeds_stage_1_features_to_stage_2(pte, shipped):
    from mobilevit_deploy.data import sample_images
    from mobilevit_deploy.runtime import load_cascade

    _, split = shipped
    runner = load_cascade(pte.artifact)
    assert runner.kind == "depth" and runner.stage_names == NAMES and runner.stage_inputs == ["image", "features"]
    paths = [p for p, _ in sample_images()[::8]]
    runner.threshold = 0.0  # the exit answers, with the exit branch's logits
    for p in paths:
        a = runner(p)
        assert a.stage == 0 and a.name == "exit_3" and len(a.max_probabilities) == 1
        with torch.no_grad():
            torch.testing.assert_close(a.logits, split.exit_branch(runner.prepare(p, 0))[0], rtol=1e-4, atol=1e-4)
    runner.threshold = 1.0 + 1e-9  # nobody exits: rest_3 on the exit's features = the whole model
    for p in paths:
        a = runner(p)
        assert a.stage == 1 and a.name == "rest_3" and len(a.max_probabilities) == 2
        x = runner.prepare(p, 0)
        with torch.no_grad():
            torch.testing.assert_close(a.logits, split.model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.logits, runner.alone.run_one(x), rtol=1e-4, atol=1e-4)
    assert runner.prepare(paths[0], 1) is None, "the feature stage takes no image"


def test_evaluate_measures_the_depth_cascade_against_the_whole_model(pte, sample_folder, tmp_path, capsys):
    from mobilevit_deploy.evaluate import main

    out = tmp_path / "eval.json"
    rc = run_cli(main, ["--data", str(sample_folder), "--artifact", str(pte.artifact), "--json", str(out),
                        "--no-progress", "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and "whole model (forward) alone" in text
    c = json.loads(out.read_text())["cascade"]
    assert c["stages"] == NAMES and c["alone"] == "whole model (forward)"
    assert c["exit_rates"] == pytest.approx(pte.manifest["cascade"]["threshold_selection"]["exit_rates"], abs=1e-3)
    assert c["last_stage_top1"] == pytest.approx(pte.manifest["cascade"]["threshold_selection"]["last_stage_top1"])
    assert c["mean_latency_ms"] > 0 and c["last_stage_latency_ms"] > 0


def test_coreml_depth_cascade_is_one_multifunction_package(tmp_path):
    ct = pytest.importorskip("coremltools")
    res = export_model(ModelSource("mobilevit_xxs"), ExportConfig("coreml", cascade=CascadeSpec(exit_after=3)),
                       out_dir=tmp_path, log=None)
    m = res.manifest
    assert m["verification"]["passed"] and all(m["verification"]["checks"].values())
    spec = ct.models.MLModel(str(res.artifact), skip_model_load=True).get_spec()
    funcs = {f.name: f for f in spec.description.functions}
    assert set(funcs) == {"exit_3", "rest_3", "forward"} and spec.description.defaultFunctionName == "forward"
    assert [o.name for o in funcs["exit_3"].output] == ["probabilities", "features"]
    assert funcs["rest_3"].input[0].type.multiArrayType.shape == [1, 48, 8, 8]
    mf = m["coreml_multifunction"]  # the shared backbone is stored once
    assert mf["size_bytes"] < 0.7 * mf["separate_packages_total_bytes"]
    assert "torch-side" in m["cascade"]["threshold_selection"]["measured_with"]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, message", [
    (["--cascade", "exit0"], "exit must follow a stage >= 1"),
    (["--cascade", "exit5"], "after stage 1..4"),
    (["--cascade", "exit2"], "sits after stage 3, not 2"),
    (["--cascade", "exit3", "--model", "mobilevit_xs", "--num-classes", "10"], "no exit head is shipped"),
    (["--cascade", "exit3", "--target", "onnx"], "not available for --target onnx"),
    (["--cascade", "exit3", "--size", "96"], "--size conflicts with --cascade exit3"),
    (["--cascade", "exit3", "--exit-head", "{tmp}/none.safetensors"], "file not found"),
    (["--cascade", "32,64", "--exit-head", "{tmp}/none.safetensors"], "needs --cascade exitK"),
    (["--exit-head", "{tmp}/none.safetensors"], "needs --cascade exitK"),
    (["--cascade", "exitx"], "or exitK"),
])
def test_bad_depth_cascade_input_is_one_error_line_exit_2_nothing_written(args, message, tmp_path, capsys):
    from mobilevit_deploy.export.__main__ import main

    out = tmp_path / "out"
    argv = ["--target", "executorch", "--out", str(out)] + [a.format(tmp=tmp_path) for a in args]
    if "--target" in args:
        argv = argv[2:]
    assert_one_error_line(main, argv, message, capsys, out)


# ------------------------------------------------------------------------------------------ bench rows


def test_bench_takes_the_depth_form_only_with_the_shipped_weights_at_their_size():
    from mobilevit_deploy.bench.harness import BenchConfig

    cfg = BenchConfig(targets=("eager",), cascade=("exit3",), weights="shipped")
    cfg.validate()
    assert cfg.cascade == "exit3"
    for kw in ({"weights": "random"}, {"size": 96}):
        with pytest.raises(UserError, match="--weights shipped and no --size"):
            BenchConfig(targets=("eager",), cascade=("exit3",), **{"weights": "shipped", **kw}).validate()


@pytest.mark.slow
def test_bench_harness_times_the_depth_cascade_and_the_whole_model():
    from mobilevit_deploy.bench.harness import BenchConfig, run_benchmark

    doc = run_benchmark(BenchConfig(targets=("eager",), cascade=("exit3",), weights="shipped", threads=1, warmup=1,
                                    rounds=2, iters=2), progress=False, log=lambda s: None)
    rows = {r["target"]: r for r in doc["rows"]}
    c, alone = rows["pte_cascade"], rows["pte_last_stage"]
    assert c["status"] == alone["status"] == "ok" and c["input_size"] == [64, 64]
    assert c["cascade"]["kind"] == "depth" and alone["cascade"]["what"] == "whole model (forward) alone"
    g_exit, g_rest = c["cascade"]["stage_gflops"]
    assert g_exit < alone["gflops"] < g_exit + g_rest, "the exit is cheaper than the model, exit + rest dearer"


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing", "--out", "{tmp}/h.safetensors"], "directory not found"),
    (["--data", "{tmp}", "--out", "{tmp}/h.pt"], "--out must end in .safetensors"),
    (["--data", "{tmp}", "--out", "{tmp}/h.safetensors", "--head", "big"], "invalid choice"),
])
def test_train_exit_head_bad_input_is_one_error_line(args, message, tmp_path, capsys):
    from mobilevit_deploy.train.exit_head import main

    assert_one_error_line(main, [a.format(tmp=tmp_path) for a in args], message, capsys)
    assert not list(tmp_path.glob("h.*"))
