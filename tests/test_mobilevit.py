"""MobileViT v1 (mobilevit_xxs/xs/s): shapes, exact timm parameter counts and state-dict keys,
numerics of the MobileViT block against an independent reference, torch.export, checkpoints.

`fixtures/timm_mobilevit_keys.json` holds {variant: {key: shape}} dumped from timm's own
`timm.create_model(variant).state_dict()` (timm was run once outside this environment; it is not a
dependency). Exports of xs/s and the extra sizes are marked slow.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mobilevit_deploy.checkpoint import save_safetensors
from mobilevit_deploy.errors import CheckpointError
from mobilevit_deploy.models import create_model, get_deploy_cfg, list_models
from mobilevit_deploy.models.layers import Attention
from mobilevit_deploy.models.mobilevit import MobileVitBlock

VARIANTS = ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"]
# Published parameter counts of timm's mobilevit_xxs / xs / s with 1000 classes.
TIMM_PARAMS = {"mobilevit_xxs": 1_272_024, "mobilevit_xs": 2_317_848, "mobilevit_s": 5_578_632}
NUM_FEATURES = {"mobilevit_xxs": 320, "mobilevit_xs": 384, "mobilevit_s": 640}
FIXTURE = Path(__file__).parent / "fixtures" / "timm_mobilevit_keys.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models, shared 2-core machine


def _randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights *and* BN statistics, so nothing equals the default init by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                if k.endswith("running_var"):
                    r = torch.rand(v.shape, generator=g) + 0.5
                else:
                    r = torch.randn(v.shape, generator=g) * 0.2
                v.copy_(r)
    return model.eval()


def test_registered():
    assert set(VARIANTS) <= set(list_models())


@pytest.mark.parametrize("name", VARIANTS)
def test_deploy_cfg_matches_timm_pretrained_cfg(name):
    cfg = get_deploy_cfg(name)
    assert cfg.input_size == (3, 256, 256)
    assert cfg.mean == (0.0, 0.0, 0.0) and cfg.std == (1.0, 1.0, 1.0)
    assert cfg.crop_pct == 0.9 and cfg.interpolation == "bicubic" and cfg.num_classes == 1000


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_equals_timm(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_keys_and_shapes_equal_timm(name):
    expected = json.loads(FIXTURE.read_text())["models"][name]
    got = {k: list(v.shape) for k, v in create_model(name).state_dict().items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not wrong, f"shape mismatches (ours, timm): {dict(list(wrong.items())[:5])}"


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_shapes(name):
    model = create_model(name)
    nf = NUM_FEATURES[name]
    with torch.no_grad():
        for batch, size, grid in ((1, 256, 8), (2, 64, 2), (1, 96, 3)):  # 96: 3x3 at stride 32 -> resized patches
            x = torch.randn(batch, 3, size, size)
            feats = model.forward_features(x)
            assert feats.shape == (batch, nf, grid, grid)
            logits = model(x)
            assert logits.shape == (batch, 1000)
            assert torch.isfinite(logits).all()
            torch.testing.assert_close(model.forward_head(feats), logits, rtol=0, atol=0)
    small = create_model(name, num_classes=10)
    assert small(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_train_step_reaches_every_parameter():
    model = create_model("mobilevit_xxs", num_classes=10, drop_path_rate=0.1).train()
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 7]))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad[:5]


def test_unfold_groups_same_offset_pixels_and_fold_inverts():
    blk = MobileVitBlock(8, 16, transformer_depth=1, patch_size=2)
    x = torch.randn(2, 16, 6, 10)  # [B, C, H, W]
    seqs = blk.unfold(x)  # [B * 4, N, C]
    assert seqs.shape == (8, 15, 16)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                expect = x[b, :, i::2, j::2].flatten(1).T  # pixels at offset (i, j) of every patch, [N, C]
                torch.testing.assert_close(seqs[b * 4 + i * 2 + j], expect, rtol=0, atol=0)
    torch.testing.assert_close(blk.fold(seqs, 2, 6, 10), x, rtol=0, atol=0)


def _reference_attention(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Textbook multi-head attention on [B, N, C] with the module's weights (fused SDPA)."""
    B, N, C = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # each [B, h, N, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias[None])
    return attn.proj(out.transpose(1, 2).reshape(B, N, C))


def test_attention_matches_textbook_reference():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 10, 48)
    bias = torch.randn(4, 10, 10)  # per-head additive bias, e.g. a relative position bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference_attention(attn, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn(x, attn_bias=bias[:, None]), _reference_attention(attn, x, bias),
                                   rtol=1e-5, atol=1e-5)


def _reference_mobilevit_block(blk: MobileVitBlock, x: torch.Tensor) -> torch.Tensor:
    """The paper's block written naively: one transformer pass per pixel offset via strided slicing."""
    shortcut = x
    y = blk.conv_1x1(blk.conv_kxk(x))
    B, C, H, W = y.shape
    p = blk.patch_size
    out = torch.empty_like(y)
    for i in range(p):
        for j in range(p):
            seq = y[:, :, i::p, j::p].flatten(2).transpose(1, 2)  # [B, N, C]
            for tb in blk.transformer:
                seq = seq + _reference_attention(tb.attn, tb.norm1(seq))
                seq = seq + tb.mlp(tb.norm2(seq))
            out[:, :, i::p, j::p] = blk.norm(seq).transpose(1, 2).reshape(B, C, H // p, W // p)
    return blk.conv_fusion(torch.cat((shortcut, blk.conv_proj(out)), dim=1))


@pytest.mark.parametrize("hw", [(8, 8), (4, 6)])
def test_mobilevit_block_matches_naive_reference(hw):
    model = _randomize_(create_model("mobilevit_xxs"))
    blk = model.stages[3][1]  # 64 channels, transformer dim 80, depth 4
    x = torch.randn(2, 64, *hw)
    with torch.no_grad():
        ref = _reference_mobilevit_block(blk, x)
        torch.testing.assert_close(blk(x), ref, rtol=1e-4, atol=1e-4)
        no_transformer = blk.conv_fusion(torch.cat((x, blk.conv_proj(blk.conv_1x1(blk.conv_kxk(x)))), 1))
        assert (ref - no_transformer).abs().max() > 1e-2


@pytest.mark.parametrize("name", VARIANTS)
def test_checkpoint_round_trip(name, tmp_path):
    model = _randomize_(create_model(name), seed=1)
    path = save_safetensors(model.state_dict(), tmp_path / f"{name}.safetensors")
    loaded = create_model(name, checkpoint=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
        assert not torch.allclose(create_model(name)(x), expected)  # the weights did matter


def test_mismatched_checkpoint_names_keys(tmp_path):
    xxs = create_model("mobilevit_xxs")
    path = save_safetensors(xxs.state_dict(), tmp_path / "xxs.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch") as e:
        create_model("mobilevit_xs", checkpoint=str(path))
    assert re.search(r"stages\.\d+\.\d+\.\S+ \(", str(e.value)), str(e.value)

    with pytest.raises(CheckpointError, match=r"head\.fc\.weight"):
        create_model("mobilevit_xxs", num_classes=10, checkpoint=str(path))

    sd = xxs.state_dict()
    del sd["stages.4.1.transformer.2.attn.qkv.weight"]
    partial = save_safetensors(sd, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys.*stages\.4\.1\.transformer\.2\.attn\.qkv\.weight"):
        create_model("mobilevit_xxs", checkpoint=str(partial))


_slow = pytest.mark.slow


@pytest.mark.parametrize("name,size", [
    ("mobilevit_xxs", 256),
    ("mobilevit_xxs", 96),
    pytest.param("mobilevit_xxs", 64, marks=_slow),
    pytest.param("mobilevit_xs", 256, marks=_slow),
    pytest.param("mobilevit_xs", 64, marks=_slow),
    pytest.param("mobilevit_xs", 96, marks=_slow),
    pytest.param("mobilevit_s", 256, marks=_slow),
    pytest.param("mobilevit_s", 64, marks=_slow),
    pytest.param("mobilevit_s", 96, marks=_slow),
])
def test_torch_export(name, size):
    model = create_model(name)
    x = torch.randn(1, 3, size, size)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)

    # Export IR (cheap): no fused SDPA, no 4-D matmul (it decomposes to expand + bmm), no F.unfold,
    # and no tensor above 4-D (Core ML and XNNPACK handle <= 4-D layouts best).
    banned = r"scaled_dot_product|matmul|expand|squeeze|im2col|col2im|unfold"
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [o for o in ops if re.search(banned, o)], sorted(ops)
    ranks = [n.meta["val"].dim() for n in ep.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert max(ranks) <= 4
    # patch resizing appears only when the stride-32 map is not a multiple of the 2x2 patch
    assert any("upsample" in o for o in ops) == (size % 64 != 0), sorted(ops)
    if size == 256:  # core ATen, what ExecuTorch lowers (decomposition costs as much as the export)
        core_ops = {str(n.target) for n in ep.run_decompositions().graph.nodes if n.op == "call_function"}
        assert not [o for o in core_ops if re.search(banned, o)], sorted(core_ops)


def test_typed_config_makes_every_width_overridable(tmp_path):
    """Every width is a field of the typed config: a model with other widths (e.g. a pruned one) is built from
    the config dict, and its weights load back into a model built from that dict."""
    from mobilevit_deploy.models.mobilevit import MobileViTCfg, model_cfgs

    base = create_model("mobilevit_xxs")
    assert base.arch_cfg == model_cfgs["mobilevit_xxs"]
    d = json.loads(json.dumps(base.arch_cfg.to_dict()))  # plain JSON
    assert MobileViTCfg.from_dict(d) == base.arch_cfg
    d["stem_chs"] = 8
    d["stages"][1]["blocks"][1]["mid_chs"] = 40  # MV2 expansion channels of one block
    d["stages"][3]["vit"].update(dim=64, mlp_hidden=[96, 128, 64], num_heads=2, out_chs=56)  # 3 layers, own widths
    d["stages"][4]["blocks"][0]["out_chs"] = 72
    d["num_features"] = 256
    m = _randomize_(create_model("mobilevit_xxs", cfg=d, num_classes=10))
    sd = m.state_dict()
    assert sd["stem.conv.weight"].shape[0] == 8 and sd["stages.0.0.conv1_1x1.conv.weight"].shape[1] == 8
    assert sd["stages.1.1.conv1_1x1.conv.weight"].shape[0] == 40
    blk = m.stages[3][1]
    assert len(blk.transformer) == 3 and blk.transformer[0].attn.num_heads == 2
    assert [tuple(t.mlp.fc1.weight.shape) for t in blk.transformer] == [(96, 64), (128, 64), (64, 64)]
    assert sd["stages.3.1.conv_fusion.conv.weight"].shape[0] == 56  # the block's out channels ...
    assert sd["stages.4.0.conv1_1x1.conv.weight"].shape[1] == 56  # ... are the next stage's input
    assert tuple(sd["final_conv.conv.weight"].shape[:2]) == (256, 72) and m.num_features == 256
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    # the same model again from the dict, with its weights
    path = save_safetensors(m.state_dict(), tmp_path / "pruned.safetensors")
    again = create_model("mobilevit_xxs", cfg=d, num_classes=10, checkpoint=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), m(x))
    # top-level fields as keyword overrides
    assert create_model("mobilevit_xxs", num_features=256).final_conv.conv.weight.shape[0] == 256
