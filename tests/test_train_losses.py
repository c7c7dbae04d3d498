"""Distillation losses: each manifold term is zero for identical features and positive otherwise."""
from __future__ import annotations

import pytest
import torch

from mobilevit_deploy.train.losses import TrainLoss, kd_loss, manifold_terms


def _feats(seed, b=4, c=16, h=4, w=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g)


def test_terms_zero_when_student_equals_teacher():
    f = _feats(0)
    for t in manifold_terms(f, f.clone(), k=20, generator=torch.Generator().manual_seed(0)):
        assert t.item() == pytest.approx(0.0, abs=1e-10)


def test_terms_zero_across_widths_when_relations_match():
    # The teacher is 3x wider: the student's features padded with zeros and rotated by an orthogonal
    # map. Normalised relations are identical, so every term must vanish though widths differ.
    s = _feats(1, c=8)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(2)))
    t = torch.einsum("bchw,dc->bdhw", torch.cat([s, torch.zeros(4, 16, 4, 4)], 1), q)
    for term in manifold_terms(s, t, k=30):
        assert term.item() == pytest.approx(0.0, abs=1e-8)


def test_terms_positive_when_features_differ():
    s, t = _feats(3, c=8), _feats(4, c=32)
    p, smp, r = manifold_terms(s, t, k=30)
    assert p.item() > 0 and smp.item() > 0 and r.item() > 0
    # the terms measure different things: rotating each image's features by its own orthogonal map
    # keeps every intra-image relation (patch term 0) but changes relations across images
    g = torch.Generator().manual_seed(9)
    rots = [torch.linalg.qr(torch.randn(8, 8, generator=g))[0] for _ in range(4)]
    t2 = torch.stack([torch.einsum("chw,dc->dhw", s[i], rots[i]) for i in range(4)])
    p2, s2, _ = manifold_terms(s, t2, k=30)
    assert p2.item() == pytest.approx(0.0, abs=1e-6) and s2.item() > 1e-3


def test_teacher_map_pooled_to_student_grid_and_gradients_flow():
    s = _feats(5, c=8, h=2, w=2).requires_grad_(True)
    t = _feats(6, c=32, h=4, w=4)
    total = sum(manifold_terms(s, t, k=8))
    total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kd_loss_zero_iff_equal_logits():
    a = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    assert kd_loss(a, a.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(a, a.flip(1), 4.0).item() > 0


def test_train_loss_combines_terms():
    logits, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    f = _feats(7)
    plain = TrainLoss(label_smoothing=0.1)
    assert not plain.needs_teacher
    out = plain(logits, y)
    assert set(out.parts) == {"ce"}
    full = TrainLoss(kd_weight=0.5, kd_temperature=2.0, manifold_weight=2.0, manifold_k=16)
    assert full.needs_teacher and full.needs_features
    o1 = full(logits, y, f, logits, f)  # identical teacher: only the CE remains
    assert o1.total.item() == pytest.approx(o1.parts["ce"].item(), abs=1e-5)
    o2 = full(logits, y, f, torch.randn(4, 10), _feats(8))
    assert o2.total.item() > o2.parts["ce"].item()
    assert {"kd", "mf_patch", "mf_sample", "mf_rand"} <= set(o2.parts)
