"""SuperViT multi-size training: the `multisize:` recipe section, its in-place distillation loss, and
per-size evaluation of the final weights (`model.json`) and of a checkpoint (`evaluate --size`)."""
from __future__ import annotations

import json

import pytest
import torch

from mobilevit_deploy.errors import UserError

from test_train_loop import FIXTURE, TinyNet, tiny, tiny_cfg  # noqa: F401  (the `tiny` fixture)


def test_multisize_kd_reaches_the_weights_through_every_size_and_not_the_teacher():
    from mobilevit_deploy.train.losses import multisize_kd

    torch.manual_seed(0)
    net = TinyNet(num_classes=3)
    x = torch.rand(4, 3, 32, 32)
    logits = net(x)
    logits.retain_grad()
    terms = multisize_kd(net, x, logits, [16, 24])
    assert sorted(terms) == ["ms16", "ms24"]
    assert all(t.item() > 0 for t in terms.values())  # the small sizes disagree with the large one at init
    net.zero_grad()
    terms["ms16"].backward(retain_graph=True)
    g16 = {n: p.grad.clone() for n, p in net.named_parameters()}
    assert all(g.abs().sum() > 0 for g in g16.values())  # every weight gets a gradient from the 16 px pass
    assert logits.grad is None  # the largest size's output is a detached teacher
    net.zero_grad()
    terms["ms24"].backward()
    assert any(not torch.allclose(p.grad, g16[n]) for n, p in net.named_parameters())  # 24 px: a different signal


def test_multisize_kd_is_zero_when_the_small_size_agrees():
    """A size-independent network (global mean of the input) gives equal logits at every size: no KD loss."""
    from mobilevit_deploy.train.losses import multisize_kd

    class MeanNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))

    net, x = MeanNet(), torch.full((2, 3, 32, 32), 0.3)
    terms = multisize_kd(net, x, net(x), [16])
    assert terms["ms16"].abs().item() < 1e-6


def test_the_training_loss_is_what_the_config_says(tiny, tmp_path):
    from mobilevit_deploy.train.loop import train

    cfg = tiny_cfg(**{"schedule.epochs": 1, "data.train_sizes": "[32]", "multisize.enabled": "true",
                      "multisize.sizes": "[16]", "multisize.kd_weight": 0.5, "multisize.kd_temperature": 2.0,
                      "multisize.eval_sizes": "[16, 32]"})
    res = train(cfg, data=FIXTURE, out=tmp_path / "ms")
    row = res.metrics[-1]
    assert row["train_ms16"] > 0
    assert row["train_loss"] == pytest.approx(row["train_ce"] + 0.5 * row["train_ms16"], rel=1e-5)
    meta = json.loads((tmp_path / "ms" / "model.json").read_text())
    assert set(meta["val_top1_per_size"]) == {"16", "32"}
    assert meta["val_top1_per_size"]["32"] == pytest.approx(res.val_top1, abs=0.01)  # 32 px is the eval size


def test_without_multisize_there_is_no_kd_term(tiny, tmp_path):
    from mobilevit_deploy.train.loop import train

    res = train(tiny_cfg(**{"schedule.epochs": 1}), data=FIXTURE, out=tmp_path / "plain")
    assert not any(k.startswith("train_ms") for k in res.metrics[-1])


@pytest.mark.parametrize("over, msg", [
    ({"multisize.enabled": "true"}, "multisize.sizes"),
    ({"multisize.enabled": "true", "multisize.sizes": "[32]"}, "below the smallest train size"),
    ({"multisize.enabled": "true", "multisize.sizes": "[8]"}, "multiple of 16"),
    ({"multisize.enabled": "true", "multisize.sizes": "[16]", "multisize.kd_temperature": 0}, "kd_temperature"),
    ({"multisize.size": "[16]"}, "unknown recipe key 'multisize.size'"),
])
def test_bad_multisize_config_is_one_clear_error(tiny, over, msg):
    with pytest.raises(UserError, match=msg):
        tiny_cfg(**{"data.train_sizes": "[32]", **over})


def test_evaluate_at_another_size(tiny, tmp_path):
    """`evaluate --size S` runs the checkpoint at S x S; an artifact refuses a size it was not exported at."""
    from mobilevit_deploy.evaluate import evaluate
    from mobilevit_deploy.train.loop import train

    res = train(tiny_cfg(**{"schedule.epochs": 1}), data=FIXTURE, out=tmp_path / "r")
    val = FIXTURE / "val"
    a = evaluate(val, checkpoint=res.weights, progress=False)
    b = evaluate(val, checkpoint=res.weights, progress=False, size=16)
    assert a.deploy_cfg.image_size == (32, 32) and b.deploy_cfg.image_size == (16, 16)
    assert a.top1 == pytest.approx(res.val_top1)
    with pytest.raises(UserError, match="--size"):
        evaluate(val, checkpoint=res.weights, progress=False, size=2)
