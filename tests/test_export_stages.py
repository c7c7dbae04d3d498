"""The export pipeline stage by stage, as ExecuTorch's XNNPACK tester does (export -> check ops ->
partition -> check delegated -> run -> compare), and the pieces the stages are made of that had no
test of their own: `decompose_for_xnnpack`, the partitioner, `ops_outside_delegate`; plus the
ExportConfig forms and the rule that no stage changes an earlier stage's artifact."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mobilevit_deploy.errors import UserError
from mobilevit_deploy.export import TARGETS, ExportConfig, ModelSource, export_model
from mobilevit_deploy.export.executorch import decompose_for_xnnpack, ops_outside_delegate, partitioners
from mobilevit_deploy.export.stages import LOWERERS, STAGES, ExportPipeline
from mobilevit_deploy.models import DeployCfg
from mobilevit_deploy.verify import sample_batch, sqnr_db

from conftest import make_tiny_model

LN = "aten.layer_norm.default"


def _ops(program) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


def _lower_xnnpack(program):
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(program, partitioner=partitioners("xnnpack"))
    ep = edge.exported_program()
    delegates = sum(1 for n in ep.graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target))
    return ops_outside_delegate(ep), delegates


def test_one_declared_order_and_one_lowerer_per_target():
    assert [s.name for s in STAGES] == ["capture", "quantize", "lower", "compress", "verify", "write"]
    assert set(LOWERERS) == set(TARGETS)


def test_xnnpack_stage_by_stage(tmp_path):
    m = make_tiny_model(32)
    source = ModelSource("tiny", module=m).load()
    logs = []
    with ExportPipeline(source, ExportConfig("executorch"), tmp_path, log=logs.append) as pipe:
        # export -> check ops
        cap = pipe.run("capture")
        assert LN in _ops(cap.program)
        assert [line.split(":")[0] for line in logs] == ["capture"]
        # the LayerNorm rewrite: same maths with ops XNNPACK takes
        dec = decompose_for_xnnpack(cap.program)
        assert LN not in _ops(dec) and "aten.rsqrt.default" in _ops(dec)
        x, _ = sample_batch(m.deploy_cfg, 4)
        with torch.no_grad():  # the program is captured at batch 1
            torch.testing.assert_close(dec.module()(x[:1]), m(x[:1]), rtol=1e-4, atol=1e-4)
        # partition -> check delegated: without the rewrite LayerNorm stays outside and splits the graph
        outside, delegates = _lower_xnnpack(dec)
        outside_raw, delegates_raw = _lower_xnnpack(cap.program)
        assert "aten.native_layer_norm.default" in outside_raw and "aten.native_layer_norm.default" not in outside
        assert delegates <= delegates_raw
        # the stages do the same
        qnt = pipe.run("quantize")
        assert qnt.quantized is None and qnt.program is cap.program and qnt.reference is m
        low = pipe.run("lower")
        assert low.lowered.ops_outside == outside
        assert logs[-1].startswith("lower: ExecuTorch, XNNPACK delegate, fp32; ")
        comp = pipe.run("compress")
        assert comp.staged.is_file() and comp.size_bytes == comp.staged.stat().st_size
        assert not pipe.ctx.final.exists()  # nothing in place before the write stage
        # run -> compare (independently of the verify stage)
        from mobilevit_deploy.runtime import load_artifact

        with torch.no_grad():
            assert sqnr_db(m(x), load_artifact(comp.staged)(x)) > 60
        ver = pipe.run("verify")
        assert ver.verification["passed"] and ver.quantization is None
        out = pipe.run("write")
        staging = pipe._staging
    assert not staging.exists()
    man = json.loads(out.manifest_path.read_text())
    assert out.artifact.is_file() and man["ops_not_delegated"] == list(outside)
    assert man["ops_not_delegated_counts"] == outside
    assert [line.split(":")[0] for line in logs] == ["capture", "lower", "verify", "write"]


def test_decompose_for_xnnpack_leaves_quantized_and_multi_dim_layer_norms_alone():
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

    qd = torch.ops.quantized_decomposed

    class QLN(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.ln = nn.LayerNorm(shape)

        def forward(self, x):
            x = qd.dequantize_per_tensor.default(qd.quantize_per_tensor.default(x, 0.05, 0, -128, 127, torch.int8),
                                                 0.05, 0, -128, 127, torch.int8)
            return self.ln(x)

    class LN2(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm((4, 8))

        def forward(self, x):
            return self.ln(x)

    x = torch.randn(2, 4, 8)
    quantized = torch.export.export(QLN(8).eval(), (x,))
    assert decompose_for_xnnpack(quantized) is quantized
    forced = decompose_for_xnnpack(quantized, quantized_too=True)
    assert LN not in _ops(forced)
    torch.testing.assert_close(forced.module()(x), quantized.module()(x), rtol=1e-4, atol=1e-4)
    two_dims = torch.export.export(LN2().eval(), (x,))
    assert decompose_for_xnnpack(two_dims) is two_dims


def test_partitioners():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    (p,) = partitioners("xnnpack")
    assert isinstance(p, XnnpackPartitioner)
    with pytest.raises(UserError, match="choose from: xnnpack, coreml"):
        partitioners("mps")
    with pytest.raises(UserError, match="not available for executorch/xnnpack"):
        partitioners("xnnpack", "fp16")


def test_ops_not_delegated_reach_the_manifest(tmp_path):
    """An op XNNPACK does not take runs in the portable kernels; the manifest lists it and its count."""

    class WithCumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 2, 1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.conv(x).mean((2, 3), keepdim=True).flatten(1)  # [B, 8]
            return self.fc(torch.cumsum(x, dim=-1))

    torch.manual_seed(0)
    m = WithCumsum().eval()
    m.deploy_cfg = DeployCfg(input_size=(3, 32, 32), crop_pct=1.0, num_classes=10)
    res = export_model(ModelSource("cumsum", module=m), ExportConfig("executorch"), out_dir=tmp_path, log=None)
    man = res.manifest
    assert "aten.cumsum.default" in man["ops_not_delegated"]
    assert man["ops_not_delegated_counts"]["aten.cumsum.default"] == 1
    assert man["verification"]["passed"]


def test_compress_returns_new_values_and_leaves_the_quantize_artifact_alone(tmp_path):
    m = make_tiny_model(32)
    source = ModelSource("tiny", module=m).load()
    config = ExportConfig.from_dict({"target": "coreml", "quant": "palette-mixed", "calib_size": 8})
    with ExportPipeline(source, config, tmp_path, calib=config.quant.calibration_set(), log=None) as pipe:
        qnt = pipe.run("quantize")
        info_before = json.dumps(qnt.quantized.info, sort_keys=True, default=str)
        comp = pipe.run("compress")
        assert json.dumps(qnt.quantized.info, sort_keys=True, default=str) == info_before
        assert "mixed_precision" not in qnt.quantized.info and "mixed_precision" in comp.quant_info
        assert comp.quant_info["calibration"]["images_seen"] == 8
        assert not qnt.reference.ready and comp.reference.ready


def test_export_config_forms(tmp_path):
    from mobilevit_deploy.quantize import Int8StaticConfig, get_config

    c = ExportConfig.from_dict({"target": "executorch", "quant": "int8", "keep_float": "auto:1,stem.*",
                                "calibration": "vit", "calib_size": 8})
    assert c.backend == "xnnpack" and c.precision == "fp32" and c.scheme == "int8"
    assert c.quant == Int8StaticConfig(keep_float=("stem.*",), keep_float_auto=1, calibration="vit", calib_size=8)
    assert ExportConfig.from_dict(c.to_dict()) == c
    nested = {"target": "coreml", "quant": {"scheme": "palette4", "weight_threshold": 4096}}
    assert ExportConfig.from_dict(nested).quant == get_config("coreml", "palette4", weight_threshold=4096)
    assert ExportConfig("coreml", quant=get_config("coreml", "int8")).deployment_target == "iOS17"
    assert ExportConfig("coreml").deployment_target == "iOS16"
    y = tmp_path / "export.yaml"
    y.write_text("target: coreml\nprecision: fp32\nquant:\n  scheme: w8\n")
    assert ExportConfig.from_yaml(y) == ExportConfig("coreml", precision="fp32", quant=get_config("coreml", "w8"))
    with pytest.raises(UserError, match="Int8StaticConfig is a scheme for target executorch, not coreml"):
        ExportConfig("coreml", quant=get_config("executorch", "int8"))
    with pytest.raises(UserError, match="unknown quantization scheme for coreml 'int8-dynamic'"):
        ExportConfig("coreml", quant=get_config("executorch", "int8-dynamic"))
    with pytest.raises(UserError, match="needs its 'scheme'"):
        ExportConfig.from_dict({"target": "coreml", "quant": {"nbits": 4}})
    # a weight-only scheme takes no calibration: those options are ignored
    w8 = ExportConfig.from_dict({"target": "coreml", "quant": "w8", "calib_size": 8})
    assert w8.quant == get_config("coreml", "w8")
