"""Structured pruning (mobilevit_deploy.prune): surgery equivalence per structure kind, the architecture
record round trip through create_model, MACs (analytic == counted), budget, importance, latency table."""
from __future__ import annotations

import copy
import json
import random
from dataclasses import replace

import pytest
import torch
from torch import nn

from mobilevit_deploy.errors import CheckpointError, UserError
from mobilevit_deploy.models import create_model, get_deploy_cfg
from mobilevit_deploy.prune.budget import allocate, unit_costs
from mobilevit_deploy.prune.cost import CostModel, count_macs, state_of_plan
from mobilevit_deploy.prune.importance import global_scores, score
from mobilevit_deploy.prune.record import FORMAT, apply_architecture, architecture_of
from mobilevit_deploy.prune.stage import write_pruned
from mobilevit_deploy.prune.structures import STEP, groups
from mobilevit_deploy.prune.surgery import apply_plan

LABELS = ("blue", "green", "red")
SIZE = 64


def lively_model(seed: int = 0, size: int = SIZE, name: str = "mobilevit_xxs", *, bn_only: bool = False):
    """`name` (mobilevit_xxs), 3 classes, with every weight and BatchNorm statistic random and non-trivial, so
    every structure contributes (the default init zeroes the last BN of residual MV2 blocks and keeps
    the transformer's linear weights tiny). `bn_only`: only the BatchNorms are randomised."""
    torch.manual_seed(seed)
    cfg = replace(get_deploy_cfg(name, 3, LABELS), input_size=(3, size, size), crop_pct=1.0)
    m = create_model(name, deploy_cfg=cfg)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
            elif bn_only:
                continue
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
            elif isinstance(mod, nn.Linear):
                mod.weight.normal_(0, mod.in_features ** -0.5)
                mod.bias.uniform_(-0.1, 0.1)
    return m.eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # 2 shared cores: 2 threads ran 10x slower


@pytest.fixture(scope="module")
def model():
    return lively_model()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE)


def _out(m, x):
    with torch.no_grad():
        return m(x)


def _gid(m, kind, i=0):
    return [g for g in groups(m) if g.kind == kind][i]


# ------------------------------------------------------------------------------------- surgery
def test_groups_of_xxs(model):
    kinds = {}
    for g in groups(model):
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
        if g.kind in ("mv2_hidden", "vit_width", "mlp_hidden"):
            assert g.size % 8 == 0
    # 7 MV2 blocks, 3 MobileViT blocks of 2 + 4 + 3 layers
    assert kinds == {"mv2_hidden": 7, "vit_width": 3, "heads": 9, "mlp_hidden": 9, "layers": 3}


def test_pruning_nothing_is_bit_identical(model, x):
    full = {g.id: list(range(g.size)) for g in groups(model)}
    for plan in ({}, full):
        m = apply_plan(copy.deepcopy(model), plan)
        assert torch.equal(_out(m, x), _out(model, x))
        assert [tuple(p.shape) for p in m.parameters()] == [tuple(p.shape) for p in model.parameters()]


def _zero_mv2(m, g, removed):
    m.get_submodule(g.path).conv3_1x1.conv.weight.data[:, removed] = 0


def _zero_mlp(m, g, removed):
    m.get_submodule(g.path).fc2.weight.data[:, removed] = 0


def _zero_heads(m, g, removed):
    attn = m.get_submodule(g.path)
    e = attn.head_dim
    for h in removed:
        attn.proj.weight.data[:, h * e:(h + 1) * e] = 0


def _zero_layers(m, g, removed):
    for i in removed:
        layer = m.get_submodule(g.path).transformer[i]
        for lin in (layer.attn.proj, layer.mlp.fc2):
            lin.weight.data.zero_()
            lin.bias.data.zero_()


class MaskedLayerNorm(nn.Module):
    """LayerNorm over the kept channels only, zero at the removed ones: what a LayerNorm computes
    after its removed channels are gone (LayerNorm statistics include every channel, so zeroed
    channels alone would not make width pruning function-preserving)."""

    def __init__(self, ln: nn.LayerNorm, keep):
        super().__init__()
        self.ln, self.keep = ln, torch.as_tensor(keep)

    def forward(self, x):
        k = x[..., self.keep]
        y = torch.nn.functional.layer_norm(k, (len(self.keep),), self.ln.weight[self.keep], self.ln.bias[self.keep],
                                           self.ln.eps)
        out = torch.zeros_like(x)
        out[..., self.keep] = y
        return out


def _zero_width(m, g, removed):
    blk = m.get_submodule(g.path)
    blk.conv_1x1.weight.data[removed] = 0
    for layer in blk.transformer:
        for lin in (layer.attn.proj, layer.mlp.fc2):
            lin.weight.data[removed] = 0
            lin.bias.data[removed] = 0


def _mask_layernorms(m, g, removed):
    """The reference of width pruning: the block's LayerNorms normalise over the kept channels."""
    blk = m.get_submodule(g.path)
    keep = [i for i in range(g.size) if i not in set(removed)]
    for layer in blk.transformer:
        layer.norm1 = MaskedLayerNorm(layer.norm1, keep)
        layer.norm2 = MaskedLayerNorm(layer.norm2, keep)
    blk.norm = MaskedLayerNorm(blk.norm, keep)


def zeroed(model, plan_removed):
    """(model with the removed units' contributions zeroed, the reference it must equal once they are removed)."""
    src = copy.deepcopy(model)
    for g, removed in plan_removed:
        ZERO[g.kind](src, g, removed)
    ref = copy.deepcopy(src)
    for g, removed in plan_removed:
        if g.kind == "vit_width":
            _mask_layernorms(ref, g, removed)
    return src, ref


ZERO = {"mv2_hidden": _zero_mv2, "mlp_hidden": _zero_mlp, "heads": _zero_heads, "layers": _zero_layers,
        "vit_width": _zero_width}


@pytest.mark.parametrize("kind,index", [("mv2_hidden", 0), ("mv2_hidden", 3), ("mv2_hidden", 6), ("vit_width", 0),
                                        ("vit_width", 2), ("heads", 0), ("heads", 5), ("mlp_hidden", 4),
                                        ("layers", 1), ("layers", 2)])
def test_removing_zeroed_structures_keeps_outputs(model, x, kind, index):
    """Zero what some units contribute, then remove them: the dense smaller model computes the same."""
    g = _gid(model, kind, index)
    rnd = random.Random(index)
    n_remove = {"heads": 2, "layers": 1}.get(kind, 2 * STEP[kind])
    removed = sorted(rnd.sample(range(g.size), n_remove))
    src, ref = zeroed(model, [(g, removed)])
    y_ref = _out(ref, x)
    assert not torch.allclose(y_ref, _out(model, x), atol=1e-4)  # the removed units did matter
    pruned = apply_plan(src, {g.id: [u for u in range(g.size) if u not in removed]})
    torch.testing.assert_close(_out(pruned, x), y_ref, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_head_removal_keeps_the_attention_scale(model, x):
    g = _gid(model, "heads", 2)
    attn = model.get_submodule(g.path)
    pruned = apply_plan(copy.deepcopy(model), {g.id: [0, 3]})
    a = pruned.get_submodule(g.path)
    assert (a.num_heads, a.head_dim, a.scale) == (2, attn.head_dim, attn.scale)
    assert a.qkv.out_features == 3 * 2 * attn.head_dim and a.proj.in_features == 2 * attn.head_dim


def test_every_kind_at_once(model, x):
    rnd = random.Random(7)
    plan, removals = {}, []
    seen: dict[str, int] = {}
    for g in groups(model):
        seen[g.kind] = seen.get(g.kind, -1) + 1
        if seen[g.kind] % 2:  # every other group of each kind
            continue
        n = {"heads": 1, "layers": 1}.get(g.kind, STEP[g.kind])
        removed = sorted(rnd.sample(range(g.size), n))
        removals.append((g, removed))
        plan[g.id] = [u for u in range(g.size) if u not in removed]
    assert {g.kind for g, _ in removals} == set(ZERO)
    src, ref = zeroed(model, removals)
    pruned = apply_plan(src, plan)
    torch.testing.assert_close(_out(pruned, x), _out(ref, x), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------- record
def _random_plan(m, seed=0):
    rnd = random.Random(seed)
    plan = {}
    for g in groups(m):
        n = max(g.min_keep, g.size - rnd.choice([0, 1, 2]) * STEP[g.kind])
        plan[g.id] = sorted(rnd.sample(range(g.size), n))
    return plan


def test_record_round_trip_through_create_model(model, x, tmp_path):
    pruned = apply_plan(copy.deepcopy(model), _random_plan(model, 3))
    w, j, meta = write_pruned(pruned, "mobilevit_xxs", tmp_path, {"note": "test"})
    assert (w.name, j.name) == ("model.safetensors", "model.json")
    rec = json.loads(j.read_text())["architecture"]
    assert rec["format"] == FORMAT and rec["model"] == "mobilevit_xxs"
    # every attention records its (unchanged) scale
    assert all("scale" in v for k, v in rec["attrs"].items() if k.endswith(".attn"))
    rebuilt = create_model("mobilevit_xxs", checkpoint=str(w), deploy_cfg=model.deploy_cfg)
    assert torch.equal(_out(rebuilt, x), _out(pruned, x))
    # a rebuilt model pruned again: the record composes (kept layers stay in original indices)
    again = apply_plan(copy.deepcopy(rebuilt), {_gid(rebuilt, "layers", 1).id: [0, 1]})
    w2, _, _ = write_pruned(again, "mobilevit_xxs", tmp_path / "again")
    rebuilt2 = create_model("mobilevit_xxs", checkpoint=str(w2), deploy_cfg=model.deploy_cfg)
    assert torch.equal(_out(rebuilt2, x), _out(again, x))


def test_record_for_another_model_is_a_checkpoint_error(model, tmp_path):
    pruned = apply_plan(copy.deepcopy(model), {_gid(model, "layers", 0).id: [1]})
    rec = architecture_of(pruned, "mobilevit_xxs")
    with pytest.raises(CheckpointError, match="pruned mobilevit_xxs"):
        apply_architecture(create_model("mobilevit_xs", num_classes=3), rec, "mobilevit_xs")
    with pytest.raises(CheckpointError, match="format"):
        apply_architecture(create_model("mobilevit_xxs", num_classes=3), {"format": "other"})
    w, _, _ = write_pruned(pruned, "mobilevit_xxs", tmp_path)
    with pytest.raises(CheckpointError):
        create_model("mobilevit_xs", checkpoint=str(w), num_classes=3)


def test_standard_checkpoint_is_unaffected_by_the_hook(model, x, tmp_path):
    from mobilevit_deploy.checkpoint import save_safetensors

    save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "model.json").write_text(json.dumps({"model": "mobilevit_xxs"}))
    m = create_model("mobilevit_xxs", checkpoint=str(tmp_path / "model.safetensors"), deploy_cfg=model.deploy_cfg)
    assert torch.equal(_out(m, x), _out(model, x))


# --------------------------------------------------------------------------------- MACs, budget
@pytest.mark.parametrize("size", [32, 96])
def test_analytic_macs_equal_counted(model, size):
    cost = CostModel(model, (size, size))
    assert cost.macs(cost.initial_state()) == cost.total0 == count_macs(model, (size, size))
    for seed in range(2):
        plan = _random_plan(model, seed)
        pruned = apply_plan(copy.deepcopy(model), plan)
        assert cost.macs(state_of_plan(cost, plan)) == count_macs(pruned, (size, size))


@pytest.mark.parametrize("method", ["magnitude", "taylor"])
@pytest.mark.parametrize("target", [0.7, 0.5])
def test_budget_is_met(model, method, target):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))]
    cost = CostModel(model, (32, 32))
    raw = score(model, method, batches)
    alloc = allocate(cost, global_scores(method, raw, unit_costs(cost, raw)), target)
    pruned = apply_plan(copy.deepcopy(model), alloc.plan)
    macs = count_macs(pruned, (32, 32))
    assert macs <= target * cost.total0
    assert macs >= (target - 0.08) * cost.total0  # stops as soon as the budget is met
    for g in groups(pruned):
        if g.kind in ("mv2_hidden", "vit_width", "mlp_hidden"):
            assert g.size % 8 == 0 and g.size >= 8
        assert g.size >= 1


def test_unreachable_budget_is_a_user_error(model):
    cost = CostModel(model, (SIZE, SIZE))
    raw = score(model, "magnitude")
    with pytest.raises(UserError, match="cannot reach"):
        allocate(cost, raw, 0.01)


# ------------------------------------------------------------------------------------ importance
@pytest.mark.parametrize("method", ["taylor", "magnitude", "nvit", "slim", "vtp", "wd", "spvit"])
def test_importance_methods(model, method):
    from mobilevit_deploy.prune.importance import METHOD_KINDS
    from mobilevit_deploy.prune.structures import ALL_KINDS

    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = score(model, method, batches, steps=3)
    gs = {g.id: g for g in groups(model, ALL_KINDS)}
    assert s and set(s) <= set(gs)
    for gid, v in s.items():
        assert v.shape == (gs[gid].size,) and torch.isfinite(v).all() and (v >= 0).all()
    assert set(s) == {gid for gid, g in gs.items() if g.kind in METHOD_KINDS[method]}
    if method == "vtp":
        assert not any(gid.startswith("layers:") for gid in s)
    if method == "spvit":
        assert {gid.split(":")[0] for gid in s} == {"mv2_hidden", "mlp_hidden", "attn_conv"}
    # scoring leaves the model as it was (weights, hooks, requires_grad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["taylor", "magnitude", "nvit"])
def test_a_dead_unit_scores_zero(model, method):
    m = copy.deepcopy(model)
    g = _gid(m, "mlp_hidden", 1)
    mlp = m.get_submodule(g.path)
    with torch.no_grad():
        mlp.fc1.weight[5] = 0
        mlp.fc1.bias[5] = 0
        mlp.fc2.weight[:, 5] = 0
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))]
    s = score(m, method, batches)[g.id]
    assert s[5] == 0 and (s[torch.arange(len(s)) != 5] > 0).all()


@pytest.mark.parametrize("method", ["foo", "WD"])
def test_unknown_method(model, method):
    with pytest.raises(UserError, match="taylor, magnitude, slim, vtp, nvit, wd, spvit"):
        score(model, method)


# ------------------------------------------------------------------------------- wd and spvit
def test_wd_depth_scores_drop_trailing_layers_first(model):
    """WDPruning's depth: within a block the layer scores make the allocator remove trailing layers first;
    layers the shallow classifiers mark droppable score far below the kept ones."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))) for _ in range(4)]
    s = score(model, "wd", batches, steps=2)
    for gid, v in s.items():
        if gid.startswith("layers:"):
            order = torch.argsort(v, stable=True).tolist()
            assert order == list(range(len(v)))[::-1]  # last layer first
            assert v[0] >= 1e6  # the first layer is never droppable (earliest exit = itself at worst)


def test_spvit_conversion_record_macs_and_reprune(model, x, tmp_path):
    """attn_conv: attentions turned into ConvAttention (weights from the attention's v and proj), MACs
    predicted exactly, the record rebuilds the model bit-identically, and the result prunes again."""
    from mobilevit_deploy.prune.modules import ConvAttention, is_conv_attention
    from mobilevit_deploy.prune.structures import ALL_KINDS

    m = copy.deepcopy(model)
    plan = {"attn_conv:stages.3.1": [0, 2], "attn_conv:stages.2.1": [1],
            "heads:stages.3.1.transformer.1.attn": [0, 2, 3],
            "mlp_hidden:stages.2.1.transformer.0.mlp": list(range(64)),
            "vit_width:stages.4.1": list(range(8, 96)), "layers:stages.4.1": [0, 2]}
    for size in (32, 96):
        cost = CostModel(model, (size, size))
        pruned = apply_plan(copy.deepcopy(m), plan)
        assert cost.macs(state_of_plan(cost, plan)) == count_macs(pruned, (size, size))
    conv = pruned.get_submodule("stages.3.1.transformer.1.attn")
    assert isinstance(conv, ConvAttention) and conv.num_heads == 3
    src = m.get_submodule("stages.3.1.transformer.1.attn")
    inner = 4 * src.head_dim
    keep_rows = torch.cat([torch.arange(2 * inner, 3 * inner).view(4, -1)[[0, 2, 3]].flatten()])
    assert torch.equal(conv.v.weight, src.qkv.weight[keep_rows])
    assert not is_conv_attention(pruned.get_submodule("stages.3.1.transformer.0.attn"))
    w, j, _ = write_pruned(pruned, "mobilevit_xxs", tmp_path)
    rec = json.loads(j.read_text())["architecture"]
    assert set(rec["replaced"]) == {"stages.2.1.transformer.0.attn", "stages.3.1.transformer.1.attn",
                                    "stages.3.1.transformer.3.attn"}
    rebuilt = create_model("mobilevit_xxs", checkpoint=str(w), deploy_cfg=model.deploy_cfg)
    assert torch.equal(_out(rebuilt, x), _out(pruned, x))
    # pruning the rebuilt model again: no heads group for conv layers, width through the conv's v / proj
    gs = {g.id for g in groups(rebuilt, ALL_KINDS)}
    assert "heads:stages.3.1.transformer.1.attn" not in gs and "heads:stages.3.1.transformer.0.attn" in gs
    cost = CostModel(rebuilt, (SIZE, SIZE))
    assert cost.macs(cost.initial_state()) == count_macs(rebuilt, (SIZE, SIZE))
    plan2 = {"vit_width:stages.3.1": list(range(16, 80)), "attn_conv:stages.3.1": [0]}
    again = apply_plan(copy.deepcopy(rebuilt), plan2)
    assert cost.macs(state_of_plan(cost, plan2)) == count_macs(again, (SIZE, SIZE))
    w2, _, _ = write_pruned(again, "mobilevit_xxs", tmp_path / "again")
    assert torch.equal(_out(create_model("mobilevit_xxs", checkpoint=str(w2), deploy_cfg=model.deploy_cfg), x),
                       _out(again, x))


def test_spvit_budget_converts_attention_and_meets_target(model):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))) for _ in range(2)]
    cost = CostModel(model, (32, 32))
    raw = score(model, "spvit", batches, steps=3)
    alloc = allocate(cost, global_scores("spvit", raw, unit_costs(cost, raw)), 0.7)
    pruned = apply_plan(copy.deepcopy(model), alloc.plan)
    assert count_macs(pruned, (32, 32)) == cost.macs(alloc.state) <= 0.7 * cost.total0
    kinds = {gid.split(":")[0] for gid in alloc.removed}
    assert kinds <= {"mv2_hidden", "mlp_hidden", "attn_conv"}


# -------------------------------------------------------------------------------- latency table
def test_latency_table_fit_cache_and_fallback(model, tmp_path, monkeypatch):
    from mobilevit_deploy.prune.latency import FEATURES, LatencyModel, cache_path, latency_model

    monkeypatch.setenv("MOBILEVIT_DEPLOY_CACHE", str(tmp_path))
    cost = CostModel(model, (32, 32))
    true = {"mv2": 3e-7, "linear": 1e-7, "attn": 2e-7, "layers": 0.05}
    calls = []

    def fake_measure(mods):  # a machine whose latency is exactly linear in the features
        calls.append(sorted(mods))
        out = {}
        for n, m in mods.items():
            c = CostModel(m, (32, 32))
            t = c.terms(c.initial_state())
            out[n] = 0.2 + sum(true[k] * t[k] for k in FEATURES)
        return out

    lm = latency_model(model, "mobilevit_xxs", cost, measure=fake_measure)
    assert calls == [sorted(["base", "mv2", "linear", "attn", "layers"])]
    assert lm.source == "measured" and lm.const == pytest.approx(0.2, rel=1e-6)
    for k in FEATURES:
        assert lm.coef[k] == pytest.approx(true[k], rel=1e-6)
    table = json.loads(cache_path().read_text())
    (key, entry), = table["entries"].items()
    assert "mobilevit_xxs" in key and "torch=" in key and "executorch=" in key and "cpu=" in key
    assert len(entry["model"]["variants"]) == 5
    # cached: no second measurement
    lm2 = latency_model(model, "mobilevit_xxs", cost, measure=fake_measure)
    assert len(calls) == 1 and lm2.coef == lm.coef
    # the budget on predicted latency
    raw = score(model, "magnitude")

    def cost_fn(s):
        return lm.predict(cost.terms(s))

    alloc = allocate(cost, global_scores("magnitude", raw, unit_costs(cost, raw, cost_fn)), 0.6, cost_fn)
    assert alloc.cost_after <= 0.6 * alloc.cost_before
    assert latency_model(model, "mobilevit_xxs", cost, table="macs").source == LatencyModel.macs_proportional().source


# ------------------------------------------------------------------------------------------ CMT
@pytest.fixture(scope="module")
def cmt():
    """cmt_ti at 64 px, 3 classes, BatchNorm statistics random (every unit contributes)."""
    return lively_model(0, 64, "cmt_ti", bn_only=True)


def test_cmt_ffn_hidden_groups_surgery_macs_and_record(cmt, tmp_path):
    """CMT: IRFFN hidden channels are prunable (LMHSA heads are not: shared per-stage position bias).
    Zeroed units removed keep the outputs; analytic MACs == counted; the record rebuilds the model."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    gs = groups(cmt)
    assert {g.kind for g in gs} == {"ffn_hidden"} and len(gs) == 16  # 2 + 2 + 10 + 2 blocks
    rnd = random.Random(0)
    plan_removed = [(g, sorted(rnd.sample(range(g.size), g.size % 8 + 8 * (i % 3)))) for i, g in enumerate(gs)]
    src = copy.deepcopy(cmt)
    for g, removed in plan_removed:
        src.get_submodule(g.path).conv2[0].weight.data[:, removed] = 0
    plan = {g.id: [u for u in range(g.size) if u not in set(removed)] for g, removed in plan_removed}
    pruned = apply_plan(copy.deepcopy(src), plan)
    assert torch.allclose(_out(pruned, x), _out(src, x), atol=1e-5)
    assert all(g.size % 8 == 0 for g in groups(pruned))
    cost = CostModel(cmt, (64, 64))
    assert cost.macs(cost.initial_state()) == count_macs(cmt, (64, 64))
    assert cost.macs(state_of_plan(cost, plan)) == count_macs(pruned, (64, 64))
    w, _, _ = write_pruned(pruned, "cmt_ti", tmp_path)
    rebuilt = create_model("cmt_ti", checkpoint=str(w), deploy_cfg=cmt.deploy_cfg)
    assert torch.equal(_out(rebuilt, x), _out(pruned, x))


@pytest.mark.parametrize("method", ["magnitude", "taylor", "slim"])
def test_cmt_budget_is_met(cmt, method):
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2,)))]
    cost = CostModel(cmt, (64, 64))
    raw = score(cmt, method, batches, steps=2)
    ffn_share = 1 - cost.const / cost.total0
    target = round(1 - 0.5 * ffn_share, 3)
    alloc = allocate(cost, global_scores(method, raw, unit_costs(cost, raw)), target)
    pruned = apply_plan(copy.deepcopy(cmt), alloc.plan)
    assert count_macs(pruned, (64, 64)) == cost.macs(alloc.state) <= target * cost.total0
