"""CMT (models/cmt.py): shapes, official parameter layout and count, FLOPs, export, checkpoints, input sizes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mobilevit_deploy.checkpoint import save_safetensors
from mobilevit_deploy.errors import CheckpointError
from mobilevit_deploy.models import IMAGENET_MEAN, IMAGENET_STD, DeployCfg, create_model, get_deploy_cfg
from mobilevit_deploy.models.cmt import model_cfgs, resize_rel_pos


def _randomize_bn_stats(model, seed=0):
    """Non-trivial BN running stats, so eval-mode BN is not an identity and buffers are really compared."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def cmt_ti():
    torch.manual_seed(0)
    return _randomize_bn_stats(create_model("cmt_ti"))


def test_deploy_cfg_matches_official_eval():
    # Official datasets.py: Resize(int(256 / 224 * size), bicubic) + CenterCrop(size), ImageNet mean/std.
    for name, size in (("cmt_ti", 160), ("cmt_xs", 192), ("cmt_s", 224), ("cmt_b", 256)):
        cfg = get_deploy_cfg(name)
        assert cfg.input_size == (3, size, size) and model_cfgs[name]["img_size"] == size
        assert cfg.mean == IMAGENET_MEAN and cfg.std == IMAGENET_STD
        assert cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"


def test_cmt_ti_forward_shapes(cmt_ti):
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        feats = cmt_ti.forward_features(x)
        logits = cmt_ti.forward_head(feats)
        pooled = cmt_ti.forward_head(feats, pre_logits=True)
    assert feats.shape == (2, 1280, 5, 5)  # 160 / 32, after the 1x1 conv to 1280 (before pooling)
    assert pooled.shape == (2, 1280)
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(cmt_ti.head(pooled), logits)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,size,params",
    # Parameter counts of the official cmt.py structure built at the same input size (official
    # constructors + train.py's img_size=--input-size); see test_cmt_ti_parameter_count.
    [("cmt_xs", 192, 15_247_208), ("cmt_s", 224, 26_256_160), ("cmt_b", 256, 45_715_076)],
)
def test_larger_variants_forward_and_params(name, size, params):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, size, size))
    assert feats.shape == (1, 1280, size // 32, size // 32)
    assert model.forward_head(feats).shape == (1, 1000)


def test_cmt_ti_parameter_count(cmt_ti):
    # The official CMT(img_size=160) (cmt_ti, trained with --input-size 160) has 9,492,426 parameters,
    # 75,000 of them the four relative position biases [h, N, N / sr^2]: 1*1600*25 + 2*400*25 + 4*100*25
    # + 8*25*25. The paper's 9.49 M.
    n = sum(p.numel() for p in cmt_ti.parameters())
    assert n == 9_492_426
    assert round(n / 1e6, 2) == 9.49
    bias = sum(getattr(cmt_ti, f"relative_pos_{s}").numel() for s in "abcd")
    assert bias == 75_000


def test_cmt_ti_official_state_dict_layout(cmt_ti):
    sd = cmt_ti.state_dict()
    expected = {
        "stem_conv1.weight": (16, 3, 3, 3),
        "stem_norm3.running_var": (16,),
        "patch_embed_a.proj.weight": (46, 16, 2, 2),
        "patch_embed_d.norm.weight": (368,),
        "relative_pos_a": (1, 1600, 25),
        "relative_pos_b": (2, 400, 25),
        "relative_pos_c": (4, 100, 25),
        "relative_pos_d": (8, 25, 25),
        "blocks_a.0.proj.weight": (46, 1, 3, 3),  # LPU
        "blocks_a.1.attn.sr.0.weight": (46, 1, 8, 8),
        "blocks_a.1.attn.sr.1.num_batches_tracked": (),
        "blocks_c.9.attn.q.bias": (184,),
        "blocks_c.9.attn.sr.0.weight": (184, 1, 2, 2),
        "blocks_d.1.attn.proj.weight": (368, 368),
        "blocks_d.1.mlp.conv1.0.weight": (1324, 368, 1, 1),  # int(368 * 3.6)
        "blocks_d.1.mlp.conv1.2.running_mean": (1324,),
        "blocks_d.1.mlp.proj.weight": (1324, 1, 3, 3),
        "blocks_d.1.mlp.proj_bn.weight": (1324,),
        "blocks_d.1.mlp.conv2.1.bias": (368,),
        "_fc.weight": (1280, 368, 1, 1),
        "_bn.running_var": (1280,),
        "head.weight": (1000, 1280),
    }
    for k, shape in expected.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    # sr ratio 1 in the last stage: no spatial-reduction conv, as in the official code.
    assert not any(k.startswith("blocks_d.") and ".attn.sr." in k for k in sd)
    assert len([k for k in sd if k.startswith("blocks_c.")]) == 10 * len([k for k in sd if k.startswith("blocks_c.0.")])


def test_cmt_ti_flops(cmt_ti):
    # FlopCounterMode counts conv / matmul FLOPs = 2 x multiply-adds. The paper's 0.65 G "FLOPs" are
    # multiply-adds (official train.py: torchprofile.profile_macs), which also counts the element-wise
    # multiplies of norms, scaling and activations that FlopCounterMode skips, so our count sits a few
    # percent below; a wrong width, ratio, depth or sr ratio moves it by more than the band below.
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cmt_ti(torch.randn(1, 3, 160, 160))
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert 0.62 <= gmacs <= 0.66, gmacs


def test_cmt_ti_torch_export(cmt_ti):
    x = torch.randn(1, 3, 160, 160)
    ep = torch.export.export(cmt_ti, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("scaled_dot_product" in t for t in targets), targets
    assert not any("upsample" in t or "interpolate" in t for t in targets), targets  # bias used as built
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), cmt_ti(x), rtol=1e-5, atol=1e-5)


def test_cmt_ti_checkpoint_roundtrip(cmt_ti, tmp_path):
    path = save_safetensors(cmt_ti.state_dict(), tmp_path / "cmt_ti.safetensors")
    loaded = create_model("cmt_ti", checkpoint=str(path))
    a, b = cmt_ti.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(cmt_ti(x), loaded(x))


def test_img_size_kwarg_builds_bias_for_that_size(tmp_path, monkeypatch):
    # A CIFAR recipe at 96 px: create_model('cmt_ti', img_size=96) (+ its DeployCfg override).
    cfg = DeployCfg(input_size=(3, 96, 96), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10)
    model = _randomize_bn_stats(create_model("cmt_ti", img_size=96, deploy_cfg=cfg))
    assert model.deploy_cfg.image_size == (96, 96)
    shapes = [tuple(getattr(model, f"relative_pos_{s}").shape) for s in "abcd"]
    assert shapes == [(1, 576, 9), (2, 144, 9), (4, 36, 9), (8, 9, 9)]  # grids 24, 12, 6, 3; keys 3x3
    x = torch.randn(1, 3, 96, 96)
    path = save_safetensors(model.state_dict(), tmp_path / "cmt_ti_96.safetensors")
    again = create_model("cmt_ti", img_size=96, deploy_cfg=cfg, checkpoint=str(path))
    def no_resize(*args, **kwargs):
        raise AssertionError("the bias was resized although the model was built for 96 px")

    monkeypatch.setattr(F, "interpolate", no_resize)  # built for 96 px: the bias is used as is
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 10)
        assert torch.equal(out, again(x))
    monkeypatch.undo()
    # Without img_size the model is built for its DeployCfg's size, so the export and evaluate
    # commands (which pass the deploy_cfg stored beside a checkpoint) load these weights as they are.
    from_cfg = create_model("cmt_ti", deploy_cfg=cfg, checkpoint=str(path))
    assert tuple(from_cfg.relative_pos_a.shape) == (1, 576, 9)
    with torch.no_grad():
        assert torch.equal(from_cfg(x), out)
    # Loaded into a model built for the default 160 px, the bias shapes do not match: a clear error.
    with pytest.raises(CheckpointError, match="relative_pos_a"):
        create_model("cmt_ti", checkpoint=str(path))


def test_other_input_size_resizes_bias_on_the_fly(cmt_ti):
    x = torch.randn(1, 3, 96, 96)
    resized = copy.deepcopy(cmt_ti)
    resized.set_input_size(96)
    assert tuple(resized.relative_pos_a.shape) == (1, 576, 9)
    with torch.no_grad():
        out = cmt_ti(x)  # built for 160: bias interpolated in forward
        torch.testing.assert_close(out, resized(x))
    assert out.shape == (1, 1000)
    with torch.no_grad():
        assert cmt_ti(torch.randn(1, 3, 64, 80)).shape == (1, 1000)  # non-square, grids 16x20 ... 2x2(3)


def test_resize_rel_pos_keeps_query_and_key_axes_apart():
    # A bias that depends only on the key position must stay query-independent after resizing, and its
    # key map must be the 2-D bicubic resize of the original; the same the other way round.
    key_map = torch.randn(2, 5, 5)  # [h, Hk, Wk]
    bias = key_map.reshape(2, 1, 25).expand(2, 1600, 25)  # [h, 40*40, 5*5]
    out = resize_rel_pos(bias, (40, 40), (5, 5), (24, 24), (3, 3))
    assert out.shape == (2, 576, 9)
    want = F.interpolate(key_map[:, None], size=(3, 3), mode="bicubic", align_corners=False).reshape(2, 1, 9)
    torch.testing.assert_close(out, want.expand(2, 576, 9))

    query_map = torch.randn(2, 10, 10)
    bias = query_map.reshape(2, 100, 1).expand(2, 100, 25)
    out = resize_rel_pos(bias, (10, 10), (5, 5), (6, 6), (3, 3))
    want = F.interpolate(query_map[:, None], size=(6, 6), mode="bicubic", align_corners=False).reshape(2, 36, 1)
    torch.testing.assert_close(out, want.expand(2, 36, 9))
    assert resize_rel_pos(bias, (10, 10), (5, 5), (10, 10), (5, 5)) is bias  # same grid: untouched


def test_too_small_input_fails_clearly(cmt_ti):
    with pytest.raises(ValueError, match="too small for CMT"):
        create_model("cmt_ti", img_size=24)
    with pytest.raises(ValueError, match="too small for CMT"), torch.no_grad():
        cmt_ti(torch.randn(1, 3, 30, 30))


def test_train_step_reaches_every_parameter():
    model = create_model("cmt_ti", num_classes=10, img_size=64, drop_path_rate=0.1).train()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad[:5]
    assert model.relative_pos_a.grad.abs().sum() > 0
