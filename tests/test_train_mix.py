"""mixup / CutMix (`mix:` recipe section): mixed targets are the same convex mix as the images, CutMix's
lambda is the pasted box's true area, runs are reproducible, and a mixed run trains end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mobilevit_deploy.errors import UserError
from mobilevit_deploy.train.config import MixConfig
from mobilevit_deploy.train.mix import mix_batch, mix_rng

from test_train_loop import FIXTURE, TinyNet, tiny, tiny_cfg  # noqa: F401  (the `tiny` fixture)


def _batch(b=6, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, size, size, generator=g), torch.arange(b) % 4


def test_mixup_blends_images_and_targets_with_the_same_lambda():
    x, y = _batch()
    xm, t, lam = mix_batch(x, y, 4, MixConfig(mixup_alpha=0.8), mix_rng(1, 0, 0))
    assert 0 < lam < 1
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    assert torch.allclose(t.sum(1), torch.ones(len(y)))
    assert t[0, y[0]] == pytest.approx(lam + (1 - lam) * float(y[-1] == y[0]))


def test_cutmix_lambda_is_the_area_kept_from_each_image():
    x, y = _batch(b=4)
    y = torch.tensor([0, 1, 2, 3])
    for step in range(20):  # several draws, boxes clipped at the borders included
        xm, t, lam = mix_batch(x, y, 4, MixConfig(cutmix_alpha=1.0), mix_rng(1, 0, step))
        own = (xm == x).all(1).float().mean().item()  # pixel fraction still from the image itself
        assert own == pytest.approx(lam, abs=1e-6)
        assert t[0, 0] == pytest.approx(lam) and t[0, 3] == pytest.approx(1 - lam)


def test_prob_zero_and_alphas_zero_leave_the_batch_alone():
    x, y = _batch()
    for cfg in (MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0), MixConfig()):
        xm, t, lam = mix_batch(x, y, 4, cfg, mix_rng(1, 0, 0))
        assert lam == 1.0 and xm is x
        assert torch.equal(t.argmax(1), y)


def test_the_same_seed_epoch_and_step_mix_the_same_way():
    x, y = _batch()
    cfg = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0)
    a = mix_batch(x, y, 4, cfg, mix_rng(3, 2, 7))
    b = mix_batch(x, y, 4, cfg, mix_rng(3, 2, 7))
    c = mix_batch(x, y, 4, cfg, mix_rng(3, 2, 8))
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    assert not (torch.equal(a[0], c[0]) and a[2] == c[2])


def test_both_kinds_are_drawn_by_switch_prob():
    x, y = _batch()
    cfg = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    kinds = set()
    for step in range(40):
        xm, _, lam = mix_batch(x, y, 4, cfg, mix_rng(0, 0, step))
        if lam < 1:
            kinds.add("cutmix" if bool(((xm == x) | (xm == x.flip(0))).all()) else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_a_mixed_run_trains_and_records_its_setting(tiny, tmp_path):
    import yaml

    from mobilevit_deploy.train.loop import train

    res = train(tiny_cfg(**{"schedule.epochs": 2, "mix.mixup_alpha": 0.8, "mix.cutmix_alpha": 1.0}),
                data=FIXTURE, out=tmp_path / "mix")
    assert np.isfinite(res.metrics[-1]["train_loss"])
    saved = yaml.safe_load((tmp_path / "mix" / "config.yaml").read_text())
    assert saved["mix"]["mixup_alpha"] == 0.8 and saved["mix"]["cutmix_alpha"] == 1.0
    plain = train(tiny_cfg(**{"schedule.epochs": 2}), data=FIXTURE, out=tmp_path / "plain")
    assert res.metrics[-1]["train_loss"] != pytest.approx(plain.metrics[-1]["train_loss"])


@pytest.mark.parametrize("over, msg", [
    ({"mix.mixup_alpha": -1}, "mix.mixup_alpha"),
    ({"mix.prob": 1.5}, "mix.prob must be in [0, 1]"),
    ({"mix.switch_prob": -0.1}, "mix.switch_prob"),
    ({"mix.enabled": "true"}, "unknown recipe key 'mix.enabled'"),
])
def test_bad_mix_settings_are_one_line_errors(over, msg):
    with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        tiny_cfg(**over)
