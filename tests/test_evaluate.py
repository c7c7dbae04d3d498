"""`python -m mobilevit_deploy.evaluate`: checkpoints, artifacts, shipped weights, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mobilevit_deploy.cli import run_cli
from mobilevit_deploy.errors import DataError

from test_train_loop import FIXTURE, TINY, TinyNet, tiny  # noqa: F401  (fixture)

VAL = FIXTURE / "val"
CIFAR_VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "val"


def _save_tiny(tmp_path, labels=("blue", "green", "red"), seed=0, with_json=True):
    from mobilevit_deploy.checkpoint import save_safetensors
    from mobilevit_deploy.models import DeployCfg

    torch.manual_seed(seed)
    net = TinyNet(len(labels)).eval()
    ck = save_safetensors(net.state_dict(), tmp_path / "w.safetensors")
    dcfg = DeployCfg(input_size=(3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=1.0,
                     interpolation="bilinear", num_classes=len(labels), labels=tuple(labels))
    if with_json:
        (tmp_path / "w.json").write_text(json.dumps({"model": TINY, "deploy_cfg": dcfg.to_dict()}))
    return net, ck, dcfg


def _expected_top1(net, dcfg, root=VAL):
    """Reference computed here, image by image, with the DeployCfg's own eval transform."""
    from mobilevit_deploy.data import eval_transform, list_image_folder, load_rgb

    samples, classes = list_image_folder(root)
    t = eval_transform(dcfg)
    labels = list(dcfg.labels)
    ok = 0
    with torch.no_grad():
        for p, y in samples:
            pred = int(net(t(load_rgb(p))[None]).argmax(1))
            ok += labels[pred] == classes[y]
    return 100.0 * ok / len(samples)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checkpoint_top1_matches_reference(tiny, tmp_path, seed):
    from mobilevit_deploy.evaluate import evaluate

    net, ck, dcfg = _save_tiny(tmp_path, seed=seed)
    r = evaluate(VAL, checkpoint=ck, progress=False, batch_size=5)
    assert r.total == 12 and r.model == TINY and r.deploy_cfg == dcfg
    assert r.top1 == pytest.approx(_expected_top1(net, dcfg))


def test_label_order_is_mapped_by_name(tiny, tmp_path):
    from mobilevit_deploy.evaluate import evaluate

    net, ck, dcfg = _save_tiny(tmp_path, labels=("red", "blue", "green"), seed=3)
    r = evaluate(VAL, checkpoint=ck, progress=False)
    assert r.top1 == pytest.approx(_expected_top1(net, dcfg))


def test_class_mismatch_names_both(tiny, tmp_path):
    from mobilevit_deploy.evaluate import evaluate

    _, ck, _ = _save_tiny(tmp_path, labels=("blue", "green", "yellow"))
    with pytest.raises(DataError,
                       match=r"data has \['blue', 'green', 'red'\].*model has \['blue', 'green', 'yellow'\]"):
        evaluate(VAL, checkpoint=ck, progress=False)


def test_cli_prints_top1_and_bad_input_exits_2(tiny, tmp_path, capsys):
    from mobilevit_deploy.evaluate import main

    net, ck, dcfg = _save_tiny(tmp_path, seed=4)
    out = tmp_path / "r.json"
    assert run_cli(main, ["--data", str(VAL), "--checkpoint", str(ck), "--no-progress", "--json", str(out)]) == 0
    line = capsys.readouterr().out
    want = _expected_top1(net, dcfg)
    assert f"top-1 {want:.2f} %" in line
    assert json.loads(out.read_text())["top1"] == pytest.approx(want)
    assert run_cli(main, ["--data", str(tmp_path / "nope"), "--checkpoint", str(ck)]) == 2
    assert "not found" in capsys.readouterr().err
    assert run_cli(main, ["--data", str(VAL), "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert run_cli(main, ["--data", str(VAL), "--checkpoint", str(ck), "--artifact", "x.onnx"]) == 2
    (tmp_path / "w.json").unlink()
    assert run_cli(main, ["--data", str(VAL), "--checkpoint", str(ck)]) == 2  # no JSON: needs --model
    assert "--model" in capsys.readouterr().err


def test_undecodable_image_is_skipped(tiny, tmp_path):
    import shutil

    from mobilevit_deploy.evaluate import evaluate

    data = tmp_path / "val"
    shutil.copytree(VAL, data)
    (data / "red" / "zz_broken.jpg").write_bytes(b"not a jpeg")
    _, ck, _ = _save_tiny(tmp_path)
    with pytest.warns(UserWarning, match="undecodable"):
        r = evaluate(data, checkpoint=ck, progress=False)
    assert r.skipped == 1


def test_onnx_artifact_agrees_with_checkpoint(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    from mobilevit_deploy.evaluate import evaluate
    from mobilevit_deploy.export import export_model

    net, ck, dcfg = _save_tiny(tmp_path, seed=5)
    res = export_model(TINY, "onnx", out_dir=tmp_path / "art", model=net, deploy_cfg=dcfg, verify=False)
    r_art = evaluate(VAL, artifact=res.artifact, progress=False)
    r_ck = evaluate(VAL, checkpoint=ck, progress=False)
    assert r_art.deploy_cfg.image_size == (32, 32) and tuple(r_art.deploy_cfg.labels) == dcfg.labels
    assert r_art.deploy_cfg.mean == pytest.approx(dcfg.mean) and r_art.deploy_cfg.std == pytest.approx(dcfg.std)
    assert r_art.total == r_ck.total == 12
    assert r_art.top1 == pytest.approx(r_ck.top1)


@pytest.mark.data
def test_shipped_weights_reach_their_recorded_top1_on_cifar10_val():
    """The figure in the shipped JSON is what `evaluate` measures on the shared CIFAR-10 val split."""
    from mobilevit_deploy.evaluate import evaluate
    from mobilevit_deploy.pretrained import shipped_weights

    if not CIFAR_VAL.is_dir():
        pytest.skip(f"shared CIFAR-10 subset not found at {CIFAR_VAL}")
    sw = shipped_weights("mobilevit_xxs")
    if sw is None:
        pytest.skip("no shipped mobilevit_xxs weights")
    r = evaluate(CIFAR_VAL, progress=False, batch_size=200)
    assert r.total == 1000
    assert r.top1 == pytest.approx(sw.meta["val_top1"], abs=1e-6)
    assert r.top1 > 10 * 2  # far above chance (10 %) for 10 classes
