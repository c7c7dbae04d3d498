"""Losses: label-smoothed cross-entropy, logit knowledge distillation, and the fine-grained manifold
distillation of Hao et al., "Learning Efficient Vision Transformers via Fine-Grained Manifold
Distillation" (NeurIPS 2022).

Manifold distillation compares *relations* between patch embeddings rather than the embeddings
themselves, so the student and teacher feature widths need not match. With features F of shape
[B, N, D] (N patches), each patch embedding L2-normalised over D, and M(X) = X X^T:

- patch level (intra-image):  for every image b, M(F_b) is N x N;  sum_{ij} (M_t - M_s)^2, mean over b;
- sample level (inter-image): for every patch n, M(F_{:, n}) is B x B;  sum (M_t - M_s)^2, mean over n;
- random-sampled: K patches drawn at random from all B*N (the same draw for both), M is K x K;
  sum (M_t - M_s)^2.

The total is `w_patch * L_patch + w_sample * L_sample + w_rand * L_rand`. Feature maps come from
`forward_features` ([B, C, H, W]); a teacher map with a different H x W is average-pooled to the
student's grid so that patches correspond.
"""
from __future__ import annotations

from dataclasses import dataclass


def _tokens(feat):
    """[B, C, H, W] -> [B, H*W, C] (already [B, N, C] passes through)."""
    if feat.dim() == 4:
        return feat.flatten(2).transpose(1, 2)
    if feat.dim() == 3:
        return feat
    raise ValueError(f"features must be [B, C, H, W] or [B, N, C], got shape {tuple(feat.shape)}")


def align_teacher(f_s, f_t):
    """Pool the teacher's [B, C, H, W] map to the student's spatial grid when they differ."""
    import torch.nn.functional as F

    if f_s.dim() == 4 and f_t.dim() == 4 and f_s.shape[-2:] != f_t.shape[-2:]:
        f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:])
    return f_t


def manifold_terms(f_s, f_t, k: int = 192, generator=None):
    """(patch, sample, rand) manifold distillation terms between student and teacher features."""
    import torch
    import torch.nn.functional as F

    f_t = align_teacher(f_s, f_t)
    s = F.normalize(_tokens(f_s).float(), dim=-1)
    t = F.normalize(_tokens(f_t).float(), dim=-1)
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(f"student and teacher need the same batch and patch count, "
                         f"got {tuple(s.shape[:2])} vs {tuple(t.shape[:2])}")
    b, n, _ = s.shape
    d = t @ t.transpose(1, 2) - s @ s.transpose(1, 2)  # [B, N, N]
    patch = (d * d).sum((1, 2)).mean()
    sp, tp = s.transpose(0, 1), t.transpose(0, 1)  # [N, B, D]
    d = tp @ tp.transpose(1, 2) - sp @ sp.transpose(1, 2)  # [N, B, B]
    sample = (d * d).sum((1, 2)).mean()
    idx = torch.randperm(b * n, generator=generator)[: min(k, b * n)].to(s.device)
    rs, rt = s.reshape(b * n, -1)[idx], t.reshape(b * n, -1)[idx]
    d = rt @ rt.T - rs @ rs.T
    rand = (d * d).sum()
    return patch, sample, rand


@dataclass
class LossOutput:
    total: object
    parts: dict


class TrainLoss:
    """Cross-entropy (label smoothing) + optional logit KD + optional manifold distillation."""

    def __init__(self, label_smoothing: float = 0.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 kd_temperature: float = 1.0, manifold_weight: float = 0.0, manifold_patch: float = 1.0,
                 manifold_sample: float = 1.0, manifold_rand: float = 1.0, manifold_k: int = 192):
        self.label_smoothing = label_smoothing
        self.ce_weight, self.kd_weight, self.T = ce_weight, kd_weight, kd_temperature
        self.mf_weight = manifold_weight
        self.mf_w = (manifold_patch, manifold_sample, manifold_rand)
        self.mf_k = manifold_k

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.mf_weight > 0

    @property
    def needs_features(self) -> bool:
        return self.mf_weight > 0

    def __call__(self, logits, target, feats=None, t_logits=None, t_feats=None) -> LossOutput:
        import torch.nn.functional as F

        logits = logits.float()
        ce = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        total = self.ce_weight * ce
        parts = {"ce": ce.detach()}
        if self.kd_weight > 0:
            kd = kd_loss(logits, t_logits.float(), self.T)
            total = total + self.kd_weight * kd
            parts["kd"] = kd.detach()
        if self.mf_weight > 0:
            p, s, r = manifold_terms(feats, t_feats, self.mf_k)
            mf = self.mf_w[0] * p + self.mf_w[1] * s + self.mf_w[2] * r
            total = total + self.mf_weight * mf
            parts.update(mf_patch=p.detach(), mf_sample=s.detach(), mf_rand=r.detach())
        return LossOutput(total, parts)


def kd_loss(s_logits, t_logits, temperature: float = 1.0):
    """Hinton et al. 2015: T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean."""
    import torch.nn.functional as F

    T = float(temperature)
    return F.kl_div(F.log_softmax(s_logits / T, dim=-1), F.log_softmax(t_logits / T, dim=-1),
                    reduction="batchmean", log_target=True) * (T * T)


def multisize_kd(net, x, logits, sizes, temperature: float = 1.0):
    """SuperViT in-place distillation: {f"ms{s}": T^2 KL(softmax(logits / T) || softmax(net(x at s) / T))}.

    `x` is the batch at the largest size and `logits` the network's output on it; each smaller-size
    input is `x` resized (bicubic, antialiased), and the teacher logits are detached, so gradients reach
    the shared weights through every size but never push the largest size towards the smaller ones.
    """
    import torch.nn.functional as F

    teacher = logits.detach().float()
    out = {}
    for s in sizes:
        xs = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False)  # [B, 3, s, s]
        out[f"ms{s}"] = kd_loss(net(xs).float(), teacher, temperature)
    return out
