"""DynamicViT and Patch Slimming on DeiT (models/deit.py, models/patch_slim.py, train/token_losses.py),
model options from the CLI and checkpoint JSON (models/options.py), and the Huawei TNT layout through
load_checkpoint.

The reference functions below are transcriptions of the official DynamicViT code (raoyongming/DynamicViT:
`PredictorLG`, `softmax_with_policy`, `batch_index_select` inference, `DistillDiffPruningLoss`), run with
our modules' weights.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mobilevit_deploy.checkpoint import load_checkpoint, save_safetensors
from mobilevit_deploy.errors import CheckpointError, UserError
from mobilevit_deploy.models import IMAGENET_MEAN, IMAGENET_STD, DeployCfg, create_model
from mobilevit_deploy.models.deit import dynamicvit_schedule, softmax_with_policy
from mobilevit_deploy.models.options import parse_model_args, recorded_model_kwargs
from mobilevit_deploy.models.patch_slim import (
    calibrate_patch_slimming,
    evit_cost,
    load_calibration_images,
    record_kwargs,
    schedule_cost,
    slim_schedule,
)
from mobilevit_deploy.train.losses import kd_loss
from mobilevit_deploy.train.token_losses import dynamicvit_terms, ratio_loss, token_distill_loss

ROOT = Path(__file__).resolve().parents[1]
NAME = "deit_tiny_patch16_224"
SMALL = dict(img_size=32, patch_size=8, num_classes=10)  # 16 patch tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models, shared 2-core machine


def _randomize_(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g) * scale + (1.0 if "norm" in k and k.endswith("weight")
                                                                    else 0.0))
    return model


def _dvit(depth=4, keep_rate=0.7, keep_layers=(1, 2, 3), **kw):
    return create_model(NAME, depth=depth, token_reduction="dynamicvit", keep_rate=keep_rate, keep_layers=keep_layers,
                        **SMALL, **kw)


# ------------------------------------------------------------------------------- official transcriptions

def _ref_predictor(pred, x, policy):
    """raoyongming/DynamicViT PredictorLG.forward."""
    x = pred.in_conv(x)
    B, N, C = x.size()
    local_x = x[:, :, :C // 2]
    global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
    x = torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1)
    return pred.out_conv(x)


def _ref_softmax_with_policy(attn, policy, eps=1e-6):
    """Official softmax_with_policy on [B, H, N, N] attention logits, policy [B, N, 1]."""
    B, N, _ = policy.size()
    B, H, N, N = attn.size()
    attn_policy = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, N, N)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    attn = attn.to(torch.float32).exp_() * attn_policy.to(torch.float32)
    attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


def _batch_index_select(x, idx):
    B, N, C = x.size()
    N_new = idx.size(1)
    offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
    idx = idx + offset
    return x.reshape(B * N, C)[idx.reshape(-1)].reshape(B, N_new, C)


def _ref_dvit_inference(model, x):
    """Official VisionTransformerDiffPruning.forward, eval branch (argsort + batch_index_select)."""
    B = x.shape[0]
    t = model._pos_embed(model.patch_embed(x))
    init_n = t.shape[1] - 1
    prev_decision = torch.ones(B, init_n, 1)
    p = 0
    for i, blk in enumerate(model.blocks):
        if i in model.keep_layers:
            spatial_x = t[:, 1:]
            pred_score = _ref_predictor(model.score_predictor[p], spatial_x, prev_decision).reshape(B, -1, 2)
            score = pred_score[:, :, 0]
            num_keep_node = int(init_n * model.keep_rate ** (p + 1))
            keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep_node]
            cls_policy = torch.zeros(B, 1, dtype=keep_policy.dtype)
            now_policy = torch.cat([cls_policy, keep_policy + 1], dim=1)
            t = _batch_index_select(t, now_policy)
            prev_decision = _batch_index_select(prev_decision, keep_policy)
            p += 1
        t = blk(t)
    return model.head(model.norm(t)[:, 0])


# ------------------------------------------------------------------------------------------- DynamicViT

def test_dynamicvit_params_and_official_keys():
    dense = create_model(NAME, num_classes=10)
    model = create_model(NAME, num_classes=10, token_reduction="dynamicvit", keep_rate=0.7)
    D = 192  # PredictorLG(192): LN + Linear(D, D) + Linear(D, D/2) + Linear(D/2, D/4) + Linear(D/4, 2)
    per = 2 * D + (D * D + D) + (D * D // 2 + D // 2) + (D // 2 * D // 4 + D // 4) + (D // 4 * 2 + 2)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert per == 60_722 and n(model) == n(dense) + 3 * per
    keys = set(model.state_dict()) - set(dense.state_dict())
    assert keys == {f"score_predictor.{s}.{m}.{p}" for s in range(3) for m in
                    ("in_conv.0", "in_conv.1", "out_conv.0", "out_conv.2", "out_conv.4") for p in ("weight", "bias")}
    assert model.token_counts == [196] * 3 + [137] * 3 + [96] * 3 + [67] * 3 + [67]  # int(196 * 0.7^s)
    assert dynamicvit_schedule(64, 0.5, 3) == [32, 16, 8]


def test_predictor_matches_official():
    model = _randomize_(_dvit())
    pred = model.score_predictor[0]
    x = torch.randn(2, 16, 192)
    policy = (torch.rand(2, 16, 1) > 0.3).float()
    torch.testing.assert_close(pred(x, policy), _ref_predictor(pred, x, policy))
    ones = torch.ones(2, 16, 1)
    torch.testing.assert_close(pred(x), _ref_predictor(pred, x, ones))
    # inference form (constants for M tokens): z_keep - z_drop, ordered as the official log p_keep
    stage = model.dvit_reducers[0]
    s = pred(x, consts=stage)[..., 0]
    ref = _ref_predictor(pred, x, ones)[..., 0]
    assert torch.equal(torch.argsort(s, 1, descending=True), torch.argsort(ref, 1, descending=True))


def test_softmax_with_policy_matches_official():
    B, H, N = 2, 3, 7
    logits = torch.randn(H * B, N, N)
    policy = (torch.rand(B, N, 1) > 0.4).float()
    ours = softmax_with_policy(logits, policy, H)  # head-major [H * B, N, N]
    ref = _ref_softmax_with_policy(logits.reshape(H, B, N, N).transpose(0, 1), policy)  # [B, H, N, N]
    torch.testing.assert_close(ours, ref.transpose(0, 1).reshape(H * B, N, N))


@pytest.mark.parametrize("gather", ["onehot", "topk"])
def test_dynamicvit_inference_matches_official(gather):
    model = _randomize_(_dvit(gather=gather), seed=1).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _ref_dvit_inference(model, x), rtol=1e-4, atol=1e-4)
        assert model(x[:1]).shape == (1, 10)


def test_dynamicvit_training_gradients_reach_predictor():
    torch.manual_seed(0)
    model = _dvit().train()
    teacher = create_model(NAME, depth=2, **SMALL).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    decisions, tokens, mask = model.dvit_out
    assert len(decisions) == 3 and all(d.shape == (4, 16) for d in decisions)
    assert tokens.shape == (4, 16, 192) and mask.shape == (4, 16)
    for a, b in zip(decisions, decisions[1:]):  # nested: a token dropped at stage s stays dropped
        assert torch.all(b <= a)
    with torch.no_grad():
        t_feats = teacher.forward_features(x)
        t_logits = teacher.forward_head(t_feats)
    terms = dynamicvit_terms(model, t_feats)
    assert set(terms) == {"ratio", "token_kd"}
    # the ratio loss alone already trains every predictor (straight-through Gumbel-softmax)
    terms["ratio"].backward(retain_graph=True)
    for pred in model.score_predictor:
        g = pred.out_conv[4].weight.grad
        assert g is not None and g.abs().sum() > 0
    model.zero_grad()
    loss = F.cross_entropy(logits, y) + 0.5 * kd_loss(logits, t_logits) + 0.5 * terms["token_kd"] + \
        2.0 * terms["ratio"]
    loss.backward()
    for s, pred in enumerate(model.score_predictor):  # the task loss too reaches them (through the masks)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pred.parameters()), s
        assert pred.in_conv[1].weight.grad.abs().sum() > 0, s
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.dvit_out is None


def test_ratio_loss_is_the_papers():
    # L_ratio = 1/(B*S) sum_b sum_s (rho_s - 1/N sum_i D_i^{b,s})^2
    d1 = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)  # kept 3/4, 1/4
    d2 = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)  # kept 2/4, 0
    rho = [0.7, 0.49]
    expected = ((0.75 - 0.7) ** 2 + (0.25 - 0.7) ** 2 + (0.5 - 0.49) ** 2 + (0.0 - 0.49) ** 2) / (2 * 2)
    assert math.isclose(float(ratio_loss([d1, d2], rho)), expected, rel_tol=1e-6)
    # and the official DistillDiffPruningLoss form: sum_s ((score.mean(1) - ratio[s]) ** 2).mean() / len(loc)
    official = sum(((d.mean(1) - r) ** 2).mean() for d, r in zip([d1, d2], rho)) / 2
    assert math.isclose(float(ratio_loss([d1, d2], rho)), float(official), rel_tol=1e-6)
    model = _dvit(keep_rate=0.5)
    assert model.dvit_keep_ratios == [0.5, 0.25, 0.125]


def test_token_distill_loss_is_the_official_mse():
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float32)
    keep = mask.reshape(-1) > 0.5
    ref = torch.pow(s.reshape(10, 8)[keep] - t.reshape(10, 8)[keep], 2).mean()
    torch.testing.assert_close(token_distill_loss(s, t, mask), ref)
    assert float(token_distill_loss(s, t, torch.zeros(2, 5))) == 0.0


def test_dense_checkpoint_initialises_dynamicvit(tmp_path):
    dense = _randomize_(create_model(NAME, depth=4, **SMALL), seed=2)
    ck = tmp_path / "dense.safetensors"
    save_safetensors(dense.state_dict(), ck)
    m = _dvit()
    before = m.score_predictor[0].in_conv[1].weight.clone()
    load_checkpoint(m, ck)  # every predictor key missing: the predictors keep their initialisation
    assert torch.equal(m.score_predictor[0].in_conv[1].weight, before)
    assert torch.equal(m.blocks[2].attn.qkv.weight, dense.blocks[2].attn.qkv.weight)
    partial = dict(m.state_dict())
    del partial["score_predictor.1.out_conv.4.bias"]
    save_safetensors(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="score_predictor.1.out_conv.4.bias"):
        load_checkpoint(_dvit(), tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="unexpected"):  # a dense model takes no predictor keys
        load_checkpoint(create_model(NAME, depth=4, **SMALL), tmp_path / "partial.safetensors")


# --------------------------------------------------------------------------------------- Patch Slimming

def _real_images(model, n=20):
    cfg = DeployCfg(input_size=(3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10)
    x, note = load_calibration_images(None, cfg, n)  # the shipped sample images (real CIFAR-10 photos)
    assert "samples" in note
    return x


def test_patch_slim_calibration_is_nested_and_within_budget():
    torch.manual_seed(0)
    model = _randomize_(create_model(NAME, depth=4, img_size=32, patch_size=4, num_classes=10), seed=4, scale=0.1)
    x = _real_images(model)
    rec = calibrate_patch_slimming(model, x, 0.5, keep_layers=(1, 2, 3))
    order, counts = rec["slim_order"], rec["slim_counts"]
    assert sorted(order) == list(range(64)) and len(counts) == 5
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[-1] == 0  # only the class token leaves
    assert schedule_cost(counts, 192, 1) <= evit_cost(64, 4, 0.5, (1, 2, 3), 192, 1)
    assert rec["patch_slim"]["calibration_images"] == 20
    m = create_model(NAME, depth=4, img_size=32, patch_size=4, num_classes=10, **record_kwargs(rec))
    assert m.token_counts == counts
    # eps = 0: every patch reaches the last attention, whose MLP runs on the class token alone -> exact
    o0, c0 = slim_schedule(torch.rand(4, 65, 65) + 0.01, 1, 0.0)
    assert c0 == [64, 64, 64, 64, 0]
    full = create_model(NAME, depth=4, img_size=32, patch_size=4, num_classes=10, token_reduction="patch_slim",
                        slim_order=o0, slim_counts=c0)
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(full.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-4)


def test_patch_slim_equals_masked_reference():
    """The sliced model equals running the dense blocks on the explicit kept index sets (module docstring)."""
    model = _randomize_(create_model(NAME, depth=3, **SMALL), seed=5).eval()
    order = [5, 2, 9, 0, 15, 7, 1, 3, 4, 6, 8, 10, 11, 12, 13, 14]
    counts = [10, 6, 3, 0]
    slim = create_model(NAME, depth=3, **SMALL, token_reduction="patch_slim", slim_order=order, slim_counts=counts)
    slim.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = model._pos_embed(model.patch_embed(x))
        t = torch.cat([t[:, :1], t[:, 1:][:, order[:counts[0]]]], 1)
        for i, blk in enumerate(model.blocks):
            t = t + blk.attn(blk.norm1(t))[0]
            t = t[:, :1 + counts[i + 1]]
            t = t + blk.mlp(blk.norm2(t))
        ref = model.head(model.norm(t)[:, 0])
        torch.testing.assert_close(slim.eval()(x), ref, rtol=1e-5, atol=1e-5)


def test_patch_slim_bad_records():
    with pytest.raises(UserError, match="needs slim_order and slim_counts"):
        create_model(NAME, **SMALL, token_reduction="patch_slim")
    with pytest.raises(UserError, match="permutation"):
        create_model(NAME, depth=1, **SMALL, token_reduction="patch_slim", slim_order=[0, 1], slim_counts=[2, 0])
    with pytest.raises(UserError, match="non-increasing"):
        create_model(NAME, depth=1, **SMALL, token_reduction="patch_slim", slim_order=list(range(16)),
                     slim_counts=[4, 8])


# ------------------------------------------------------------------------------------------ bad options

@pytest.mark.parametrize("kw,match", [
    (dict(keep_rate=1.5), r"keep_rate must be a number in \(0, 1\]"),
    (dict(keep_rate=0), r"keep_rate must be a number in \(0, 1\]"),
    (dict(token_reduction="tome"), r"unknown token_reduction 'tome' \(choose from: evit, dynamicvit, patch_slim\)"),
    (dict(token_reduction="dynamicvit"), "needs a keep_rate in"),
])
def test_bad_token_reduction_options(kw, match):
    with pytest.raises(UserError, match=match):
        create_model(NAME, **SMALL, **kw)


def test_no_token_reduction_models():
    with pytest.raises(UserError, match="has no option 'keep_rate'"):
        create_model("mobilevit_xxs", keep_rate=0.7)
    with pytest.raises(UserError, match="TNT has no token reduction"):
        create_model("tnt_s_patch16_224", keep_rate=0.7)
    with pytest.raises(UserError, match="deit_\\* models only"):
        create_model("augvit_tiny_patch16_224", token_reduction="dynamicvit", keep_rate=0.7)


def test_parse_model_args():
    assert parse_model_args(["keep_rate=0.7", "keep_layers=[3, 6]", "gather=topk"]) == {
        "keep_rate": 0.7, "keep_layers": [3, 6], "gather": "topk"}
    for bad in (["keep_rate"], ["=3"], ["keep_rate=[1,"], ["a=1", "a=2"]):
        with pytest.raises(UserError, match="--model-arg"):
            parse_model_args(bad)


def test_checkpoint_json_model_kwargs(tmp_path):
    m = _randomize_(_dvit(depth=2, keep_layers=(1,)), seed=6).eval()
    ck = tmp_path / "model.safetensors"
    save_safetensors(m.state_dict(), ck)
    kw = {"img_size": 32, "patch_size": 8, "depth": 2, "token_reduction": "dynamicvit", "keep_rate": 0.7,
          "keep_layers": [1]}
    (tmp_path / "model.json").write_text(json.dumps({"model": NAME, "model_kwargs": kw}))
    assert recorded_model_kwargs(ck) == kw
    back = create_model(NAME, num_classes=10, checkpoint=str(ck))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    other = create_model(NAME, num_classes=10, checkpoint=str(ck), keep_rate=0.5)  # explicit options win
    assert other.token_counts[-1] == 8


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("args,msg", [
    (["--model", NAME, "--model-arg", "keep_rate=1.5"], "keep_rate must be a number in (0, 1]"),
    (["--model", "mobilevit_xxs", "--model-arg", "keep_rate=0.7"], "has no option 'keep_rate'"),
    (["--model", NAME, "--model-arg", "token_reduction=magic"], "choose from: evit, dynamicvit, patch_slim"),
    (["--model", NAME, "--model-arg", "keep_rate"], "--model-arg expects KEY=VALUE"),
])
def test_export_cli_bad_model_args(args, msg, tmp_path):
    r = _cli("mobilevit_deploy.export", "--target", "onnx", "--out", str(tmp_path / "out"), *args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_evaluate_cli_bad_model_arg(tmp_path):
    r = _cli("mobilevit_deploy.evaluate", "--data", str(ROOT / "mobilevit_deploy/assets/samples"), "--model-arg",
             "keep_rate=0.7")
    assert r.returncode == 2 and "error:" in r.stderr


# --------------------------------------------------------------------------------- export / delegation

def _export(model, name, tmp_path):
    from mobilevit_deploy.export import ExportConfig, ModelSource, export_model

    return export_model(ModelSource(name, module=model), ExportConfig.from_dict({"target": "executorch"}),
                        out_dir=tmp_path, log=None).manifest


@pytest.mark.parametrize("gather,outside", [("onehot", set()), ("topk", {"aten.topk.default", "aten.gather.default"})])
def test_dynamicvit_executorch_delegation(gather, outside, tmp_path):
    cfg = DeployCfg(input_size=(3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10)
    torch.manual_seed(0)
    model = create_model(NAME, img_size=32, patch_size=4, depth=2, deploy_cfg=cfg, token_reduction="dynamicvit",
                         keep_rate=0.7, keep_layers=(0, 1), gather=gather)
    m = _export(model, f"dvit_{gather}", tmp_path)
    assert m["verification"]["passed"] and m["verification"]["sqnr_db"] > 60
    ops = set(m["ops_not_delegated"])
    assert ops == set() if gather == "onehot" else outside <= ops, ops


def test_patch_slim_executorch_delegation(tmp_path):
    cfg = DeployCfg(input_size=(3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10)
    torch.manual_seed(0)
    model = create_model(NAME, img_size=32, patch_size=4, depth=2, deploy_cfg=cfg, token_reduction="patch_slim",
                         slim_order=list(range(64))[::-1], slim_counts=[50, 30, 0])
    m = _export(model, "slim", tmp_path)
    assert m["verification"]["passed"] and m["ops_not_delegated"] == []


# ------------------------------------------------------------------------------------- TNT, Huawei layout

def test_tnt_huawei_checkpoint_through_load_checkpoint(tmp_path):
    from test_plain_vit_models import _huawei_layout

    model = _randomize_(create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10), seed=7).eval()
    hw = _huawei_layout(model.state_dict())
    assert "outer_pos" in hw and "blocks.0.outer_attn.qk.weight" in hw and "outer_tokens" in hw
    ck = tmp_path / "tnt_huawei.pth"
    torch.save({"model": hw}, ck)
    fresh = create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10, checkpoint=str(ck))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    hw_bad = dict(hw)
    del hw_bad["blocks.1.outer_mlp.fc1.weight"]
    torch.save(hw_bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc1.weight"):
        create_model("tnt_s_patch16_224", img_size=32, depth=2, num_classes=10, checkpoint=str(tmp_path / "bad.pth"))


# ------------------------------------------------------------------------------------------ the trainer

@pytest.mark.slow
def test_trainer_dynamicvit_finetune(tmp_path):
    """A few steps of the DynamicViT recipe from a dense checkpoint: the loss parts are logged, model.json
    records model_kwargs, and the weights rebuild through create_model(checkpoint=...)."""
    data = ROOT.parent / "shared/data/cifar10"
    if not data.is_dir():
        pytest.skip("needs ../shared/data/cifar10")
    from mobilevit_deploy.train import train
    from mobilevit_deploy.train.config import load_recipe

    kw = {"img_size": 32, "patch_size": 8, "depth": 2}
    dense = create_model(NAME, num_classes=10, **kw)
    save_safetensors(dense.state_dict(), tmp_path / "dense.safetensors")
    cfg = load_recipe(ROOT / "recipes/deit_tiny_cifar10_finetune.yaml", [
        f"data.root={data}", "data.limit_train=16", "data.limit_val=10", "data.batch_size=8", "progress=false",
        f"model.init_checkpoint={tmp_path / 'dense.safetensors'}",
        "model.kwargs=" + json.dumps({**kw, "token_reduction": "dynamicvit", "keep_rate": 0.5, "keep_layers": [1]}),
        f"distill.teacher={NAME}", f"distill.teacher_checkpoint={tmp_path / 'dense.safetensors'}",
        "distill.teacher_kwargs=" + json.dumps(kw), "distill.kd_weight=0.5", "distill.token_weight=0.5"])
    res = train(cfg, out=tmp_path / "run")
    row = res.metrics[-1]
    assert {"train_ratio", "train_token_kd", "train_kd"} <= set(row), row
    meta = json.loads((tmp_path / "run/model.json").read_text())
    assert meta["model_kwargs"]["token_reduction"] == "dynamicvit"
    back = create_model(NAME, num_classes=10, checkpoint=str(tmp_path / "run/model.safetensors"))
    assert back.token_counts == [16, 8, 8]
