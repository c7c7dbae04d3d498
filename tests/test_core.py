"""The package's light core: import cost, DeployCfg, registry errors, checkpoint errors, data listing."""
import subprocess
import sys
from pathlib import Path

import pytest

from mobilevit_deploy.errors import CheckpointError, DataError, UserError
from mobilevit_deploy.models import DeployCfg

REPO = Path(__file__).resolve().parents[1]


def test_import_is_light():
    code = (
        "import sys, mobilevit_deploy, mobilevit_deploy.data, mobilevit_deploy.errors\n"
        "heavy = [m for m in ('torch', 'coremltools', 'executorch', 'onnxruntime', 'onnx') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import mobilevit_deploy pulled in {out.stdout.strip()}"


def test_models_import_does_not_pull_runtimes():
    code = (
        "import sys, mobilevit_deploy as m\n"
        "m.create_model(m.list_models()[0])\n"
        "print(','.join(x for x in ('coremltools', 'executorch', 'onnxruntime') if x in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_registry_lists_all_variants():
    import mobilevit_deploy as m

    names = m.list_models()
    for n in ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s", "cmt_ti", "cmt_xs", "cmt_s", "cmt_b"):
        assert n in names


def test_unknown_model_names_the_choices():
    import mobilevit_deploy as m

    with pytest.raises(UserError, match=r"unknown model 'resnet50' \(choose from: .*mobilevit_xxs"):
        m.create_model("resnet50")


@pytest.mark.parametrize(
    "kwargs",
    [dict(input_size=(1, 32, 32)), dict(crop_pct=0.0), dict(interpolation="lanczos"),
     dict(num_classes=3, labels=("a", "b"))],
)
def test_deploy_cfg_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        DeployCfg(**kwargs)


def test_deploy_cfg_round_trip_and_scale_bias():
    cfg = DeployCfg(input_size=(3, 96, 96), crop_pct=1.0, num_classes=2, labels=("cat", "dog"))
    assert DeployCfg.from_dict(cfg.to_dict()) == cfg
    scale, bias = cfg.scale_bias  # mean 0 / std 1: pixel / 255
    assert scale == pytest.approx(1 / 255) and bias == [0.0, 0.0, 0.0]
    cfg2 = DeployCfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    s, b = cfg2.scale_bias
    assert 255 * s + b[0] == pytest.approx(1.0) and b[0] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="unknown DeployCfg keys"):
        DeployCfg.from_dict({"input_sise": [3, 1, 1]})


def test_checkpoint_errors(tmp_path):
    import torch

    import mobilevit_deploy as m
    from mobilevit_deploy.checkpoint import save_safetensors

    with pytest.raises(CheckpointError, match="not found"):
        m.create_model("mobilevit_xxs", checkpoint=str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        m.create_model("mobilevit_xxs", checkpoint=str(bad))
    wrong = tmp_path / "wrong.safetensors"
    save_safetensors({"foo.weight": torch.zeros(2)}, wrong)
    with pytest.raises(CheckpointError, match=r"missing keys \(first: .*unexpected keys \(first: foo.weight"):
        m.create_model("mobilevit_xxs", checkpoint=str(wrong))
    # a DDP-prefixed .pt wrapped in {"state_dict": ...} loads
    model = m.create_model("mobilevit_xxs", num_classes=10)
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pt")
    m.create_model("mobilevit_xxs", num_classes=10, checkpoint=str(tmp_path / "ddp.pt"))


def test_data_listing_errors(tmp_path):
    from mobilevit_deploy.data import list_image_folder, list_images, sample_images

    with pytest.raises(DataError, match="not found"):
        list_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        list_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_image_folder(tmp_path)
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path)
    samples = sample_images()
    assert len(samples) == 40 and len({c for _, c in samples}) == 10


def test_eval_transform_matches_cfg():
    from mobilevit_deploy.data import load_batch, sample_images

    cfg = DeployCfg(input_size=(3, 64, 48), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)
    x = load_batch([p for p, _ in sample_images()[:3]], cfg)
    assert x.shape == (3, 3, 64, 48)
    assert x.min() >= (0 - 0.5) / 0.25 - 1e-5 and x.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_undecodable_image_is_skipped_with_warning(tmp_path):
    import shutil

    from mobilevit_deploy.data import ImageFolderDataset, eval_transform, sample_images

    (tmp_path / "a").mkdir()
    shutil.copy(sample_images()[0][0], tmp_path / "a" / "good.jpg")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    ds = ImageFolderDataset(tmp_path, eval_transform(DeployCfg(input_size=(3, 32, 32), crop_pct=1.0)))
    with pytest.warns(UserWarning, match="undecodable"):
        items = [ds[i] for i in range(len(ds))]
    assert len(ds.bad) == 1 and all(t.shape == (3, 32, 32) for t, _ in items)


def test_run_cli_turns_user_error_into_exit_2(capsys):
    from mobilevit_deploy.cli import ArgumentParser, run_cli

    def main(argv):
        p = ArgumentParser(prog="x")
        p.add_argument("--target", choices=["a", "b"], required=True)
        p.parse_args(argv)

    assert run_cli(main, ["--target", "c"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'c'" in err[0] and "'a', 'b'" in err[0]
