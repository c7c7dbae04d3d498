"""`--calibration vit` (ViT-aware PTQ, quantize/vit_ptq.py) and `--quant palette-mixed
--weight-bits-budget B` (per-layer Core ML palettes, quantize/mixed_precision.py) through the export
command: validation before anything is written, and one end-to-end export of each on a small model.

Calibration uses real images only (a few of the shipped samples, `calib_size=`), which keeps the
end-to-end exports well under a minute each on 2 cores.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mobilevit_deploy.errors import UserError
from mobilevit_deploy.quantize import (
    CoreMLInt8Config,
    CoreMLMixedPaletteConfig,
    Int8StaticConfig,
    get_config,
    list_schemes,
    load_calibration,
    quantize_model,
    schemes_accepting,
)
from mobilevit_deploy.verify import sample_batch, sqnr_db

from conftest import make_tiny_model
from test_quantize import make_small_model

REPO = Path(__file__).resolve().parents[1]


def _run_module(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mobilevit_deploy.export", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _act_scales(converted) -> dict:
    """Scale of every activation quantize node of a converted pt2e graph, keyed by the node it quantizes."""
    out = {}
    for n in converted.graph.nodes:
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target):
            out[n.args[0].name] = float(n.args[1])
    return out


# ---------------------------------------------------------------------------------------------- configs

def test_configs_calibration_and_budget_fields():
    assert Int8StaticConfig().calibration == "minmax" and CoreMLInt8Config().calibration == "minmax"
    assert get_config("executorch", "int8", calibration="vit").calibration == "vit"
    assert get_config("coreml", "int8", calibration="vit").to_dict()["calibration"] == "vit"
    for ctor in (Int8StaticConfig, CoreMLInt8Config):
        with pytest.raises(UserError, match=r"unknown calibration method 'histogram' \(choose from: minmax, vit\)"):
            ctor(calibration="histogram")
    assert "palette-mixed" in list_schemes("coreml")
    c = get_config("coreml", "palette-mixed", budget_avg_bits=5)
    assert c == CoreMLMixedPaletteConfig(budget_avg_bits=5.0) and c.scheme == "palette-mixed" and c.calibrated
    assert isinstance(c.budget_avg_bits, float) and c.choices == (4, 6, 8)
    assert CoreMLMixedPaletteConfig(choices=(8, 4)).choices == (4, 8)
    assert schemes_accepting("calibration") == ["executorch int8", "executorch int8-latency", "coreml int8"]
    assert schemes_accepting("budget_avg_bits") == ["coreml palette-mixed"]
    for bad, msg in [(dict(budget_avg_bits=3.5), "below the smallest bit width"),
                     (dict(budget_avg_bits=8.5), "above the largest bit width"),
                     (dict(budget_avg_bits=float("nan")), "must be a number"),
                     (dict(budget_avg_bits=True), "must be a number"),
                     (dict(choices=(4, 5)), "choices must be distinct bit widths"),
                     (dict(choices=(4, 4)), "choices must be distinct bit widths"),
                     (dict(weight_threshold=-1), "weight_threshold"),
                     (dict(sensitivity_images=0), "sensitivity_images")]:
        with pytest.raises(UserError, match=msg):
            CoreMLMixedPaletteConfig(**bad)
    with pytest.raises(UserError, match=r"--calibration does not apply to executorch int8-dynamic \(it applies to: "
                                        r"executorch int8, executorch int8-latency, coreml int8\)"):
        get_config("executorch", "int8-dynamic", calibration="vit")
    with pytest.raises(UserError, match=r"--weight-bits-budget does not apply to coreml palette6 \(it applies to: "
                                        r"coreml palette-mixed\)"):
        get_config("coreml", "palette6", budget_avg_bits=6.0)


# ---------------------------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("args, msg", [
    (["--target", "executorch", "--quant", "int8", "--calibration", "histogram"],
     "unknown calibration method 'histogram' (choose from: minmax, vit)"),
    (["--target", "coreml", "--quant", "int8", "--calibration", "VIT"], "unknown calibration method 'VIT'"),
    (["--target", "coreml", "--quant", "w8", "--calibration", "vit"],
     "--calibration does not apply to coreml w8 (it applies to: executorch int8, executorch int8-latency, "
     "coreml int8)"),
    (["--target", "executorch", "--quant", "int8-dynamic", "--calibration", "vit"],
     "--calibration does not apply to executorch int8-dynamic"),
    (["--target", "executorch", "--calibration", "vit"],
     "--calibration needs --quant (it applies to: executorch int8, executorch int8-latency, coreml int8)"),
    (["--target", "coreml", "--quant", "palette6", "--weight-bits-budget", "6"],
     "--weight-bits-budget does not apply to coreml palette6 (it applies to: coreml palette-mixed)"),
    (["--target", "coreml", "--quant", "int8", "--weight-bits-budget", "6"],
     "--weight-bits-budget does not apply to coreml int8"),
    (["--target", "coreml", "--weight-bits-budget", "6"], "--weight-bits-budget needs --quant"),
    (["--target", "coreml", "--quant", "palette-mixed", "--weight-bits-budget", "3"],
     "--weight-bits-budget 3 is below the smallest bit width offered (4, 6, 8)"),
    (["--target", "coreml", "--quant", "palette-mixed", "--weight-bits-budget", "six"],
     "argument --weight-bits-budget: invalid float value: 'six'"),
    (["--target", "coreml", "--quant", "palette-mixed", "--calibration", "vit"],
     "--calibration does not apply to coreml palette-mixed"),
])
def test_cli_refuses_bad_calibration_and_budget(tmp_path, args, msg):
    out = tmp_path / "out"
    r = _run_module(*args, "--out", str(out))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.stderr
    assert not out.exists()


def test_cli_refusal_leaves_existing_out_dir_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = _run_module("--target", "executorch", "--quant", "int8", "--calibration", "nope", "--out", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error: unknown calibration method")
    assert list(out.iterdir()) == []


def test_palette_mixed_default_budget_is_logged():
    from mobilevit_deploy.export.__main__ import build_parser, config_from_args

    for budget, said in ((None, True), (5.0, False)):
        logs = []
        argv = ["--target", "coreml", "--quant", "palette-mixed"] + ([] if budget is None else
                                                                     ["--weight-bits-budget", str(budget)])
        cfg = config_from_args(build_parser().parse_args(argv), log=logs.append)
        assert cfg.quant.budget_avg_bits == (6.0 if budget is None else budget)
        default_said = any("no --weight-bits-budget given; using the default 6.0 average weight bits" in line
                           for line in logs)
        assert default_said == said, logs


# ---------------------------------------------------------------------------------------------- end to end

def _spy_quantize_model(monkeypatch) -> list:
    """Record every QuantizedModel the export builds (its Quantize stage -> quantize.quantize_model)."""
    import mobilevit_deploy.quantize as quantize

    made = []
    real = quantize.quantize_model

    def spy(*a, **kw):
        q = real(*a, **kw)
        made.append(q)
        return q

    monkeypatch.setattr(quantize, "quantize_model", spy)
    return made


def test_export_executorch_int8_vit_end_to_end(tmp_path, monkeypatch):
    """export_model(..., quant="int8", calibration="vit") with a layer kept in float: the manifest says vit,
    the .pte runs and verifies against the converted graph, and the searched scales are in that graph
    (compared with the min/max conversion of the very same observation pass)."""
    import copy

    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    import mobilevit_deploy.quantize.pt2e as pt2e
    from mobilevit_deploy.export import ModelSource, export_model
    from mobilevit_deploy.runtime import load_artifact

    model = make_tiny_model()
    made = _spy_quantize_model(monkeypatch)
    observed = {}
    real_vit = pt2e.vit_calibration

    def vit_spy(prepared, **kw):  # the minmax conversion of this exact observation pass, then the search
        observed["minmax"] = move_exported_model_to_eval(convert_pt2e(copy.deepcopy(prepared)))
        observed["calib_paths"] = kw["calib"].paths
        return real_vit(prepared, **kw)

    monkeypatch.setattr(pt2e, "vit_calibration", vit_spy)
    logs = []
    config = {"target": "executorch", "quant": "int8", "calibration": "vit", "keep_float": "proj", "calib_size": 8}
    res = export_model(ModelSource("tiny", module=model), config, out_dir=tmp_path / "a", log=logs.append)
    assert res.artifact.name == "tiny_int8.pte" and res.artifact.is_file()
    man = json.loads(res.manifest_path.read_text())
    qb = man["quantization"]
    assert qb["calibration_method"] == "vit" and qb["config"]["calibration"] == "vit"
    assert "ViT-aware PTQ" in qb["method"]
    vit = qb["vit_ptq"]
    assert vit["layers_searched"] >= 3 and vit["observers_replaced"] > 0 and vit["seconds"] > 0
    assert vit["search_images"] == 8 == qb["calibration"]["images_seen"]  # the same 8 real images
    assert vit["config"]["alpha_range"] == [0.5, 1.2] and len(json.dumps(vit)) < 4000
    assert vit["objective"]["mean_vit"] >= vit["objective"]["mean_observer"] - 1e-9
    assert qb["keep_float"]["units"] == ["proj"]
    assert any(line.startswith("quantize: vit-ptq searched") for line in logs), logs
    # the search ran on the calibration images (the shipped samples), not on random tensors
    assert observed["calib_paths"] == load_calibration(None, 8).paths
    # the .pte runs and matches its own converted graph (verification), and is close to fp32
    assert man["verification"]["passed"] and man["verification"]["method"] == "executorch runtime"
    assert man["verification"]["sqnr_db"] >= man["verification"]["min_sqnr_db"]
    x, _ = sample_batch(model.deploy_cfg, 8)
    (q,) = made
    got = load_artifact(res.artifact)(x)
    with torch.no_grad():
        want = q.module(x)
    assert got.shape == (8, 10) and torch.isfinite(got).all()
    assert sqnr_db(want, got) >= 20.0
    assert qb["accuracy"]["sqnr_db"] > 20.0
    # proj stayed float: its weight is not dequantized
    proj = next(n for n in q.module.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
                and "proj" in str(list((n.meta.get("nn_module_stack") or {}).values())[-1][0]))
    assert "dequantize" not in str(getattr(proj.args[1], "target", ""))
    # the searched scales reached the converted graph: some activation scale differs from min/max
    vit_s, mm_s = _act_scales(q.module), _act_scales(observed["minmax"])
    common = set(vit_s) & set(mm_s)
    assert len(common) >= 3
    changed = [k for k in common if not math.isclose(vit_s[k], mm_s[k], rel_tol=1e-6)]
    assert changed, (vit_s, mm_s)


def test_vit_with_auto_keep_float(monkeypatch):
    """keep_float_auto (sensitivity ranking with the quantizer's observers) + vit on the remaining layers."""
    model = make_tiny_model()
    calib = load_calibration(None, 8)
    q = quantize_model(model, get_config("executorch", "int8", calibration="vit", keep_float="auto:1"),
                       deploy_cfg=model.deploy_cfg, calib=calib, progress=False)
    kf = q.info["keep_float"]
    assert kf["auto"] == 1 and len(kf["auto_units"]) == 1 and kf["units"] == kf["auto_units"]
    assert q.info["calibration_method"] == "vit" and q.info["vit_ptq"]["layers_searched"] >= 1
    x, _ = sample_batch(model.deploy_cfg, 8)
    with torch.no_grad():
        assert sqnr_db(model(x), q.module(x)) > 20.0


def _lut_sizes(mlpackage) -> list[int]:
    """LUT entries of every constexpr_lut_to_dense op in a saved .mlpackage's spec."""
    import coremltools as ct

    spec = ct.models.MLModel(str(mlpackage), skip_model_load=True).get_spec()
    fn = spec.mlProgram.functions["main"]
    return [int(op.attributes["lut"].type.tensorType.dimensions[0].constant.size)
            for op in fn.block_specializations[fn.opset].operations if op.type == "constexpr_lut_to_dense"]


def test_export_coreml_palette_mixed_end_to_end(tmp_path, monkeypatch):
    from mobilevit_deploy.export import ExportConfig, ModelSource, export_model
    from mobilevit_deploy.export.coreml import spec_checks

    model = make_small_model()
    made = _spy_quantize_model(monkeypatch)
    budget = 5.0
    config = {"target": "coreml", "quant": "palette-mixed", "weight_bits_budget": budget, "calib_size": 16}
    res = export_model(ModelSource("small", module=model), config, out_dir=tmp_path / "mixed", log=None)
    fp16 = export_model(ModelSource("small", module=model), ExportConfig("coreml"), out_dir=tmp_path / "fp16", log=None)
    assert res.artifact.name == "small_palette-mixed.mlpackage" and res.artifact.is_dir()
    man = json.loads(res.manifest_path.read_text())
    qb = man["quantization"]
    mp = qb["mixed_precision"]
    assert qb["scheme"] == "palette-mixed" and qb["config"]["budget_avg_bits"] == budget
    assert man["artifact"]["size_bytes"] < fp16.manifest["artifact"]["size_bytes"] * 0.6
    assert mp["avg_bits"] <= budget + 1e-3 and mp["avg_bits_artifact"] == pytest.approx(mp["avg_bits"], abs=1e-3)
    assert len(mp["histogram"]) >= 2 and set(mp["histogram"]) <= {"4", "6", "8"}  # really mixed at 5 bits
    assert mp["sensitivity_images"] == 16 == qb["calibration"]["images_seen"]
    # the saved spec: palettized weights with the plan's LUT sizes
    assert man["verification"]["passed"]
    spec = spec_checks(res.artifact, model.deploy_cfg, minimum_deployment_target="iOS16")
    assert all(spec["checks"].values()), spec["checks"]
    assert spec["op_types"].get("constexpr_lut_to_dense", 0) == mp["layers"] > 1
    luts = _lut_sizes(res.artifact)
    hist = {}
    for n in luts:
        hist[str(int(math.log2(n)))] = hist.get(str(int(math.log2(n))), 0) + 1
    assert hist == mp["histogram"]
    # the torch side holds the artifact's weights (read back), and the manifest's accuracy is from it
    assert "read back from the palettized Core ML program" in qb["torch_side"]
    assert qb["torch_side_weights"]["weights_read_back"] >= mp["layers"]
    # the compress stage returned a new reference: the QuantizedModel it came from is unchanged
    (q,) = made
    assert res.reference.ready and not q.reference.ready and res.reference is not q.reference
    x, _ = sample_batch(model.deploy_cfg, 40)
    with torch.no_grad():
        s = sqnr_db(model(x), res.reference(x))
    assert s == pytest.approx(qb["accuracy"]["sqnr_db"], abs=1e-6) and 20.0 < s < 200
    assert qb["accuracy"]["top1_agreement"] >= 0.9


def test_palette_mixed_reference_refuses_to_run_before_compression():
    model = make_small_model()
    q = quantize_model(model, get_config("coreml", "palette-mixed"), deploy_cfg=model.deploy_cfg,
                       calib=load_calibration(None, 8), progress=False)
    assert q.compress_mlmodel is not None and q.info["calibration"]["images"] == 8
    with pytest.raises(RuntimeError, match="run compress_mlmodel first"):
        q.reference(torch.zeros(1, 3, 32, 32))


# one scheme per code path: Core ML read-back reference, Core ML compress/decompress reference,
# pt2e W8A8 with the vit search, torchao quantize_
@pytest.mark.parametrize("target,scheme", [("coreml", "palette-mixed"), ("coreml", "w8"), ("executorch", "int8"),
                                           ("executorch", "int8-dynamic")])
def test_export_leaves_the_callers_model_unchanged(tmp_path, target, scheme):
    """A quantized export must not write into the fp32 model it was given (an exported graph shares
    the module's parameters: palette-mixed once read its palettized weights back into them, so the
    caller's model -- and the manifest's fp32 comparison -- silently became the palettized one)."""
    from mobilevit_deploy.export import ModelSource, export_model

    model = make_small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = {"calibration": "vit"} if scheme == "int8" else {}
    config = {"target": target, "quant": scheme, "calib_size": 8, **extra}
    res = export_model(ModelSource("small", module=model), config, out_dir=tmp_path, log=None)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [], f"{target} {scheme} changed the caller's model: {changed[:5]}"
    for ref in (res.quantized.reference, res.reference):  # and no reference is the model
        assert all(p.data_ptr() != q.data_ptr() for p in model.parameters() for q in ref.parameters())
