"""Shared fixtures (keep small and additive: several test files use them)."""
from __future__ import annotations

import pytest


def make_tiny_model(size: int = 32, num_classes: int = 10, mean=None, std=None, seed: int = 0):
    """A small conv + attention + LayerNorm classifier with a `.deploy_cfg`: fast to export anywhere.

    Written like the real models (explicit matmul/softmax attention, keepdim spatial mean) so it
    exercises the same lowering paths at a fraction of the cost.
    """
    import torch
    from torch import nn

    from mobilevit_deploy.models import CIFAR10_LABELS, DeployCfg

    class TinyViT(nn.Module):
        def __init__(self, dim=32, heads=2):
            super().__init__()
            self.heads = heads
            self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.SiLU())
            self.norm = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, dim * 3)
            self.proj = nn.Linear(dim, dim)
            self.head = nn.Linear(dim, num_classes)

        def forward_features(self, x):
            x = self.stem(x)
            b, c, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)
            qkv = self.qkv(self.norm(t)).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            a = torch.softmax((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5, dim=-1)
            t = t + self.proj((a @ v).transpose(1, 2).reshape(b, h * w, c))
            return t.transpose(1, 2).reshape(b, c, h, w)

        def forward_head(self, f):
            return self.head(f.mean((2, 3), keepdim=True).flatten(1))

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    torch.manual_seed(seed)
    m = TinyViT().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is actually tested
        bn = m.stem[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        m.head.weight.mul_(20.0)  # logits spread well apart: top-1 is a meaningful comparison
    kw = {}
    if mean is not None:
        kw["mean"] = tuple(mean)
    if std is not None:
        kw["std"] = tuple(std)
    labels = CIFAR10_LABELS if num_classes == 10 else ()
    m.deploy_cfg = DeployCfg(input_size=(3, size, size), num_classes=num_classes, labels=labels, **kw)
    return m


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def xxs_small():
    """mobilevit_xxs (untrained, seeded), 10 CIFAR-10 classes, at 64x64: the real model, cheaply."""
    from dataclasses import replace

    import torch

    from mobilevit_deploy.models import CIFAR10_LABELS, create_model, get_deploy_cfg

    cfg = replace(get_deploy_cfg("mobilevit_xxs", 10, CIFAR10_LABELS), input_size=(3, 64, 64))
    torch.manual_seed(0)
    return create_model("mobilevit_xxs", deploy_cfg=cfg)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of small-model tests (OpenMP spin-waiting on a shared 2-core machine
    costs ~10x the CPU time under load); restored afterwards. Use: pytestmark = usefixtures("one_torch_thread")."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sample_folder(tmp_path_factory):
    """The 40 shipped samples as an ImageFolder (class folders), for `--data` / `--exit-data`."""
    import shutil
    from pathlib import Path

    from mobilevit_deploy.data import sample_images

    root = tmp_path_factory.mktemp("samples_folder")
    for path, cls in sample_images():
        (root / cls).mkdir(exist_ok=True)
        shutil.copy(path, root / cls / Path(path).name)
    return root


def assert_one_error_line(main, argv, message, capsys, out=None):
    """`run_cli(main, argv)` exits 2 with ONE `error:` line containing `message`, and `out` (if given) is
    missing or empty: the contract for bad input."""
    from mobilevit_deploy.cli import run_cli

    rc = run_cli(main, argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert out is None or not out.exists() or not any(out.iterdir())
