"""Kill the real training command between epochs, resume it, and get the straight run's weights."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_loop import FIXTURE, load_weights

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mobilevit_deploy.train",
            "--recipe", str(REPO / "recipes" / "mobilevit_xxs_cifar10.yaml"),
            "--data", str(FIXTURE), "--out", str(out), "--set", f"schedule.epochs={EPOCHS}",
            "--set", "data.train_sizes=[32, 64]", "--set", "data.base_size=32", "--set", "data.batch_size=8",
            "--set", "data.eval_size=32", "--set", "threads=1", "--set", "progress=false", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _epoch_of(state: Path) -> int:
    return int(torch.load(state, map_location="cpu", weights_only=True)["epoch"])


@pytest.mark.slow  # three processes of the real command: ~40 s on an idle 2-core machine, minutes when loaded
def test_killed_run_resumes_to_the_straight_run_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p = subprocess.run(_cmd(straight), env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]

    proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "state.pt"
    deadline = time.time() + 600
    try:
        while not state.exists():  # the end of epoch 1 is checkpointed...
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            assert time.time() < deadline
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)  # ...and the run dies somewhere after it
        proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    stopped_at = _epoch_of(state)
    assert stopped_at < EPOCHS - 1

    p = subprocess.run(_cmd(killed, "--resume"), env=_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed {killed} after epoch {stopped_at + 1}" in p.stdout + p.stderr
    a, b = load_weights(straight / "model.safetensors"), load_weights(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical (EMA weights)
    ra = json.loads((straight / "metrics.json").read_text())
    rb = json.loads((killed / "metrics.json").read_text())
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert [r["val_top1"] for r in ra] == [r["val_top1"] for r in rb]


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from mobilevit_deploy.cli import run_cli
    from mobilevit_deploy.train.__main__ import main

    recipe = str(REPO / "recipes" / "mobilevit_xxs_cifar10.yaml")
    assert run_cli(main, ["--recipe", recipe, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "data directory not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: mobilevit_xxxs}\n")
    assert run_cli(main, ["--recipe", str(bad), "--data", str(FIXTURE), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'mobilevit_xxxs'" in err and "mobilevit_xxs" in err
    assert run_cli(main, ["--recipe", recipe, "--set", "optim.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.learning_rate" in err and "weight_decay" in err
    assert run_cli(main, ["--data", str(FIXTURE)]) == 2
    assert "--recipe" in capsys.readouterr().err


def test_module_entry_point_exits_2_on_bad_input(tmp_path):
    """`python -m mobilevit_deploy.train` itself: one subprocess for the real exit status."""
    p = subprocess.run([sys.executable, "-m", "mobilevit_deploy.train", "--recipe", str(tmp_path / "none.yaml")],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == f"error: recipe not found: {tmp_path / 'none.yaml'}"
