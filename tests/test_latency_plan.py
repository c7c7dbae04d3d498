"""`int8-latency`: the per-layer int8 plan chosen by measured latency (quantize/latency_plan.py).

The fast tests replace the ExecuTorch timing by a fixed table (`measure=` / `measure_layers`), so they
check what the plan does with timings: which layers it keeps in fp32, that layers of one shape are
timed once, the cache, and that the quantized graph really keeps those layers in float. The @slow test
lowers and times real layers.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mobilevit_deploy.errors import UserError
from mobilevit_deploy.quantize import get_config, load_calibration, quantize_model
from mobilevit_deploy.quantize.latency_plan import CACHE, layer_inputs, layer_kind, plan_int8, signature
from mobilevit_deploy.quantize.pt2e import module_path

from test_quantize import make_small_model


class ConvNet(nn.Module):
    """Two MV2-like blocks of the same shapes (so shapes repeat) and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 32, 1), nn.SiLU(), nn.Conv2d(32, 32, 3, 1, 1, groups=32), nn.SiLU(),
                          nn.Conv2d(32, 16, 1)) for _ in range(2))
        self.head = nn.Linear(16, 10)
        self.unused = nn.Linear(16, 16)  # never called by forward: not planned

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x.mean((2, 3)))


def _fake(table):
    calls = []

    def measure(items):
        calls.append(sorted(items))
        return {s: table[s.split("|")[0]] for s in items}

    return measure, calls


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEVIT_DEPLOY_CACHE", str(tmp_path))
    return tmp_path


def test_kinds_signatures_and_real_inputs():
    m = ConvNet().eval()
    units = ["stem", "blocks.0.0", "blocks.0.2", "blocks.0.4", "blocks.1.0", "blocks.1.2", "blocks.1.4", "head",
             "unused"]
    assert [layer_kind(m.get_submodule(u)) for u in units] == ["conv", "conv1x1", "conv_dw", "conv1x1", "conv1x1",
                                                              "conv_dw", "conv1x1", "linear", "linear"]
    x = torch.rand(1, 3, 32, 32)
    inputs = layer_inputs(m, units, x)
    assert "unused" not in inputs and inputs["stem"].shape == (1, 3, 32, 32)
    assert inputs["blocks.0.2"].shape == (1, 32, 16, 16) and inputs["head"].shape == (1, 16)
    assert torch.equal(inputs["stem"], x)
    # same shapes -> same signature; the depthwise conv's groups are in it
    assert signature(m.blocks[0][0], inputs["blocks.0.0"]) == signature(m.blocks[1][0], inputs["blocks.1.0"])
    assert "groups=32" in signature(m.blocks[0][2], inputs["blocks.0.2"])


def test_plan_keeps_slower_layers_in_fp32_and_times_each_shape_once(cache_dir):
    m = ConvNet().eval()
    units = ["stem", "blocks.0.0", "blocks.0.2", "blocks.0.4", "blocks.1.0", "blocks.1.2", "blocks.1.4", "head",
             "unused", "blocks.0", "no.such.module"]  # a container or unknown unit is not planned
    table = {"conv": (1.0, 0.4), "conv1x1": (1.0, 0.5), "conv_dw": (0.3, 0.45), "linear": (0.1, 0.099)}
    measure, calls = _fake(table)
    x = torch.rand(1, 3, 32, 32)
    plan = plan_int8(m, units, None, x, threads=1, margin=0.0, measure=measure)
    assert len(calls) == 1 and len(calls[0]) == 5  # stem, 2 distinct 1x1 convs, the dw conv, the head
    assert plan.keep_float() == ["blocks.0.2", "blocks.1.2"]
    assert plan.measured == 5 and plan.input_size == (32, 32)
    s = plan.summary()
    assert s["layers_int8"] == 6 and s["layers_fp32"] == 2
    assert s["sum_ms"]["plan"] == pytest.approx(0.4 + 4 * 0.5 + 2 * 0.3 + 0.099)
    # a margin of 5 % also drops the linear (0.099 > 0.1 * 0.95)
    plan2 = plan_int8(m, units, None, x, threads=1, margin=0.05, measure=measure)
    assert len(calls) == 1, "second plan must come from the cache"
    assert plan2.keep_float() == ["blocks.0.2", "blocks.1.2", "head"] and plan2.measured == 0
    assert all(t.cached for t in plan2.layers)
    # another thread count is another cache key
    plan_int8(m, units, None, x, threads=2, margin=0.0, measure=measure)
    assert len(calls) == 2
    assert CACHE.path.parent == cache_dir and len(CACHE.load()["entries"]) == 10


def test_int8_latency_scheme_keeps_the_planned_layers_float(cache_dir, monkeypatch):
    """Through quantize_model: the planned layers are kept in float in the converted graph, the manifest
    block says so, and the config validates its options."""
    import mobilevit_deploy.quantize.latency_plan as lp

    slow = {"qkv", "fc2"}

    def fake_measure(items, factory, *, threads, log=None):
        assert threads == 1 and callable(factory)
        return {s: (1.0, 1.2) if s.startswith("linear|w=[384, 128]") or s.startswith("linear|w=[128, 256]")
                else (1.0, 0.5) for s in items}

    monkeypatch.setattr(lp, "measure_layers", fake_measure)
    small = make_small_model()
    cfg = get_config("executorch", "int8-latency")
    assert cfg.scheme == "int8-latency" and cfg.latency_plan and get_config("executorch", "int8").scheme == "int8"
    logs = []
    q = quantize_model(small, cfg, deploy_cfg=small.deploy_cfg, calib=load_calibration(None, 8), progress=False,
                       log=logs.append)
    lp_info = q.info["latency_plan"]
    assert {r["unit"] for r in lp_info["layers"] if not r["int8"]} == slow
    assert set(q.info["keep_float"]["units"]) == slow and q.info["scheme"] == "int8-latency"
    assert any("latency plan" in s and "qkv" in s for s in logs)
    for n in q.module.graph.nodes:
        if n.op == "call_function" and "linear" in str(n.target):
            w = n.args[1]
            quantized = w.op == "call_function" and "dequantize" in str(w.target)
            assert quantized == (module_path(n) not in slow), (module_path(n), w)
    for bad, msg in (({"plan_threads": 0}, "plan_threads must be a positive integer"),
                     ({"plan_margin": 1.0}, r"plan_margin must be a number in \[0, 1\)"),
                     ({"latency_plan": "yes"}, "latency_plan must be True or False")):
        with pytest.raises(UserError, match=msg):
            get_config("executorch", "int8", **bad)


def test_a_layer_that_cannot_be_timed_alone_stays_int8_and_is_not_cached(cache_dir):
    m = ConvNet().eval()
    units = ["stem", "blocks.0.2", "head"]

    def measure(items):
        return {s: ("RuntimeError: method->execute() failed" if s.startswith("conv_dw") else (1.0, 2.0))
                for s in items}

    plan = plan_int8(m, units, None, torch.rand(1, 3, 32, 32), measure=measure)
    assert plan.keep_float() == ["stem", "head"]  # timed, int8 slower
    dw = [t for t in plan.layers if t.unit == "blocks.0.2"][0]
    assert dw.int8 and dw.error.startswith("RuntimeError")
    s = plan.summary()
    assert s["not_timed"] == [{"unit": "blocks.0.2", "error": dw.error}] and len(s["layers"]) == 2
    assert s["sum_ms"]["fp32"] == pytest.approx(2.0)
    assert len(CACHE.load()["entries"]) == 2  # the failure is not cached


@pytest.mark.slow
def test_real_timings_on_a_small_convnet(cache_dir):
    """ExecuTorch lowers and times each layer shape in fp32 and int8; every timing is positive."""
    from mobilevit_deploy.quantize.executorch_schemes import xnnpack_quantizer_factory

    m = ConvNet().eval()
    units = ["stem", "blocks.0.0", "blocks.0.2", "blocks.0.4", "head"]
    plan = plan_int8(m, units, xnnpack_quantizer_factory(), torch.rand(1, 3, 64, 64), threads=1)
    assert plan.measured == 5 and all(t.fp32_ms > 0 and t.int8_ms > 0 for t in plan.layers)
    assert {t.unit for t in plan.layers} == set(units)
