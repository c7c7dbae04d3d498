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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    (["--target-macs", "0.5", "--method", "wd"], "'wd' is not implemented yet (implemented: taylor"),
    (["--target-macs", "0.5", "--method", "spvit"], "'spvit' is not implemented yet"),
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
