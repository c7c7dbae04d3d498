"""`python -m mobilevit_deploy.export`: one end-to-end run at the defaults, and every bad input
(one clear line, exit 2, nothing written)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mobilevit_deploy.cli import run_cli
from mobilevit_deploy.export.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def _cli(argv, capsys):
    rc = run_cli(main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _run_module(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "mobilevit_deploy.export", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_import_export_is_light():
    code = (
        "import sys, mobilevit_deploy.export, mobilevit_deploy.export.__main__, mobilevit_deploy.runtime, "
        "mobilevit_deploy.verify, mobilevit_deploy.quantize.__main__\n"
        "heavy = ('torch', 'coremltools', 'executorch', 'onnxruntime', 'onnx', 'onnxscript')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the export CLI pulled in {out.stdout.strip()}"


def test_cli_end_to_end_default(tmp_path):
    """The command a user types, at the defaults (mobilevit_xxs, 256x256), through a real subprocess."""
    from mobilevit_deploy.pretrained import shipped_weights

    out = tmp_path / "artifacts"
    r = _run_module("--target", "onnx", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    for stage in ("capture:", "lower:", "verify:", "write:"):
        assert sum(line.startswith(stage) for line in lines) == 1, (stage, r.stdout)
    art = out / "mobilevit_xxs.onnx"
    man = json.loads((out / "mobilevit_xxs.onnx.json").read_text())
    assert art.is_file() and sorted(p.name for p in out.iterdir()) == ["mobilevit_xxs.onnx", "mobilevit_xxs.onnx.json"]
    assert man["input"]["shape"][2:] == list(man["deploy_cfg"]["input_size"][1:])
    assert man["verification"]["passed"] and man["verification"]["sqnr_db"] > 60
    sw = shipped_weights("mobilevit_xxs")
    if sw is None:
        assert "WARNING: no checkpoint given and no shipped weights for mobilevit_xxs: exporting UNTRAINED" in r.stdout
        assert man["checkpoint"]["sha256"] == "untrained" and man["input"]["shape"] == [1, 3, 256, 256]
    else:
        assert "shipped weights" in r.stdout and "val top-1" in r.stdout and "UNTRAINED" not in r.stdout
        assert man["checkpoint"]["sha256"] != "untrained" and man["labels"] == sw.deploy_cfg.class_labels
    # the toolchain's chatter is hidden by default
    assert "Failed to load" not in r.stdout + r.stderr and "%|" not in r.stderr


def test_cli_unknown_target_subprocess(tmp_path):
    r = _run_module("--target", "tflite", "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("error: argument --target: invalid choice: 'tflite'")
    assert "coreml" in r.stderr and "executorch" in r.stderr and "onnx" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_missing_target(capsys):
    rc, out, err = _cli([], capsys)
    assert rc == 2 and "--target" in err and len(err.strip().splitlines()) == 1


def test_cli_unknown_model(tmp_path, capsys):
    rc, out, err = _cli(["--target", "onnx", "--model", "vit_huge", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    assert err.strip() == err.strip().splitlines()[0]  # one line
    assert "unknown model 'vit_huge' (choose from:" in err and "mobilevit_xxs" in err and "cmt_ti" in err
    assert not (tmp_path / "o").exists()


def test_cli_unknown_backend(tmp_path, capsys):
    rc, out, err = _cli(["--target", "executorch", "--backend", "vulkan", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "choose from: xnnpack, coreml" in err and not (tmp_path / "o").exists()


def test_cli_missing_checkpoint(tmp_path, capsys):
    argv = ["--target", "onnx", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]
    rc, out, err = _cli(argv, capsys)
    assert rc == 2 and err.startswith("error: checkpoint not found:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_mismatched_checkpoint(tmp_path, capsys):
    import torch

    ck = tmp_path / "other.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(10, 4)}}, ck)
    out = tmp_path / "o"
    rc, _, err = _cli(["--target", "onnx", "--checkpoint", str(ck), "--out", str(out)], capsys)
    assert rc == 2 and "does not match" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_corrupt_checkpoint(tmp_path, capsys):
    ck = tmp_path / "bad.safetensors"
    ck.write_bytes(b"not a checkpoint")
    rc, _, err = _cli(["--target", "coreml", "--checkpoint", str(ck), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "cannot read checkpoint" in err and not (tmp_path / "o").exists()


def test_cli_unwritable_out(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    rc, _, err = _cli(["--target", "onnx", "--out", str(f)], capsys)
    assert rc == 2 and "not a directory" in err
    rc, _, err = _cli(["--target", "onnx", "--out", str(f / "sub")], capsys)
    assert rc == 2 and "not writable" in err and len(err.strip().splitlines()) == 1


def test_cli_bad_precision(tmp_path, capsys):
    rc, _, err = _cli(["--target", "onnx", "--precision", "fp16", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "choose from: fp32" in err and not (tmp_path / "o").exists()
