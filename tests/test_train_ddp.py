"""DDP on CPU (gloo): 2 processes give the result of 1 process with the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from test_train_loop import FIXTURE, load_weights, tiny, tiny_cfg  # noqa: F401  (fixture)

OVER = {"schedule.epochs": 2, "data.batch_size": 6, "seed": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, over):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from mobilevit_deploy.train.loop import train

    from test_train_loop import register_tiny, tiny_cfg

    register_tiny()
    train(tiny_cfg(**over), data=FIXTURE, out=out)


def test_two_gloo_processes_match_one_process(tiny, tmp_path):
    import torch.multiprocessing as mp

    from mobilevit_deploy.train.loop import train

    train(tiny_cfg(**OVER), data=FIXTURE, out=tmp_path / "one")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two"), OVER), nprocs=2, join=True)

    a, b = load_weights(tmp_path / "one" / "model.safetensors"), load_weights(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a)
    print(f"DDP 2x gloo vs 1 process: max |w1 - w2| = {diff:.3g} (max |w| = {scale:.3g})")
    # Same images, sizes and augmentation per step; only the float summation order of the gradient
    # (all-reduce of two half-batch means vs one mean) differs.
    assert diff < 1e-4 * max(scale, 1.0), f"max |w_1proc - w_2proc| = {diff:.3g}"
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert [r["images"] for r in ma] == [r["images"] for r in mb]  # every image seen once per epoch
    assert [r["steps"] for r in ma] == [r["steps"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["val_top1"] == pytest.approx(ra["val_top1"])  # val is sharded and summed


@pytest.mark.slow
def test_torchrun_cli_trains_mobilevit_with_gloo(tmp_path):
    """The real command under torchrun (2 CPU processes, gloo) on the tiny fixture, MobileViT-XXS at 32 px."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    repo = Path(__file__).resolve().parents[1]
    cmd = [torchrun, "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "mobilevit_deploy.train",
           "--recipe", str(repo / "recipes" / "mobilevit_xxs_cifar10.yaml"), "--data", str(FIXTURE),
           "--out", str(tmp_path / "run"), "--set", "schedule.epochs=1", "--set", "data.train_sizes=[32]",
           "--set", "data.eval_size=32", "--set", "data.batch_size=8", "--set", "data.base_size=32",
           "--set", "progress=false"]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es) (gloo)" in p.stdout + p.stderr
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["model"] == "mobilevit_xxs" and meta["deploy_cfg"]["labels"] == ["blue", "green", "red"]
