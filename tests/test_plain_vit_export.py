"""Plain-ViT family through the export pipeline: Core ML, ExecuTorch (XNNPACK) and ONNX, verified as
every export is (the pipeline's own verification block), plus which ops each token-reduction
formulation leaves outside the XNNPACK delegate.

Fast tests: depth-1 models at 32 px (the registered constructors with `img_size`/`depth`), one test
per (family, target). Slow tests: the registered models at 224 px, and the token-reduction
formulations at 224. AugViT is exported after `fold_for_export()` (its circulant weight is an index
op otherwise, which XNNPACK does not take; test_augvit_unfolded_leaves_index_outside).
"""
from __future__ import annotations

import pytest
import torch

from mobilevit_deploy.models import IMAGENET_MEAN, IMAGENET_STD, DeployCfg, create_model, get_deploy_cfg

FAMILIES = {  # registered name, constructor kwargs for the fast 32 px export
    "deit": ("deit_tiny_patch16_224", dict(patch_size=8)),
    "tnt": ("tnt_s_patch16_224", {}),
    "augvit": ("augvit_tiny_patch16_224", dict(patch_size=8)),
}
TARGETS = ("coreml", "executorch", "onnx")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models, shared 2-core machine


def _export(module, name, target, out_dir):
    """One export through the pipeline (ModelSource with the module, default config for the target)."""
    from mobilevit_deploy.export import ExportConfig, ModelSource, export_model

    return export_model(ModelSource(name, module=module), ExportConfig.from_dict({"target": target}),
                        out_dir=out_dir, log=None)


def _small(name, kw, size=32, **extra):
    cfg = DeployCfg(input_size=(3, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10)
    torch.manual_seed(0)
    model = create_model(name, img_size=size, depth=extra.pop("depth", 1), deploy_cfg=cfg, **kw, **extra)
    if hasattr(model, "fold_for_export"):
        model.fold_for_export()
    return model


def _check(res, target):
    m = res.manifest
    v = m["verification"]
    assert v["passed"], v
    if target == "coreml":  # on Linux: the structural checks (no Core ML runtime)
        assert all(v["checks"].values()), v["checks"]
    else:
        assert v["sqnr_db"] > 60 and v["top1_agreement"] == 1.0, v
    if target == "executorch":
        assert m["ops_not_delegated"] == [], m["ops_not_delegated"]  # the whole graph runs in XNNPACK
    return m


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_small(family, target, tmp_path):
    name, kw = FAMILIES[family]
    res = _export(_small(name, kw), name, target, tmp_path)
    m = _check(res, target)
    assert m["input"]["shape"] == [1, 3, 32, 32] and res.artifact.exists()


@pytest.mark.parametrize("gather,outside", [
    ("onehot", set()),
    ("topk", {"aten.topk.default", "aten.gather.default"}),
])
def test_token_reduction_executorch_delegation(gather, outside, tmp_path):
    """Which ops each selection formulation leaves to the portable kernels (XNNPACK delegate)."""
    model = _small("deit_tiny_patch16_224", dict(patch_size=4, keep_rate=0.7, keep_layers=(0,), gather=gather), depth=2)
    assert model.blocks[0].reducer is not None and model.token_counts == [64, 46, 46]
    res = _export(model, f"deit_evit_{gather}", "executorch", tmp_path)
    m = res.manifest
    assert m["verification"]["passed"] and m["verification"]["sqnr_db"] > 60
    ops = set(m["ops_not_delegated"])
    if gather == "onehot":
        assert ops == set(), ops  # ranks, one-hot selection and the GEMM gather all run in XNNPACK
    else:
        assert outside <= ops, ops  # topk + gather (and their expand/unsqueeze/slice/sum glue) stay outside


def test_augvit_unfolded_leaves_index_outside():
    """Why AugViT is exported folded: the circulant weight gather is not delegated."""
    from mobilevit_deploy.export.executorch import lower

    model = create_model("augvit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    _, outside = lower(torch.export.export(model, (x,)))
    assert "aten.index.Tensor" in outside, outside
    _, outside = lower(torch.export.export(model.fold_for_export(), (x,)))
    assert outside == {}, outside


# ---------------------------------------------------------------------------------------------- 224 px

@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "tnt_s_patch16_224", "augvit_tiny_patch16_224"])
def test_export_224(name, target, tmp_path):
    cfg = get_deploy_cfg(name)
    torch.manual_seed(0)
    model = create_model(name, deploy_cfg=cfg)
    if hasattr(model, "fold_for_export"):
        model.fold_for_export()
    m = _check(_export(model, name, target, tmp_path), target)
    assert m["input"]["shape"] == [1, 3, 224, 224]


@pytest.mark.slow
@pytest.mark.parametrize("gather", ["onehot", "topk"])
def test_token_reduction_224_executorch(gather, tmp_path):
    cfg = get_deploy_cfg("deit_tiny_patch16_224")
    torch.manual_seed(0)
    model = create_model("deit_tiny_patch16_224", deploy_cfg=cfg, keep_rate=0.7, gather=gather)
    assert model.token_counts == [196] * 4 + [139] * 3 + [99] * 3 + [71] * 3
    m = _export(model, f"deit_tiny_evit_{gather}", "executorch", tmp_path).manifest
    assert m["verification"]["passed"]
    ops = set(m["ops_not_delegated"])
    assert ops == set() if gather == "onehot" else {"aten.topk.default", "aten.gather.default"} <= ops
