"""Export library: one small model per target (mobilevit_xxs at 64x64), checked independently of the
exporter's own verification; structural checks that must fail on a wrong artifact; bad input."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mobilevit_deploy.checkpoint import file_sha256, save_safetensors
from mobilevit_deploy.errors import CheckpointError, UserError
from mobilevit_deploy.export import ExportConfig, ModelSource, artifact_path, export_model
from mobilevit_deploy.export.manifest import manifest_path_for
from mobilevit_deploy.models import CIFAR10_LABELS, IMAGENET_MEAN, IMAGENET_STD
from mobilevit_deploy.verify import max_abs_diff, sample_batch, sqnr_db, top1_agreement

from conftest import make_tiny_model

# Ops the XNNPACK delegate (executorch 1.5.1) leaves to the portable kernels for these models.
XNNPACK_ALLOWED_OUTSIDE = {"aten.native_layer_norm.default", "aten.expand_copy.default", "aten.squeeze_copy.dims"}
CONTRACT_KEYS = {"schema_version", "model", "target", "backend", "precision", "quantization", "input", "output",
                 "labels",
                 "checkpoint", "artifact", "verification", "ops_not_delegated", "tools", "created"}


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def _check_manifest_common(res, target, backend, precision):
    m = json.loads(res.manifest_path.read_text())
    assert res.manifest_path == manifest_path_for(res.artifact)
    assert CONTRACT_KEYS <= set(m)
    assert m["schema_version"] == 1 and m["target"] == target and m["backend"] == backend
    assert m["precision"] == precision and m["quantization"] is None
    assert m["artifact"]["file"] == res.artifact.name
    assert m["artifact"]["sha256"] == file_sha256(res.artifact)
    size = sum(f.stat().st_size for f in res.artifact.rglob("*") if f.is_file()) if res.artifact.is_dir() \
        else res.artifact.stat().st_size
    assert m["artifact"]["size_bytes"] == size
    assert m["labels"] == list(CIFAR10_LABELS)
    assert m["input"]["shape"] == [1, 3, 64, 64] and m["input"]["layout"] == "NCHW"
    assert m["tools"]["torch"] == torch.__version__
    assert m["created"].endswith("Z")
    assert {"capture", "lower", "verify", "write", "total"} <= set(m["timings_s"])
    # no staging leftovers beside the artifact
    assert not [p for p in res.artifact.parent.iterdir() if p.name.startswith(".")]
    return m


# ---------------------------------------------------------------------------------------------- metrics

def test_sqnr_known_values():
    ref = torch.ones(100, dtype=torch.float64)
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0, abs=1e-9)  # signal 100, noise 100 * 0.01
    assert sqnr_db(ref, ref * 1.001) == pytest.approx(60.0, abs=1e-6)
    assert sqnr_db(ref, ref) == math.inf
    assert max_abs_diff(ref, ref - torch.linspace(0, 0.5, 100)) == pytest.approx(0.5)
    a = torch.tensor([[3.0, 1.0], [0.0, 2.0], [5.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 1.0], [3.0, 2.0], [4.0, 5.0], [1.0, 0.0]])
    assert top1_agreement(a, b) == 0.5
    with pytest.raises(ValueError):
        sqnr_db(torch.ones(3), torch.ones(4))


def test_sample_batch_is_real_preprocessed_images(xxs_small):
    x, names = sample_batch(xxs_small.deploy_cfg, 8)
    assert x.shape == (8, 3, 64, 64) and len(set(names)) == 8
    assert len({n.rsplit("_", 1)[0] for n in names}) == 8  # spread over 8 classes
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05  # MobileViT: RGB in [0, 1], not noise-free


def test_artifact_names():
    assert artifact_path("a", "m", "coreml") == Path("a/m.mlpackage")
    assert artifact_path("a", "m", "executorch") == Path("a/m.pte")
    assert artifact_path("a", "m", "executorch", "coreml") == Path("a/m_coreml.pte")
    assert artifact_path("a", "m", "onnx", quant="int8") == Path("a/m_int8.onnx")
    assert manifest_path_for("a/m.mlpackage") == Path("a/m.mlpackage.json")


# ------------------------------------------------------------------------- one export per target (64x64)

@pytest.fixture(scope="module")
def exports(tmp_path_factory, xxs_small):
    """mobilevit_xxs at 64x64 exported once to each target (shared by the tests below)."""
    out = tmp_path_factory.mktemp("artifacts")
    cache = {}

    def get(target):
        if target not in cache:
            cache[target] = export_model(ModelSource("mobilevit_xxs", module=xxs_small), ExportConfig(target),
                                         out_dir=out)
        return cache[target]

    return get


def test_executorch_xnnpack(exports, xxs_small):
    from mobilevit_deploy.export.executorch import inspect_pte
    from mobilevit_deploy.runtime import load_artifact

    res = exports("executorch")
    assert res.artifact.name == "mobilevit_xxs.pte"
    m = _check_manifest_common(res, "executorch", "xnnpack", "fp32")
    assert m["input"]["kind"] == "tensor" and m["output"] == {"name": "logits", "shape": [1, 10], "kind": "logits"}
    # fully delegated except a small listed set
    assert set(m["ops_not_delegated"]) <= XNNPACK_ALLOWED_OUTSIDE, m["ops_not_delegated"]
    info = inspect_pte(res.artifact)
    assert "XnnpackBackend" in info["delegates"]
    assert len(info["operators"]) <= len(XNNPACK_ALLOWED_OUTSIDE)
    v = m["verification"]
    assert v["method"] == "executorch runtime" and v["images"] == 8 and v["passed"]
    assert v["sqnr_db"] > 60 and v["top1_agreement"] == 1.0
    # independent check on all 40 shipped images, batch > 1 through the runner
    x, _ = sample_batch(xxs_small.deploy_cfg, 40)
    ref, got = _eager(xxs_small, x), load_artifact(res.artifact)(x)
    assert got.shape == ref.shape == (40, 10)
    assert sqnr_db(ref, got) > 60 and top1_agreement(ref, got) == 1.0


def test_onnx(exports, xxs_small):
    import onnx
    import onnxruntime as ort

    res = exports("onnx")
    assert res.artifact.name == "mobilevit_xxs.onnx"
    m = _check_manifest_common(res, "onnx", "onnxruntime", "fp32")
    assert m["ops_not_delegated"] == [] and m["onnx"]["simplified"]
    proto = onnx.load(str(res.artifact))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["logits"]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert m["onnx"]["nodes"] <= m["onnx"]["nodes_exported"]
    v = m["verification"]
    assert v["method"] == "onnxruntime" and v["passed"] and v["sqnr_db"] > 60 and v["top1_agreement"] == 1.0
    sess = ort.InferenceSession(str(res.artifact), providers=["CPUExecutionProvider"])
    x, _ = sample_batch(xxs_small.deploy_cfg, 40)
    got = torch.cat([torch.from_numpy(sess.run(["logits"], {"image": x[i:i + 1].numpy()})[0]) for i in range(40)])
    ref = _eager(xxs_small, x)
    assert sqnr_db(ref, got) > 60 and top1_agreement(ref, got) == 1.0


def _coreml_spec(path):
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def test_coreml_spec(exports):
    from coremltools.proto import MIL_pb2

    res = exports("coreml")
    assert res.artifact.name == "mobilevit_xxs.mlpackage" and res.artifact.is_dir()
    m = _check_manifest_common(res, "coreml", "mlprogram", "fp16")
    assert m["input"]["kind"] == "image" and m["input"]["scale"] == pytest.approx(1 / 255)
    assert m["input"]["bias"] == [0, 0, 0]
    assert "channel_scale_in_graph" not in m["input"]  # MobileViT's std is uniform: exact without it
    assert m["output"]["name"] == "classLabel_probs" and m["output"]["kind"] == "probabilities"
    assert m["minimum_deployment_target"] == "iOS16"
    v = m["verification"]
    assert v["passed"] and all(v["checks"].values()) and len(v["checks"]) >= 8
    # read the spec directly (not through the exporter's own checker)
    spec = _coreml_spec(res.artifact)
    assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion == 7  # iOS16
    (inp,) = spec.description.input
    assert inp.name == "image" and inp.type.WhichOneof("Type") == "imageType"
    assert (inp.type.imageType.width, inp.type.imageType.height) == (64, 64)
    assert {o.name for o in spec.description.output} == {"classLabel", "classLabel_probs"}
    ops = spec.mlProgram.functions["main"].block_specializations["CoreML6"].operations
    types = [op.type for op in ops]
    (classify,) = [op for op in ops if op.type == "classify"]
    labels = [i.immediateValue.tensor.strings.values[0]
              for i in classify.inputs["classes"].arguments[0].value.immediateValue.list.values]
    assert labels == list(CIFAR10_LABELS)
    assert "softmax" in types and "conv" in types and ("matmul" in types or "linear" in types)
    fp16 = MIL_pb2.DataType.Value("FLOAT16")
    assert any(o.type.tensorType.dataType == fp16 for op in ops if op.type == "conv" for o in op.outputs)
    assert spec.description.metadata.shortDescription.startswith("mobilevit_xxs")


# ------------------------------------------------------------ Core ML checks that must be able to fail

@pytest.fixture(scope="module")
def tiny_coreml_fp32(tmp_path_factory):
    m = make_tiny_model(32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    res = export_model(ModelSource("tiny", module=m), ExportConfig("coreml", precision="fp32"),
                       out_dir=tmp_path_factory.mktemp("cm"))
    return m, res


def test_coreml_checks_detect_wrong_artifact(tiny_coreml_fp32):
    from mobilevit_deploy.export.coreml import spec_checks

    m, res = tiny_coreml_fp32
    cfg = m.deploy_cfg
    assert res.manifest["precision"] == "fp32" and res.manifest["verification"]["passed"]
    assert res.manifest["verification"]["fp16_ops"] == 0
    assert not spec_checks(res.artifact, cfg, precision="fp16")["checks"]["precision"]
    wrong = cfg.with_classes(10, [f"c{i}" for i in range(10)])
    assert not spec_checks(res.artifact, wrong)["checks"]["labels"]
    assert not spec_checks(res.artifact, replace(cfg, input_size=(3, 48, 48)))["checks"]["input_size"]
    assert not spec_checks(res.artifact, replace(cfg, mean=(0.0, 0.0, 0.0)))["checks"]["image_scale_bias"]
    assert not spec_checks(res.artifact, cfg, minimum_deployment_target="iOS17")["checks"]["deployment_target"]


def test_coreml_nonuniform_std_is_exact(tiny_coreml_fp32):
    """ImageNet std: one scalar ImageType scale + the in-graph channel scale == the exact normalisation."""
    from mobilevit_deploy.export.capture import CoreMLClassifier, channel_scale

    m, res = tiny_coreml_fp32
    cfg = m.deploy_cfg
    inp = res.manifest["input"]
    assert inp["channel_scale_in_graph"] == pytest.approx(channel_scale(cfg))
    scale, bias = inp["scale"], inp["bias"]
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), generator=g).float()
    y = pixels * scale + torch.tensor(bias).view(1, 3, 1, 1)  # what Core ML's ImageType computes
    exact = (pixels / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        got = CoreMLClassifier(m, cfg)(y)
        want = torch.softmax(m(exact), -1)
    assert torch.allclose(got, want, atol=1e-5)
    assert channel_scale(replace(cfg, std=(0.5, 0.5, 0.5))) is None


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS (no Core ML runtime on Linux)")
def test_coreml_predict_matches_eager_macos(exports, xxs_small):
    from mobilevit_deploy.export.coreml import load_for_predict, predict_probs

    res = exports("coreml")
    v = res.manifest["verification"]
    assert v["method"] == "coreml predict (macOS)" and v["images"] == 8 and v["passed"]
    x, _ = sample_batch(xxs_small.deploy_cfg, 8)
    probs = predict_probs(load_for_predict(res.artifact), x, xxs_small.deploy_cfg)
    ref = torch.softmax(_eager(xxs_small, x), -1)
    assert sqnr_db(ref, probs) > 20 and top1_agreement(ref, probs) >= 0.875


# ------------------------------------------------------------------- ExecuTorch Core ML delegate (.pte)

def test_executorch_coreml_delegate_structural(tmp_path):
    m = make_tiny_model(32)
    res = export_model(ModelSource("tiny", module=m), ExportConfig("executorch", backend="coreml"), out_dir=tmp_path)
    assert res.artifact.name == "tiny_coreml.pte"
    man = json.loads(res.manifest_path.read_text())
    assert man["backend"] == "coreml" and man["precision"] == "fp16" and man["ops_not_delegated"] == []
    v = man["verification"]
    assert v["method"].startswith("structural only") and "Core ML runtime" in v["method"]
    assert v["sqnr_db"] is None and v["passed"] and v["delegates"] == ["CoreMLBackend"]
    assert v["checks"]["delegate_payload_is_ml_program"] and v["checks"]["precision"]


@pytest.mark.slow
def test_executorch_coreml_delegate_mobilevit(tmp_path, xxs_small):
    res = export_model(ModelSource("mobilevit_xxs", module=xxs_small), ExportConfig("executorch", backend="coreml"),
                       out_dir=tmp_path)
    v = res.manifest["verification"]
    assert v["passed"] and all(v["checks"].values()) and res.manifest["ops_not_delegated"] == []


# ----------------------------------------------------------------------------------------- bad input

def _no_artifacts(d: Path):
    return not d.exists() or not list(d.iterdir())


def test_unknown_target_and_backend_and_quant(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"unknown target 'tflite' \(choose from: coreml, executorch, onnx\)"):
        export_model("mobilevit_xxs", ExportConfig("tflite"), out_dir=out)
    with pytest.raises(UserError, match="choose from: xnnpack, coreml"):
        export_model("mobilevit_xxs", ExportConfig("executorch", backend="mps"), out_dir=out)
    with pytest.raises(UserError, match=r"(?i)quantiz|scheme"):  # no such scheme (or none wired for onnx)
        export_model("mobilevit_xxs", {"target": "onnx", "quant": "int3-made-up"}, out_dir=out)
    with pytest.raises(UserError, match="need a quantization scheme"):
        export_model("mobilevit_xxs", {"target": "onnx", "calib_size": 8}, out_dir=out)
    with pytest.raises(UserError, match="choose from: fp32"):
        export_model("mobilevit_xxs", ExportConfig("onnx", precision="fp16"), out_dir=out)
    with pytest.raises(UserError, match="unknown export config key"):
        export_model("mobilevit_xxs", {"target": "onnx", "quantize": "int8"}, out_dir=out)
    assert not out.exists()


def test_unknown_model_lists_choices(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"unknown model 'mobilevit_xxxl' \(choose from: .*mobilevit_xxs"):
        export_model("mobilevit_xxxl", ExportConfig("onnx"), out_dir=out)
    assert not out.exists()  # the directory it created is removed again


def test_missing_checkpoint(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        export_model(ModelSource("mobilevit_xxs", tmp_path / "nope.safetensors"), ExportConfig("onnx"), out_dir=out)
    assert _no_artifacts(out)


def test_mismatched_checkpoint(tmp_path):
    from mobilevit_deploy.models import create_model

    ck = tmp_path / "xs.safetensors"
    save_safetensors(create_model("mobilevit_xs", num_classes=10).state_dict(), ck)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not match"):
        export_model(ModelSource("mobilevit_xxs", ck, num_classes=10), ExportConfig("onnx"), out_dir=out)
    assert _no_artifacts(out)
    # right architecture, wrong number of classes: the error suggests --num-classes
    ck10 = tmp_path / "xxs10.safetensors"
    save_safetensors(create_model("mobilevit_xxs", num_classes=10).state_dict(), ck10)
    with pytest.raises(CheckpointError, match="--num-classes"):
        export_model(ModelSource("mobilevit_xxs", ck10), ExportConfig("onnx"), out_dir=out)
    assert _no_artifacts(out)


def test_unwritable_out(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        export_model("mobilevit_xxs", ExportConfig("onnx"), out_dir=f)
    with pytest.raises(UserError, match="not writable"):
        export_model("mobilevit_xxs", ExportConfig("onnx"), out_dir=f / "sub")


def test_failure_midway_leaves_nothing_and_keeps_old_artifact(tmp_path, monkeypatch):
    import mobilevit_deploy.verify as verify_mod

    m = make_tiny_model(32)
    out = tmp_path / "out"
    good = export_model(ModelSource("tiny", module=m), ExportConfig("onnx"), out_dir=out)
    before = (file_sha256(good.artifact), good.manifest_path.read_text())

    def boom(*a, **k):
        raise RuntimeError("simulated failure in verify")

    monkeypatch.setattr(verify_mod, "verify_artifact", boom)
    m2 = make_tiny_model(32, seed=1)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model(ModelSource("tiny", module=m2), ExportConfig("onnx"), out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["tiny.onnx", "tiny.onnx.json"]  # no staging dir left
    assert (file_sha256(good.artifact), good.manifest_path.read_text()) == before
    # a fresh directory is not left behind either
    with pytest.raises(RuntimeError, match="simulated"):
        export_model(ModelSource("tiny", module=m2), ExportConfig("onnx"), out_dir=tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_module_checkpoint_hash_and_untrained_flag(tmp_path):
    m = make_tiny_model(32)
    res = export_model(ModelSource("tiny", module=m), ExportConfig("onnx", verify=False), out_dir=tmp_path)
    ck = res.manifest["checkpoint"]
    assert ck["path"] is None and len(ck["sha256"]) == 64 and res.manifest["verification"] is None
    res2 = export_model(ModelSource("tiny", module=make_tiny_model(32, seed=3)), ExportConfig("onnx", verify=False),
                        out_dir=tmp_path)
    assert res2.manifest["checkpoint"]["sha256"] != ck["sha256"]


# -------------------------------------------------------------------------------- bigger: slow only

@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s", "cmt_ti"])
@pytest.mark.parametrize("target", ["executorch", "onnx", "coreml"])
def test_every_model_default_size(tmp_path, name, target):
    from mobilevit_deploy.models import create_model

    torch.manual_seed(0)
    m = create_model(name, num_classes=10, labels=CIFAR10_LABELS)
    res = export_model(ModelSource(name, module=m), ExportConfig(target), out_dir=tmp_path)
    v = res.manifest["verification"]
    assert v["passed"], v
    if target != "coreml":
        assert v["sqnr_db"] > 40 and v["top1_agreement"] >= 0.875
    if target == "executorch":
        assert set(res.manifest["ops_not_delegated"]) <= XNNPACK_ALLOWED_OUTSIDE
