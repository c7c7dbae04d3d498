"""Stale staging directories: a killed export leaves `.<name>.staging.<host>.<pid>.*` in --out; the
next export into that folder removes it, but never a concurrent (live) export's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobilevit_deploy.export import staging as st

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _mk(out: Path, name: str) -> Path:
    d = out / name
    d.mkdir()
    (d / "partial.pte").write_bytes(b"x" * 10)
    return d


def test_only_stale_dirs_are_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = st._HOST
        dead = _mk(tmp_path, f".m.pte.staging.{host}.{_dead_pid()}.abc123")
        concurrent = _mk(tmp_path, f".m.pte.staging.{host}.{live.pid}.def456")
        mine = _mk(tmp_path, f".m.onnx.staging.{host}.{os.getpid()}.ghi789")
        other_host = _mk(tmp_path, f".m.pte.staging.{host}x.{_dead_pid()}.jkl000")
        legacy_old = _mk(tmp_path, ".m.pte.staging.q1w2e3r4")
        old = time.time() - st.LEGACY_STALE_S - 60
        os.utime(legacy_old, (old, old))
        legacy_new = _mk(tmp_path, ".m.pte.staging.z9x8c7v6")
        not_staging = _mk(tmp_path, ".hidden")
        artifact = tmp_path / "m.pte"
        artifact.write_bytes(b"keep")
        logged = []
        removed = st.remove_stale_staging(tmp_path, logged.append)
        assert sorted(removed) == sorted([dead, legacy_old])
        assert not dead.exists() and not legacy_old.exists()
        for d in (concurrent, mine, other_host, legacy_new, not_staging):
            assert d.is_dir(), d
        assert artifact.read_bytes() == b"keep"
        assert len(logged) == 1 and "removed 2 staging directories" in logged[0]
    finally:
        live.kill()
        live.wait()
    # the concurrent export has ended (killed): now its directory is stale too
    assert st.remove_stale_staging(tmp_path) == [concurrent]


def test_staging_dir_name_carries_host_and_pid(tmp_path):
    d = st.make_staging_dir(tmp_path, "x.pte")
    m = st._NEW.match(d.name)
    assert m and int(m.group("pid")) == os.getpid() and m.group("host") == st._HOST
    assert d.name.startswith(".x.pte.staging.")
    assert st.stale_staging_dirs(tmp_path) == []  # our own directory is never stale


@pytest.mark.slow
def test_killed_export_is_cleaned_by_the_next_one(tmp_path):
    """A real export killed mid-run leaves its staging directory; the next export into the same
    folder removes it and leaves only its artifact and manifest."""
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "mobilevit_deploy.export", "--target", "onnx", "--out", str(out)],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not [d for d in out.iterdir() if ".staging." in d.name]:
            time.sleep(0.05)
            assert p.poll() is None, "the export ended before making its staging directory"
        left = [d for d in out.iterdir() if ".staging." in d.name]
        assert left, "no staging directory appeared"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert all(d.exists() for d in left)  # the kill left it behind

    import torch

    from mobilevit_deploy.export import ExportConfig, export_model
    from mobilevit_deploy.models import create_model
    from mobilevit_deploy.pretrained import ModelSource

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
            self.fc = torch.nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    from dataclasses import replace

    cfg = replace(create_model("mobilevit_xxs", num_classes=10).deploy_cfg, input_size=(3, 32, 32), labels=())
    m = Tiny().eval()
    m.deploy_cfg = cfg
    lines = []
    export_model(ModelSource("tiny", module=m), ExportConfig("onnx", verify=False), out_dir=out, log=lines.append)
    assert sorted(x.name for x in out.iterdir()) == ["tiny.onnx", "tiny.onnx.json"]
    assert any(line.startswith("staging: removed 1 staging directory") for line in lines), lines
