"""`mobilevit_deploy.runtime.load_artifact`: ExecuTorch and ONNX Runtime runners on a tiny model,
batch handling, thread control, and the clear errors for what cannot run here."""
from __future__ import annotations

import sys

import pytest
import torch

from mobilevit_deploy.errors import UserError
from mobilevit_deploy.export import ExportConfig, ModelSource, export_model
from mobilevit_deploy.runtime import load_artifact
from mobilevit_deploy.verify import sqnr_db

from conftest import make_tiny_model


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory):
    m = make_tiny_model(32)
    out = tmp_path_factory.mktemp("rt")
    arts = {t: export_model(ModelSource("tiny", module=m), ExportConfig(t, verify=False), out_dir=out).artifact
            for t in ("onnx", "executorch")}
    return m, arts


def _inputs(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["onnx", "executorch"])
def test_runner_matches_eager_on_a_batch(tiny_artifacts, kind):
    m, arts = tiny_artifacts
    r = load_artifact(arts[kind], num_threads=1)
    assert r.kind == ("onnxruntime" if kind == "onnx" else "executorch")
    assert tuple(r.input_shape) == (1, 3, 32, 32)
    x = _inputs(5)
    with torch.no_grad():
        ref = m(x)
    a = r(x)
    assert a.shape == (5, 10) and a.dtype == torch.float32
    assert sqnr_db(ref, a) > 80
    # outputs of earlier calls are not overwritten by later ones (planned output memory is reused)
    b = r(_inputs(5, seed=1))
    assert torch.equal(a, r(x)) and not torch.allclose(a, b)
    assert r.manifest is not None and r.manifest["artifact"]["file"] == arts[kind].name


@pytest.mark.parametrize("kind", ["onnx", "executorch"])
def test_runner_rejects_wrong_shape(tiny_artifacts, kind):
    _, arts = tiny_artifacts
    r = load_artifact(arts[kind])
    with pytest.raises(UserError, match=r"takes \[N, 3, 32, 32\]"):
        r(torch.zeros(1, 3, 64, 64))
    with pytest.raises(UserError):
        r(torch.zeros(3, 32, 32))


def test_executorch_threads(tiny_artifacts):
    from executorch.extension.pybindings import portable_lib

    _, arts = tiny_artifacts
    before = portable_lib._threadpool_get_thread_count()
    try:
        assert load_artifact(arts["executorch"], num_threads=1).num_threads == 1
        assert portable_lib._threadpool_get_thread_count() == 1
        assert load_artifact(arts["executorch"], num_threads=2).num_threads == 2
    finally:
        portable_lib._unsafe_reset_threadpool(before)


def test_onnx_threads(tiny_artifacts):
    _, arts = tiny_artifacts
    r = load_artifact(arts["onnx"], num_threads=1)
    assert r.num_threads == 1 and r._sess.get_session_options().intra_op_num_threads == 1


def test_missing_and_unknown(tmp_path):
    with pytest.raises(UserError, match="artifact not found"):
        load_artifact(tmp_path / "x.pte")
    p = tmp_path / "model.tflite"
    p.write_bytes(b"")
    with pytest.raises(UserError, match=r"unknown artifact type .* \(choose from: .pte, .onnx, .mlpackage\)"):
        load_artifact(p)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot load"):
        load_artifact(bad)


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS a .mlpackage does run")
def test_mlpackage_needs_macos(tmp_path):
    pkg = tmp_path / "m.mlpackage"
    pkg.mkdir()
    with pytest.raises(UserError, match="needs macOS"):
        load_artifact(pkg)


@pytest.mark.skipif(sys.platform == "darwin", reason="the Core ML delegate runs on Apple platforms")
def test_coreml_delegate_pte_explains_why_it_cannot_run(tmp_path):
    m = make_tiny_model(32)
    res = export_model(ModelSource("tiny", module=m), ExportConfig("executorch", backend="coreml", verify=False),
                       out_dir=tmp_path)
    with pytest.raises(UserError, match="CoreMLBackend.*does not provide"):
        load_artifact(res.artifact)
