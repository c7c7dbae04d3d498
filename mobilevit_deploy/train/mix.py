"""Batch mixing: mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), as DeiT / timm apply them.

With probability `prob` a batch is mixed with itself reversed: CutMix (chosen with probability `switch_prob`
when both are on) pastes a random box of the partner image, mixup blends the whole images; the targets become
the same convex mix of the two one-hot labels, lambda ~ Beta(alpha, alpha) (for CutMix, lambda is corrected to
the box's actual area after clipping to the image). Label smoothing is applied by the loss on top of the mixed
targets. Randomness comes from a numpy Generator seeded by (seed, epoch, step), so a resumed run mixes the
same way.
"""
from __future__ import annotations


def mix_rng(seed: int, epoch: int, step: int):
    import numpy as np

    return np.random.default_rng([int(seed), int(epoch), int(step), 0x6D6978])


def mix_batch(x, y, num_classes: int, cfg, rng):
    """(x [B, 3, H, W], y [B] class indices) -> (mixed x, soft targets [B, num_classes], lambda).

    lambda is the weight of each image's own label (1.0 when the batch was left unmixed)."""
    import torch
    import torch.nn.functional as F

    target = F.one_hot(y, num_classes).to(torch.float32)
    use_mix = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
    if not use_mix or rng.random() >= cfg.prob or len(y) < 2:
        return x, target, 1.0
    cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.switch_prob)
    lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha) if cutmix else rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    partner = x.flip(0)
    if cutmix:
        h, w = x.shape[-2:]
        cut = (1.0 - lam) ** 0.5
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    else:
        x = x * lam + partner * (1.0 - lam)
    return x, target * lam + target.flip(0) * (1.0 - lam), lam
