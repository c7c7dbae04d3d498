"""Plain-ViT family (models/deit.py, tnt.py, augvit.py): exact timm parameter counts and state-dict
keys, numerics against independent transcriptions of the reference code, the Huawei TNT key map,
AugViT's circulant folding, and EViT-style static token reduction (both gather formulations).

timm is not installed (and must not be): the expected keys/shapes below are written out from timm's
layer definitions (vision_transformer.py / deit.py / tnt.py), and the reference forwards are
transcriptions of timm's / the official code, run with our modules' weights.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mobilevit_deploy.checkpoint import save_safetensors
from mobilevit_deploy.errors import CheckpointError, UserError
from mobilevit_deploy.models import IMAGENET_MEAN, IMAGENET_STD, DeployCfg, create_model, get_deploy_cfg, list_models
from mobilevit_deploy.models.augvit import CirculantLinear, circulant_index
from mobilevit_deploy.models.deit import TokenReducer, resample_abs_pos_embed, token_schedule
from mobilevit_deploy.models.tnt import checkpoint_filter_fn, is_huawei_tnt

DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224",
        "deit_small_distilled_patch16_224"]
AUGVIT = ["augvit_tiny_patch16_224", "augvit_small_patch16_224"]
ALL = DEIT + ["tnt_s_patch16_224"] + AUGVIT

# timm's published counts (1000 classes). TNT-S: timm's current (non-legacy) tnt_s_patch16_224.
TIMM_PARAMS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "tnt_s_patch16_224": 23_768_584,
}
# AugViT (not in timm): DeiT + 4 circulant projections per block, each 16 * (dim / 4) weights + dim biases.
AUGVIT_PARAMS = {"augvit_tiny_patch16_224": 5_717_416 + 12 * 4 * (16 * 48 + 192),
                 "augvit_small_patch16_224": 22_050_664 + 12 * 4 * (16 * 96 + 384)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models, shared 2-core machine


def _randomize_(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g) * scale + (1.0 if k.endswith("norm1.weight") else 0.0))
    return model.eval()


# ------------------------------------------------------------------------------------- timm layouts

def _timm_vit_keys(D, depth=12, grid=14, patch=16, distilled=False, classes=1000):
    """timm VisionTransformer(/Distilled) state dict {key: shape}, from its layer definitions."""
    P = 2 if distilled else 1
    keys = {"cls_token": (1, 1, D), "pos_embed": (1, grid * grid + P, D),
            "patch_embed.proj.weight": (D, 3, patch, patch), "patch_embed.proj.bias": (D,)}
    if distilled:
        keys["dist_token"] = (1, 1, D)
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,),
                     b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                     b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                     b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                     b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                     b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    keys.update({"norm.weight": (D,), "norm.bias": (D,), "head.weight": (classes, D), "head.bias": (classes,)})
    if distilled:
        keys.update({"head_dist.weight": (classes, D), "head_dist.bias": (classes,)})
    return keys


def _timm_tnt_keys(D=384, c=24, depth=12, grid=14, pix=4, classes=1000):
    """timm tnt_s_patch16_224 (legacy=False) state dict {key: shape}."""
    n = pix * pix * c
    keys = {"cls_token": (1, 1, D), "patch_pos": (1, grid * grid + 1, D), "pixel_pos": (1, c, pix, pix),
            "pixel_embed.proj.weight": (c, 3, 7, 7), "pixel_embed.proj.bias": (c,),
            "norm1_proj.weight": (n,), "norm1_proj.bias": (n,), "proj.weight": (D, n), "proj.bias": (D,),
            "norm2_proj.weight": (D,), "norm2_proj.bias": (D,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm_in.weight": (c,), b + "norm_in.bias": (c,),
                     b + "attn_in.qk.weight": (2 * c, c), b + "attn_in.v.weight": (c, c),
                     b + "attn_in.proj.weight": (c, c), b + "attn_in.proj.bias": (c,),
                     b + "norm_mlp_in.weight": (c,), b + "norm_mlp_in.bias": (c,),
                     b + "mlp_in.fc1.weight": (4 * c, c), b + "mlp_in.fc1.bias": (4 * c,),
                     b + "mlp_in.fc2.weight": (c, 4 * c), b + "mlp_in.fc2.bias": (c,),
                     b + "norm1_proj.weight": (n,), b + "norm1_proj.bias": (n,), b + "proj.weight": (D, n),
                     b + "norm2_proj.weight": (D,), b + "norm2_proj.bias": (D,),
                     b + "norm_out.weight": (D,), b + "norm_out.bias": (D,),
                     b + "attn_out.qk.weight": (2 * D, D), b + "attn_out.v.weight": (D, D),
                     b + "attn_out.proj.weight": (D, D), b + "attn_out.proj.bias": (D,),
                     b + "norm_mlp.weight": (D,), b + "norm_mlp.bias": (D,),
                     b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                     b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    keys.update({"norm.weight": (D,), "norm.bias": (D,), "head.weight": (classes, D), "head.bias": (classes,)})
    return keys


EXPECTED_KEYS = {
    "deit_tiny_patch16_224": lambda: _timm_vit_keys(192),
    "deit_small_patch16_224": lambda: _timm_vit_keys(384),
    "deit_tiny_distilled_patch16_224": lambda: _timm_vit_keys(192, distilled=True),
    "deit_small_distilled_patch16_224": lambda: _timm_vit_keys(384, distilled=True),
    "tnt_s_patch16_224": _timm_tnt_keys,
}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_registered():
    assert set(ALL) <= set(list_models())


@pytest.mark.parametrize("name", ALL)
def test_deploy_cfg(name):
    cfg = get_deploy_cfg(name)
    assert cfg.input_size == (3, 224, 224) and cfg.interpolation == "bicubic" and cfg.num_classes == 1000
    if name.startswith("tnt"):  # timm's tnt cfg (and the Huawei release): Inception mean/std, crop 0.9
        assert cfg.mean == cfg.std == (0.5, 0.5, 0.5) and cfg.crop_pct == 0.9
    else:
        assert cfg.mean == IMAGENET_MEAN and cfg.std == IMAGENET_STD and cfg.crop_pct == 0.875


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_param_count_and_keys_equal_timm(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name]
    expected, got = EXPECTED_KEYS[name](), _shapes(model)
    assert sum(math.prod(s) for s in expected.values()) == TIMM_PARAMS[name]  # the layout itself adds up
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not wrong, dict(list(wrong.items())[:5])


def test_tnt_count_derivation():
    # tnt_s by hand: top (conv 3552, LN 768 + Linear 147840 + LN 768, cls 384, patch_pos 75648,
    # pixel_pos 384) + 12 blocks x 1,929,456 + norm 768 + head 385000. timm's legacy port (one
    # LayerNorm(24), proj with bias) has 23,755,336; the Huawei release adds a frozen outer_tokens
    # [1, 196, 384] (+75,264 = 23,843,848, its "23.8 M").
    top = 3552 + 768 + 147840 + 768 + 384 + 75648 + 384
    block = (48 + 2328 + 48 + 4728) + (768 + 147456 + 768) + (768 + 590208 + 768 + 1181568)
    assert top + 12 * block + 768 + 385000 == TIMM_PARAMS["tnt_s_patch16_224"]


@pytest.mark.parametrize("name", AUGVIT)
def test_augvit_params_and_official_keys(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == AUGVIT_PARAMS[name]
    sd = _shapes(model)
    D = model.embed_dim
    for mod in ("augs_attn", "augs", "augs_attn2", "augs2"):  # official Block(mode='circulant2') names
        assert sd[f"blocks.11.{mod}.0.weight_list"] == (16 * D // 4,)
        assert sd[f"blocks.11.{mod}.0.bias"] == (D,)
        assert sd[f"blocks.11.{mod}.0.index_matrix"] == (D, D)
    deit = _timm_vit_keys(D)
    assert set(deit) <= set(sd) and all(sd[k] == deit[k] for k in deit)


# -------------------------------------------------------------------------------------- reference numerics

def _ref_vit(model, x):
    """timm VisionTransformer.forward (fused_attn=False path), transcribed; 4-D matmuls, expand, select."""
    B = x.shape[0]
    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    prefix = [model.cls_token.expand(B, -1, -1)]
    if model.distilled:
        prefix.append(model.dist_token.expand(B, -1, -1))
    t = torch.cat(prefix + [t], dim=1) + model.pos_embed
    for blk in model.blocks:
        a = blk.attn
        y = blk.norm1(t)
        Bn, N, C = y.shape
        qkv = a.qkv(y).reshape(Bn, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
        t = t + a.proj((attn @ v).transpose(1, 2).reshape(Bn, N, C))
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
    t = model.norm(t)
    if model.distilled:
        return (model.head(t[:, 0]) + model.head_dist(t[:, 1])) / 2
    return model.head(t[:, 0])


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_deit_matches_timm_transcription(name):
    model = _randomize_(create_model(name, img_size=32, patch_size=8, depth=3, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, _ref_vit(model, x), rtol=1e-4, atol=1e-4)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        feats = model.forward_features(x)
        assert feats.shape == (2, 16 + model.num_prefix_tokens, 192)


def test_distilled_training_returns_both_heads():
    model = create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10)
    model.set_distilled_training(True)
    model.train()
    cls, dist = model(torch.randn(2, 3, 32, 32))
    assert cls.shape == dist.shape == (2, 10)
    (F.cross_entropy(cls, torch.tensor([1, 2])) + F.cross_entropy(dist, torch.tensor([3, 4]))).backward()
    assert model.head_dist.weight.grad is not None and model.dist_token.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)


def _ref_tnt(model, x):
    """timm TNT (legacy=False) forward, transcribed: nn.Unfold, 5-D qk reshape, in-place-free cat."""
    B, C, H, W = x.shape
    pe = model.pixel_embed
    p, N = pe.patch_size, model.num_patches
    u = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2).reshape(B * N, C, p, p)
    u = pe.proj(u) + model.pixel_pos
    pix = u.reshape(B * N, pe.in_dim, -1).transpose(1, 2)

    def attn(a, t):
        b, n, c = t.shape
        qk = a.qk(t).reshape(b, n, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qk.unbind(0)
        v = a.v(t).reshape(b, n, a.num_heads, -1).permute(0, 2, 1, 3)
        w = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)
        return a.proj((w @ v).transpose(1, 2).reshape(b, n, -1))

    def mlp(m, t):
        return m.fc2(F.gelu(m.fc1(t)))

    patch = model.norm2_proj(model.proj(model.norm1_proj(pix.reshape(B, N, -1))))
    patch = torch.cat((model.cls_token.expand(B, -1, -1), patch), dim=1) + model.patch_pos
    for blk in model.blocks:
        pix = pix + attn(blk.attn_in, blk.norm_in(pix))
        pix = pix + mlp(blk.mlp_in, blk.norm_mlp_in(pix))
        inner = blk.norm2_proj(blk.proj(blk.norm1_proj(pix.reshape(B, N, -1))))
        patch = torch.cat([patch[:, 0:1], patch[:, 1:] + inner], 1)
        patch = patch + attn(blk.attn_out, blk.norm_out(patch))
        patch = patch + mlp(blk.mlp, blk.norm_mlp(patch))
    return model.head(model.norm(patch)[:, 0])


def test_tnt_matches_timm_transcription():
    model = _randomize_(create_model("tnt_s_patch16_224", img_size=48, depth=2, num_classes=10))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _ref_tnt(model, x), rtol=1e-4, atol=1e-4)
        x1 = torch.randn(1, 3, 48, 48)  # batch 1 path (no expand)
        torch.testing.assert_close(model(x1), _ref_tnt(model, x1), rtol=1e-4, atol=1e-4)


_HW_TOP = {"pixel_embed": "patch_embed", "patch_pos": "outer_pos", "pixel_pos": "inner_pos",
           "norm1_proj": "proj_norm1", "norm2_proj": "proj_norm2"}
_HW_BLOCK = {"norm_in": "inner_norm1", "attn_in": "inner_attn", "norm_mlp_in": "inner_norm2", "mlp_in": "inner_mlp",
             "norm1_proj": "proj_norm1", "proj": "proj", "norm2_proj": "proj_norm2", "norm_out": "outer_norm1",
             "attn_out": "outer_attn", "norm_mlp": "outer_norm2", "mlp": "outer_mlp"}


def _huawei_layout(timm_sd):
    """A state dict laid out as the original Huawei tnt_pytorch release (its TNT/Block attribute names,
    `inner_pos` as [1, pixels, c], and the frozen `outer_tokens`), written per module path component."""
    out = {}
    for k, v in timm_sd.items():
        parts = k.split(".")
        if parts[0] == "blocks":
            parts[2] = _HW_BLOCK[parts[2]]
        elif parts[0] in _HW_TOP:
            parts[0] = _HW_TOP[parts[0]]
        if k == "pixel_pos":
            v = v.flatten(2).transpose(1, 2).contiguous()  # [1, c, 4, 4] -> [1, 16, c]
        out[".".join(parts)] = v
    pos = timm_sd["patch_pos"]
    out["outer_tokens"] = torch.zeros(1, pos.shape[1] - 1, pos.shape[2])
    return out


def test_tnt_huawei_checkpoint_filter(tmp_path):
    model = _randomize_(create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10), seed=3)
    hw = _huawei_layout(model.state_dict())
    # spot-check the original names (tnt_pytorch/tnt.py): the layout really is the Huawei one
    for k in ("patch_embed.proj.weight", "outer_pos", "inner_pos", "proj_norm1.weight", "blocks.1.inner_norm1.bias",
              "blocks.1.inner_attn.qk.weight", "blocks.1.inner_norm2.weight", "blocks.1.inner_mlp.fc2.bias",
              "blocks.1.proj_norm1.weight", "blocks.1.proj.weight", "blocks.1.outer_norm1.weight",
              "blocks.1.outer_attn.v.weight", "blocks.1.outer_norm2.bias", "blocks.1.outer_mlp.fc1.weight",
              "outer_tokens"):
        assert k in hw, k
    assert hw["inner_pos"].shape == (1, 16, 24)
    assert is_huawei_tnt(hw) and not is_huawei_tnt(model.state_dict())
    mapped = checkpoint_filter_fn(hw, model)
    assert _shapes_of(mapped) == _shapes(model)
    fresh = create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    fresh.load_state_dict(mapped, strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()  # timm: unchanged
    # a 224 px checkpoint filtered for a 32 px model: patch_pos resampled to its 2x2 grid
    big = create_model("tnt_s_patch16_224", depth=1, num_classes=10).state_dict()
    small = create_model("tnt_s_patch16_224", img_size=32, depth=1, num_classes=10)
    out = checkpoint_filter_fn(_huawei_layout(big), small)
    assert out["patch_pos"].shape == small.patch_pos.shape == (1, 5, 384)


def _shapes_of(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _official_circulant_index(in_f, out_f, num_cir):
    """Official Circulant_Linear index construction (scipy.linalg.circulant(range(b)), written out)."""
    min_f = min(in_f, out_f)
    n_in, n_out, b = num_cir * in_f // min_f, num_cir * out_f // min_f, min_f // num_cir
    circ = torch.tensor([[(i - j) % b for j in range(b)] for i in range(b)])  # first column 0..b-1
    rows = []
    for ib in range(n_out):
        rows.append(torch.cat([circ + (ib * n_in + jb) * b for jb in range(n_in)], dim=1))
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("in_f,out_f,num_cir", [(192, 192, 4), (16, 32, 4), (24, 12, 2)])
def test_circulant_index_matches_official(in_f, out_f, num_cir):
    assert torch.equal(circulant_index(in_f, out_f, num_cir), _official_circulant_index(in_f, out_f, num_cir))
    lin = CirculantLinear(in_f, out_f, num_cir=num_cir)
    w = lin.dense_weight()
    b = min(in_f, out_f) // num_cir
    blk = w[:b, :b]  # a circulant block: each row is the previous one rotated right by one
    assert torch.equal(blk[1], torch.roll(blk[0], 1))
    x = torch.randn(3, in_f)
    torch.testing.assert_close(lin(x), x @ w.T + lin.bias)


def _ref_augvit_block(blk, x):
    """Official Block.forward, mode 'circulant2'."""
    xn = blk.norm1(x)
    B, N, C = xn.shape
    a = blk.attn
    qkv = a.qkv(xn).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)
    y = a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    x = (x + y + blk.augs_attn(xn) + blk.augs_attn2(xn)) * 3.0 / 4
    xn = blk.norm2(x)
    return (x + blk.mlp(xn) + blk.augs(xn) + blk.augs2(xn)) * 3.0 / 4


def test_augvit_block_and_fold_for_export():
    model = _randomize_(create_model("augvit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = torch.randn(2, 17, 192)
        torch.testing.assert_close(model.blocks[0](t), _ref_augvit_block(model.blocks[0], t), rtol=1e-4, atol=1e-4)
        before = model(x)
        folded = copy.deepcopy(model).fold_for_export()
        after = folded(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)  # same weights, GEMM order may differ
    assert folded.folded and not any(isinstance(m, CirculantLinear) for m in folded.modules())
    keys = folded.state_dict()
    assert "blocks.0.augs_attn.0.weight" in keys and not any("weight_list" in k or "index_matrix" in k for k in keys)
    assert sum(p.numel() for p in folded.parameters()) > sum(p.numel() for p in model.parameters())  # dense now
    assert model.reparameterize.__func__ is model.fold_for_export.__func__


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "tnt_s_patch16_224", "augvit_tiny_patch16_224"])
def test_checkpoint_round_trip(name, tmp_path):
    kw = dict(img_size=32, depth=2, num_classes=10) | ({} if name.startswith("tnt") else {"patch_size": 8})
    model = _randomize_(create_model(name, **kw), seed=1)
    path = save_safetensors(model.state_dict(), tmp_path / "w.safetensors")
    loaded = create_model(name, checkpoint=str(path), **kw)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError, match="missing keys"):
        create_model(name, checkpoint=str(path), **{**kw, "depth": 3})


def test_set_input_size_resamples_pos_embed():
    model = _randomize_(create_model("deit_tiny_patch16_224", depth=1, num_classes=10))
    # create_model with a smaller DeployCfg (and no img_size) builds for the DeployCfg's size
    cfg = DeployCfg(input_size=(3, 64, 64), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10)
    small = create_model("deit_tiny_patch16_224", depth=1, deploy_cfg=cfg)
    assert small.img_size == (64, 64) and small.pos_embed.shape == (1, 17, 192)
    pe = model.pos_embed.detach().clone()
    model.set_input_size(64)
    assert model.pos_embed.shape == (1, 17, 192)
    assert torch.equal(model.pos_embed[:, :1], pe[:, :1])  # class token position untouched
    torch.testing.assert_close(model.pos_embed.detach(), resample_abs_pos_embed(pe, (4, 4), (14, 14), 1))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="does not match"):
        model(torch.randn(1, 3, 96, 96))
    tnt = create_model("tnt_s_patch16_224", depth=1, num_classes=10)
    tnt.set_input_size(32)
    with torch.no_grad():
        assert tnt(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_train_step_reaches_every_parameter():
    for name, kw in (("deit_tiny_distilled_patch16_224", {"patch_size": 8}), ("tnt_s_patch16_224", {}),
                     ("augvit_tiny_patch16_224", {"patch_size": 8, "keep_rate": 0.5, "keep_layers": (0,)})):
        model = create_model(name, img_size=32, depth=2, num_classes=10, drop_path_rate=0.1, **kw).train()
        F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 7])).backward()
        no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not no_grad, (name, no_grad[:5])


# --------------------------------------------------------------------------------------- token reduction

def _ref_evit_reduce(x, cls_attn, keep, P=1):
    """EViT (youweiliang/evit) with fuse_token=True, per sample: topk(keep) then the complement."""
    out = []
    for b in range(x.shape[0]):
        a = cls_attn[b, 0]  # [M]
        tokens = x[b, P:]
        idx = torch.topk(a, keep, largest=True, sorted=True).indices
        mask = torch.ones(a.shape[0], dtype=torch.bool)
        mask[idx] = False
        compl = torch.arange(a.shape[0])[mask]  # EViT's complement_idx: ascending
        fused = (tokens[compl] * a[compl, None]).sum(0, keepdim=True)
        out.append(torch.cat([x[b, :P], tokens[idx], fused], 0))
    return torch.stack(out)


def test_token_schedule_is_evit():
    # DeiT at 224: 196 patch tokens, keep 0.7 at blocks 3, 6, 9 (EViT's 4th, 7th, 10th layers)
    sched = token_schedule(196, 12, 0.7, (3, 6, 9))
    assert [k for m, k in sched if k < m] == [138, 98, 70]
    assert [m for m, _ in sched] == [196] * 4 + [139] * 3 + [99] * 3 + [71] * 2
    assert token_schedule(196, 12, 1.0, (3, 6, 9)) == [(196, 196)] * 12


@pytest.mark.parametrize("P", [1, 2])
def test_token_reducer_formulations_equal_evit(P):
    g = torch.Generator().manual_seed(0)
    B, M, C, k = 3, 23, 8, 16
    x = torch.randn(B, P + M, C, generator=g)
    a = torch.rand(B, 1, M, generator=g).softmax(-1)
    ref = _ref_evit_reduce(x, a, k, P)
    outs = {}
    for gather in ("topk", "onehot"):
        out = TokenReducer(M, k, P, gather)(x, a)
        assert out.shape == (B, P + k + 1, C)
        assert torch.equal(out[:, :P + k], ref[:, :P + k])  # prefix + kept tokens: exact copies, same order
        torch.testing.assert_close(out[:, -1], ref[:, -1], rtol=1e-6, atol=1e-6)  # fused: summation order
        outs[gather] = out
    # ties are broken by index (a stable descending sort), exactly, in the one-hot formulation
    a_tie = torch.tensor([[[0.1, 0.3, 0.3, 0.2, 0.1]]])
    red = TokenReducer(5, 3, 0, "onehot")
    assert red.ranks(a_tie).tolist() == [[[3.0, 0.0, 1.0, 2.0, 4.0]]]
    xt = torch.arange(5.0).reshape(1, 5, 1)
    assert red(xt, a_tie).flatten().tolist() == pytest.approx([1.0, 2.0, 3.0, 0.1 * 0 + 0.1 * 4])


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "augvit_tiny_patch16_224"])
def test_token_reduction_models_topk_equals_onehot(name):
    kw = dict(img_size=32, patch_size=4, depth=5, keep_layers=(1, 3), keep_rate=0.7, num_classes=10)
    onehot = _randomize_(create_model(name, gather="onehot", **kw), seed=2, scale=0.1)
    topk = create_model(name, gather="topk", **kw).eval()
    topk.load_state_dict(onehot.state_dict())  # no extra keys: reduction adds no parameters
    plain = create_model(name, depth=5, img_size=32, patch_size=4, num_classes=10)
    assert onehot.state_dict().keys() == plain.state_dict().keys()
    assert onehot.token_counts == [64, 64, 46, 46, 34, 34]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f1, f2 = onehot.forward_features(x), topk.forward_features(x)
        assert f1.shape == (2, onehot.num_prefix_tokens + 34, 192)
        torch.testing.assert_close(f1, f2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(onehot(x), topk(x), rtol=1e-5, atol=1e-5)
        dense = create_model(name, **{**kw, "keep_rate": 1.0}).eval()
        dense.load_state_dict(onehot.state_dict())
        assert (dense(x) - onehot(x)).abs().max() > 1e-4  # the reduction does change the computation


def test_token_reduction_default_layers_and_export_ir():
    model = create_model("deit_tiny_patch16_224", img_size=64, keep_rate=0.7, num_classes=10)  # 16 tokens
    assert model.keep_layers == (3, 6, 9)
    assert [i for i, b in enumerate(model.blocks) if b.reducer is not None] == [3, 6, 9]
    assert model.token_counts == [16] * 4 + [13] * 3 + [11] * 3 + [9] * 3
    ep = torch.export.export(model, (torch.randn(1, 3, 64, 64),))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [o for o in ops if any(b in o for b in ("topk", "gather", "index", "sort", "expand", "scaled_dot"))], ops


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, 2, "0.7", None, True])
def test_bad_keep_rate_is_user_error(bad):
    with pytest.raises(UserError, match=r"keep_rate must be a number in \(0, 1\]") as e:
        create_model("deit_tiny_patch16_224", keep_rate=bad)
    assert "\n" not in str(e.value)


def test_token_reduction_option_errors():
    with pytest.raises(UserError, match=r"unknown gather 'dense' \(choose from: topk, onehot\)"):
        create_model("deit_tiny_patch16_224", keep_rate=0.7, gather="dense")
    with pytest.raises(UserError, match=r"keep_layers must be block indices in 0\.\.11"):
        create_model("augvit_tiny_patch16_224", keep_rate=0.7, keep_layers=(3, 12))
    for kw in ({"keep_rate": 0.7}, {"gather": "onehot"}, {"keep_layers": (1,)}):
        with pytest.raises(UserError, match="TNT has no token reduction.*deit_\\* and augvit_\\*"):
            create_model("tnt_s_patch16_224", **kw)


@pytest.mark.parametrize("name", ["mobilevit_xxs", "cmt_ti"])
def test_token_reduction_on_a_model_without_it_is_a_user_error(name):
    from mobilevit_deploy.errors import UserError
    from mobilevit_deploy.models import create_model

    with pytest.raises(UserError, match="has no option 'keep_rate'.*deit_"):
        create_model(name, keep_rate=0.7)
