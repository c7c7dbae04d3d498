"""`export --size H|HxW`: the input size of the exported graph (default: the weights' deploy size),
recorded in the manifest; a bad value is one error line with the allowed form, exit 2, nothing written."""
from __future__ import annotations

import json

import pytest

from mobilevit_deploy.cli import run_cli
from mobilevit_deploy.errors import UserError
from mobilevit_deploy.export import ExportConfig, export_model
from mobilevit_deploy.export.__main__ import main
from mobilevit_deploy.export.size import parse_size


@pytest.mark.parametrize("value, hw", [(256, (256, 256)), ("256", (256, 256)), ("256x192", (256, 192)),
                                       (" 96X64 ", (96, 64)), ([128, 96], (128, 96)), ((32, 4096), (32, 4096)),
                                       (None, None)])
def test_parse_size(value, hw):
    assert parse_size(value) == hw


@pytest.mark.parametrize("value", ["abc", "", "0", "256x", "x256", "-5", "256x192x3", "25.6", "16", "31x64",
                                   "5000", True, 0, 2.5, [256], [256, "a"], (1, 2, 3)])
def test_parse_size_rejects(value):
    with pytest.raises(UserError) as e:
        parse_size(value)
    msg = str(e.value)
    assert "\n" not in msg and "H or HxW" in msg and "256x192" in msg


def test_config_size_round_trip():
    c = ExportConfig("onnx", size="128x96")
    assert c.size == (128, 96) and c.to_dict()["size"] == [128, 96]
    assert ExportConfig.from_dict(c.to_dict()) == c
    assert ExportConfig.from_dict({"target": "onnx"}).size is None
    assert ExportConfig("executorch", quant=None, size=160).fp32().size == (160, 160)


@pytest.mark.parametrize("bad", ["abc", "10", "256x", "0x0"])
def test_cli_bad_size_is_one_line_exit_2(bad, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(main, ["--target", "onnx", "--size", bad, "--out", str(out)])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "H or HxW" in lines[0], err
    assert not out.exists()


def test_size_the_model_cannot_run_is_a_user_error(tmp_path):
    """A model with a fixed-size position embedding cannot be exported at another size: one UserError
    before any stage runs, and the output directory it created is removed."""
    from mobilevit_deploy.models import list_models
    from mobilevit_deploy.pretrained import ModelSource

    if "deit_tiny_patch16_224" not in list_models():
        pytest.skip("no deit_tiny registered")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="cannot run at this input size"):
        export_model(ModelSource("deit_tiny_patch16_224", pretrained=False), ExportConfig("onnx", size="100x60"),
                     out_dir=out, log=None)
    assert not out.exists()


@pytest.mark.slow
def test_export_at_requested_size_records_it(tmp_path, capsys):
    out = tmp_path / "a"
    rc = run_cli(main, ["--target", "onnx", "--size", "96x64", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    m = json.loads((out / "mobilevit_xxs.onnx.json").read_text())
    assert m["input"]["shape"] == [1, 3, 96, 64]
    assert m["deploy_cfg"]["input_size"] == [3, 96, 64]
    assert m["input"]["size"]["from"] == "--size" and m["input"]["size"]["height"] == 96
    assert m["input"]["size"]["width"] == 64
    assert m["verification"]["passed"]
    assert "capture: torch.export of mobilevit_xxs at 1x3x96x64" in stdout
    import onnx

    dims = [d.dim_value for d in onnx.load(str(out / "mobilevit_xxs.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 96, 64]


def test_default_size_is_the_weights_deploy_size(tmp_path):
    """Without --size the exported graph has the weights' DeployCfg size, and the manifest says so.
    (A small untrained module keeps this fast.)"""
    from mobilevit_deploy.models import create_model, get_deploy_cfg
    from mobilevit_deploy.pretrained import ModelSource

    cfg = get_deploy_cfg("mobilevit_xxs")
    from dataclasses import replace

    cfg = replace(cfg, input_size=(3, 64, 64), num_classes=10, labels=())
    model = create_model("mobilevit_xxs", num_classes=10).eval()
    model.deploy_cfg = cfg
    res = export_model(ModelSource("mobilevit_xxs", module=model), ExportConfig("onnx", verify=False),
                       out_dir=tmp_path, log=None)
    size = res.manifest["input"]["size"]
    assert res.manifest["input"]["shape"] == [1, 3, 64, 64]
    assert size == {"height": 64, "width": 64, "from": "deploy_cfg", "weights_deploy_size": [64, 64]}
    res2 = export_model(ModelSource("mobilevit_xxs", module=model), ExportConfig("onnx", verify=False, size=96),
                        out_dir=tmp_path / "b", log=None)
    assert res2.manifest["input"]["shape"] == [1, 3, 96, 96]
    assert res2.manifest["input"]["size"] == {"height": 96, "width": 96, "from": "--size",
                                              "weights_deploy_size": [64, 64]}
    assert model.deploy_cfg.input_size == (3, 64, 64)  # the caller's module is not changed
