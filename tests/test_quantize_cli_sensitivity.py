"""`python -m mobilevit_deploy.quantize`: the per-layer sensitivity ranking the `--keep-float` error
message points to, and the list of schemes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mobilevit_deploy.cli import run_cli
from mobilevit_deploy.errors import UserError
from mobilevit_deploy.quantize.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def test_schemes_lists_every_registered_scheme(capsys):
    from mobilevit_deploy.quantize import list_schemes

    assert run_cli(main, ["schemes"]) == 0
    out = capsys.readouterr().out
    for target, names in list_schemes().items():
        for name in names:
            assert any(line.split()[:2] == [target, name] for line in out.splitlines()), (target, name, out)


def test_keep_float_error_names_a_command_that_exists():
    from mobilevit_deploy.quantize.pt2e import check_patterns

    with pytest.raises(UserError) as e:
        check_patterns(["nope"], ["stem.conv", "head.fc"])
    msg = str(e.value)
    assert "python -m mobilevit_deploy.quantize sensitivity" in msg
    r = subprocess.run([sys.executable, "-m", "mobilevit_deploy.quantize", "sensitivity", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--model" in r.stdout


def test_sensitivity_ranks_and_lists_units(capsys):
    argv = ["sensitivity", "--model", "mobilevit_xxs", "--size", "32", "--calib-size", "8", "--eval-images", "4",
            "--top", "3"]
    assert run_cli(main, argv) == 0
    out = capsys.readouterr().out
    assert "executorch int8: all quantized (simulation) SQNR" in out
    units = out.split("quantizable units (")[1].splitlines()[1:]
    assert "  stem.conv" in units and any(u.strip().startswith("stages.2.1.transformer.0") for u in units)


def test_sensitivity_bad_input_is_one_error_line(tmp_path, capsys):
    assert run_cli(main, ["sensitivity", "--calib-data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: calibration data not found") and len(err.strip().splitlines()) == 1
    assert run_cli(main, ["sensitivity", "--model", "resnet50"]) == 2
    assert "unknown model 'resnet50'" in capsys.readouterr().err
