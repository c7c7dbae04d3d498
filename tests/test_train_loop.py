"""The trainer end to end on a tiny model and a tiny ImageFolder (always runs, a few seconds each)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mobilevit_deploy.errors import DataError, UserError

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_imagefolder"
TINY = "_test_tiny_net"


class TinyNet(nn.Module):
    """Conv net without BatchNorm (so one process and DDP can agree exactly), with the model API."""

    def __init__(self, num_classes: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(width, 16, 3, stride=2, padding=1)
        self.act = nn.GELU()
        self.head = nn.Linear(16, num_classes)

    def forward_features(self, x):
        return self.act(self.conv(self.act(self.stem(x))))

    def forward_head(self, f):
        return self.head(f.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def register_tiny():
    from mobilevit_deploy.models import DeployCfg
    from mobilevit_deploy.models import _registry as r

    r._ensure_loaded()

    def _test_tiny_net(num_classes=3, **kw):
        return TinyNet(num_classes, **kw)

    r.register_model(_test_tiny_net, cfg=DeployCfg(input_size=(3, 32, 32), crop_pct=1.0))


def unregister_tiny():
    from mobilevit_deploy.models import _registry as r

    r._MODELS.pop(TINY, None)
    r._DEFAULT_CFGS.pop(TINY, None)


@pytest.fixture
def tiny():
    register_tiny()
    yield TINY
    unregister_tiny()


def tiny_cfg(model=TINY, **over):
    from mobilevit_deploy.train.config import apply_overrides, config_from_dict

    d = {
        "model": {"name": model},
        "data": {"train_sizes": [16, 32], "size_divisor": 16, "base_size": 32, "batch_size": 6, "cache": True,
                 "crop_scale": [0.5, 1.0], "eval_size": 32, "crop_pct": 1.0, "val_batch_size": 8},
        "optim": {"lr": 0.01, "weight_decay": 0.01},
        "schedule": {"epochs": 3, "warmup_epochs": 0.5, "warmup_init_lr": 0.001, "min_lr": 0.0001},
        "ema": {"enabled": True, "decay": 0.9, "warmup": True},
        "label_smoothing": 0.1, "amp": "fp32", "progress": False, "threads": 1, "seed": 1,
    }
    apply_overrides(d, [f"{k}={v}" for k, v in over.items()])
    return config_from_dict(d)


def load_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_train_writes_metrics_curves_checkpoint_and_weights(tiny, tmp_path):
    from mobilevit_deploy.train.loop import train

    res = train(tiny_cfg(**{"schedule.epochs": 4}), data=FIXTURE, out=tmp_path / "run")
    out = tmp_path / "run"
    assert res.finished and res.epochs_done == 4
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all("val_top1" in r and "img_per_s" in r and r["skipped_images"] == 0 for r in rows)
    assert "val_top1_raw" in rows[-1]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns (three colour classes)
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint" / "state.pt").is_file()
    assert len(list((out / "checkpoint").glob("epoch_*_model.safetensors"))) == 1  # older epochs removed
    meta = json.loads((out / "model.json").read_text())
    assert meta["model"] == TINY and meta["epochs"] == 4 and meta["val_top1"] == rows[-1]["val_top1"]
    assert meta["deploy_cfg"]["labels"] == ["blue", "green", "red"] and meta["deploy_cfg"]["num_classes"] == 3
    from mobilevit_deploy.checkpoint import file_sha256

    assert meta["sha256"] == file_sha256(out / "model.safetensors")


def test_resume_after_interruption_matches_straight_run(tiny, tmp_path):
    """A run stopped after epoch 1 and resumed ends with bit-identical weights (raw and EMA)."""
    from mobilevit_deploy.train.loop import train

    cfg = tiny_cfg(**{"schedule.epochs": 3})
    train(cfg, data=FIXTURE, out=tmp_path / "straight")
    part = train(tiny_cfg(**{"schedule.epochs": 3, "stop_after": 1}), data=FIXTURE, out=tmp_path / "resumed")
    assert not part.finished and part.epochs_done == 1
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    # a torch RNG draw between the two invocations must not matter: the state is restored
    torch.rand(100)
    train(cfg, data=FIXTURE, out=tmp_path / "resumed", resume=True)
    a = load_weights(tmp_path / "straight" / "model.safetensors")
    b = load_weights(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = load_weights(next((tmp_path / "straight" / "checkpoint").glob("*_model.safetensors")))
    cb = load_weights(next((tmp_path / "resumed" / "checkpoint").glob("*_model.safetensors")))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]


def test_existing_checkpoint_needs_resume(tiny, tmp_path):
    from mobilevit_deploy.train.loop import train

    train(tiny_cfg(**{"schedule.epochs": 2, "stop_after": 1}), data=FIXTURE, out=tmp_path / "r")
    with pytest.raises(UserError, match="--resume"):
        train(tiny_cfg(**{"schedule.epochs": 2}), data=FIXTURE, out=tmp_path / "r")


def test_undecodable_image_is_skipped_and_counted(tiny, tmp_path):
    from mobilevit_deploy.train.loop import train

    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    for cache in (True, False):
        with pytest.warns(UserWarning, match="undecodable"):
            res = train(tiny_cfg(**{"schedule.epochs": 1, "data.cache": cache}), data=data, out=tmp_path / f"o{cache}")
        assert res.finished and res.metrics[-1]["skipped_images"] == 1


def test_distillation_runs_with_a_teacher(tiny, tmp_path):
    from mobilevit_deploy.train.loop import train

    cfg = tiny_cfg(**{"schedule.epochs": 1, "distill.teacher": TINY, "distill.teacher_kwargs": "{width: 24}",
                      "distill.kd_weight": 0.5, "distill.kd_temperature": 2.0, "distill.manifold_weight": 0.1,
                      "distill.manifold_k": 16})
    res = train(cfg, data=FIXTURE, out=tmp_path / "kd")
    row = res.metrics[-1]
    assert row["train_kd"] > 0 and row["train_mf_patch"] > 0 and row["train_mf_sample"] > 0 and row["train_mf_rand"] > 0


def _mkdata(root: Path, train_classes, val_classes):
    from PIL import Image

    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(d / "a.png")


def test_bad_data_is_a_clear_error(tiny, tmp_path):
    from mobilevit_deploy.train.loop import train

    cfg = tiny_cfg(**{"schedule.epochs": 1})
    with pytest.raises(DataError, match="not found"):
        train(cfg, data=tmp_path / "missing", out=tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train/ folder"):
        train(cfg, data=tmp_path / "empty", out=tmp_path / "o2")
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    (tmp_path / "noclass" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        train(cfg, data=tmp_path / "noclass", out=tmp_path / "o3")
    _mkdata(tmp_path / "mismatch", ["cat", "dog"], ["cat", "dgo"])
    with pytest.raises(DataError, match=r"only in train: \['dog'\].*only in val: \['dgo'\]"):
        train(cfg, data=tmp_path / "mismatch", out=tmp_path / "o4")
    with pytest.raises(UserError, match="unknown model 'mobilevit_xxxl'"):
        train(tiny_cfg("mobilevit_xxxl"), data=FIXTURE, out=tmp_path / "o5")
