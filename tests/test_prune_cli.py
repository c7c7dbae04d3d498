"""`python -m mobilevit_deploy.prune`: bad input exits 2 with one error line and writes nothing; tiny
end-to-end runs on tests/fixtures/tiny_imagefolder (mobilevit_xxs at 32 px, 3 classes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mobilevit_deploy.cli import run_cli
from mobilevit_deploy.prune.__main__ import main

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_imagefolder"
LABELS = ("blue", "green", "red")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 3-class mobilevit_xxs checkpoint (seeded random weights) deployed at 32 px, with its model.json."""
    from mobilevit_deploy.checkpoint import save_safetensors
    from mobilevit_deploy.models import create_model, get_deploy_cfg

    d = tmp_path_factory.mktemp("src")
    cfg = replace(get_deploy_cfg("mobilevit_xxs", 3, LABELS), input_size=(3, 32, 32), crop_pct=1.0)
    torch.manual_seed(0)
    m = create_model("mobilevit_xxs", deploy_cfg=cfg)
    save_safetensors(m.state_dict(), d / "model.safetensors")
    (d / "model.json").write_text(json.dumps({"model": "mobilevit_xxs", "deploy_cfg": cfg.to_dict()}))
    return d / "model.safetensors"


@pytest.fixture(scope="module")
def empty_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("empty")
    for split in ("train", "val"):
        for c in LABELS:
            (d / split / c).mkdir(parents=True)
    return d


def _run(argv, capsys):
    rc = run_cli(main, argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


BASE = ["--data", str(FIXTURE), "--threads", "1", "--no-progress", "--epochs", "0", "--method", "magnitude"]


@pytest.mark.parametrize("extra,match", [
    (["--target-macs", "0"], "--target-macs must be a fraction in (0, 1]"),
    (["--target-macs", "1.5"], "--target-macs must be a fraction in (0, 1]"),
    (["--target-latency", "nan"], "--target-latency must be a fraction in (0, 1]"),
    (["--target-macs", "-0.5"], "--target-macs must be a fraction"),
    ([], "one of the arguments --target-macs --target-latency is required"),
    (["--target-macs", "0.5", "--target-latency", "0.5"], "not allowed with argument"),
    (["--target-macs", "0.5", "--method", "foo"], "unknown method 'foo'"),
    (["--target-macs", "0.5", "--method", "WD"], "unknown method 'WD' (choose from: taylor, magnitude, slim, vtp, "
                                                 "nvit, wd, spvit)"),
    (["--target-macs", "0.5", "--epochs", "-1"], "--epochs must be >= 0"),
    (["--target-macs", "0.5", "--model", "nope"], "unknown model 'nope'"),
    (["--target-macs", "0.5", "--model", "mobilevit_xs"], "does not match"),  # an xxs checkpoint
    (["--target-macs", "0.5", "--set", "optim.foo=1"], "unknown recipe key 'optim.foo'"),
])
def test_bad_input_exits_2_and_writes_nothing(ckpt, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    rc, stdout, err = _run(BASE + ["--checkpoint", str(ckpt), "--out", str(out)] + extra, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("data,match", [("missing", "data directory not found"), ("empty", "no images"),
                                        ("nosplit", "has no train/ folder")])
def test_bad_data_exits_2_and_writes_nothing(ckpt, empty_data, tmp_path, capsys, data, match):
    root = {"missing": tmp_path / "nope", "empty": empty_data, "nosplit": FIXTURE / "train"}[data]
    out = tmp_path / "out"
    argv = ["--data", str(root), "--checkpoint", str(ckpt), "--target-macs", "0.5", "--out", str(out), "--epochs", "0"]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_labels_of_another_dataset_exit_2(tmp_path, capsys):
    # the shipped weights are CIFAR-10 (10 classes); the fixture has 3 colour classes
    out = tmp_path / "out"
    rc, _, err = _run(["--data", str(FIXTURE), "--target-macs", "0.5", "--out", str(out), "--epochs", "0"], capsys)
    assert rc == 2 and "are not the labels of the model" in err
    assert not out.exists()


def test_prune_without_finetuning_rebuilds(ckpt, tmp_path, capsys):
    from mobilevit_deploy.models import create_model
    from mobilevit_deploy.prune import count_macs

    out = tmp_path / "out"
    rc, stdout, err = _run(BASE + ["--checkpoint", str(ckpt), "--out", str(out), "--target-macs", "0.7"], capsys)
    assert rc == 0, err
    for step in ("prune: mobilevit_xxs at 32x32", "score: magnitude", "remove: ", "val: pruned top-1", "wrote "):
        assert step in stdout
    meta = json.loads((out / "model.json").read_text())
    assert meta["prune"]["macs_ratio"] <= 0.7 and meta["architecture"]["model"] == "mobilevit_xxs"
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]  # no temporary files left
    m = create_model("mobilevit_xxs", checkpoint=str(out / "model.safetensors"), num_classes=3)
    assert count_macs(m, (32, 32)) == meta["prune"]["macs_after"]


@pytest.mark.parametrize("method", ["wd", "spvit"])
def test_wd_and_spvit_prune_and_rebuild(ckpt, tmp_path, capsys, method):
    """wd / spvit through the CLI (no fine-tuning): the record rebuilds the pruned model with create_model."""
    from mobilevit_deploy.models import create_model
    from mobilevit_deploy.prune import count_macs

    out = tmp_path / "out"
    argv = ["--data", str(FIXTURE), "--threads", "1", "--no-progress", "--epochs", "0", "--method", method,
            "--checkpoint", str(ckpt), "--out", str(out), "--target-macs", "0.7", "--mask-steps", "3",
            "--batch-size", "8", "--calib-batches", "2"]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    assert f"score: {method}" in stdout and ("depth probes" in stdout if method == "wd" else "spvit step" in stdout)
    meta = json.loads((out / "model.json").read_text())
    assert meta["prune"]["macs_ratio"] <= 0.7
    m = create_model("mobilevit_xxs", checkpoint=str(out / "model.safetensors"), num_classes=3)
    assert count_macs(m, (32, 32)) == meta["prune"]["macs_after"]
    if method == "spvit":
        kinds = {gid.split(":")[0] for gid in meta["prune"]["removed"]}
        assert kinds <= {"mv2_hidden", "mlp_hidden", "attn_conv"}
        n_conv = sum(n for gid, n in meta["prune"]["removed"].items() if gid.startswith("attn_conv:"))
        assert len(meta["architecture"].get("replaced", {})) == n_conv


@pytest.mark.slow
def test_spvit_pte_is_fully_delegated(tmp_path):
    """A model whose attentions are all ConvAttention lowers to an fp32 XNNPACK .pte with every op delegated
    and matches PyTorch in the ExecuTorch runtime (~2-6 min here)."""
    from mobilevit_deploy.export import ExportConfig, export_model
    from mobilevit_deploy.models import create_model, get_deploy_cfg
    from mobilevit_deploy.pretrained import ModelSource
    from mobilevit_deploy.prune.stage import write_pruned
    from mobilevit_deploy.prune.structures import ALL_KINDS, groups
    from mobilevit_deploy.prune.surgery import apply_plan

    cfg = replace(get_deploy_cfg("mobilevit_xxs", 3, LABELS), input_size=(3, 64, 64), crop_pct=1.0)
    torch.manual_seed(0)
    m = create_model("mobilevit_xxs", deploy_cfg=cfg).eval()
    plan = {g.id: [] for g in groups(m, ALL_KINDS) if g.kind == "attn_conv"}
    pruned = apply_plan(m, plan)
    w, _, meta = write_pruned(pruned, "mobilevit_xxs", tmp_path / "m")
    assert len(meta["architecture"]["replaced"]) == 9
    res = export_model(ModelSource("mobilevit_xxs", str(w)).load(), ExportConfig("executorch", verify=True),
                       out_dir=tmp_path / "pte", log=None)
    man = json.loads(Path(str(res.artifact) + ".json").read_text())
    assert man["ops_not_delegated"] == []


@pytest.mark.slow
def test_end_to_end_finetune_and_onnx_export(ckpt, tmp_path, capsys):
    """taylor -> 0.6 x MACs -> 1 KD epoch through the trainer -> export the pruned checkpoint to ONNX (~2 min)."""
    out = tmp_path / "pruned"
    argv = ["--data", str(FIXTURE), "--checkpoint", str(ckpt), "--target-macs", "0.6", "--epochs", "1",
            "--batch-size", "8", "--calib-batches", "2", "--out", str(out), "--threads", "1", "--no-progress",
            "--set", "amp=fp32"]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    assert "fine-tune: 1 epoch(s) with the trainer (KD from the unpruned model + labels)" in stdout
    meta = json.loads((out / "model.json").read_text())
    assert meta["prune"]["finetune"]["epochs"] == 1 and meta["prune"]["macs_ratio"] <= 0.6
    assert (out / "finetune" / "metrics.csv").is_file() and not (out / "finetune" / "model.safetensors").exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mobilevit_deploy.export", "--target", "onnx", "--checkpoint",
                        str(out / "model.safetensors"), "--out", str(tmp_path / "art")], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((tmp_path / "art" / "mobilevit_xxs.onnx.json").read_text())
    assert man["verification"]["passed"]


@pytest.mark.slow
def test_study_mini_with_scratch_row(tmp_path):
    """benchmarks.prune_study --train-reference / --scratch on the tiny fixture (no .pte): the scratch row
    has the pruned row's architecture (same params and MACs), trained for reference + fine-tune epochs."""
    from benchmarks.prune_study import main as study

    out = tmp_path / "study"
    argv = ["--data", str(FIXTURE), "--train-reference", "1", "--train-size", "32", "--train-batch", "8",
            "--methods", "magnitude", "--targets", "0.7", "--epochs", "1", "--scratch", "magnitude@0.7",
            "--threads", "1", "--no-pte", "--out", str(out), "--json", str(tmp_path / "s.json"),
            "--md", str(tmp_path / "s.md")]
    assert study(argv) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert set(rows) == {"reference", "magnitude@0.7", "scratch:magnitude@0.7"}
    sc, pr = rows["scratch:magnitude@0.7"], rows["magnitude@0.7"]
    assert sc["kind"] == "scratch" and sc["scratch_epochs"] == 2  # reference 1 + fine-tune 1
    assert (sc["params"], sc["macs"]) == (pr["params"], pr["macs"])
    meta = json.loads((out / "scratch_magnitude_0.7" / "model.json").read_text())
    assert meta["epochs"] == 2 and "architecture" in meta
    assert "scratch:magnitude@0.7" in (tmp_path / "s.md").read_text()
    assert (tmp_path / "s.png").is_file()
