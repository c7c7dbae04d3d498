"""DynamicViT's training losses (Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token
Sparsification", NeurIPS 2021, https://arxiv.org/abs/2106.02034; official `DistillDiffPruningLoss`).

    L = L_cls + lambda_KL * L_KL + lambda_distill * L_distill + lambda_ratio * L_ratio
      (paper: lambda_ratio = 2, lambda_KL = lambda_distill = 0.5)

- L_ratio = 1/(B*S) sum_b sum_s (rho_s - 1/N sum_i D_i^{b,s})^2: the kept fraction of every image at every
  stage s (decisions D relative to all N patches, multiplied through the stages) pulled to the target
  rho_s = keep_rate^(s+1). `ratio_loss`.
- L_distill = sum_{b,i} D_i^{b,S} (t_i - t'_i)^2 / sum_{b,i} D_i^{b,S}: the student's final (normalised)
  patch tokens t against the dense teacher's t', over the tokens kept after the last stage; as the
  official code (`mse_token=True`) the square is averaged over channels too. `token_distill_loss`.
- L_KL = KL(teacher || student) of the logits (T = 1): `losses.kd_loss`, the trainer's `distill.kd_weight`.

The trainer (`train/loop.py`) adds `ratio_weight * L_ratio + token_weight * L_distill` for a model that
reports DynamicViT decisions (`model.dvit_out`, set by models/deit.py in training mode), with
`distill.token_weight` and `token_ratio_weight` from the recipe.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ratio_loss", "token_distill_loss", "dynamicvit_terms"]


def ratio_loss(decisions: Sequence[torch.Tensor], keep_ratios: Sequence[float]) -> torch.Tensor:
    """1/(B*S) sum_b sum_s (rho_s - mean_i D_i^{b,s})^2; decisions: S tensors [B, N] of 0/1 keep masks."""
    if len(decisions) != len(keep_ratios) or not decisions:
        raise ValueError(f"{len(decisions)} stage decisions for {len(keep_ratios)} keep ratios")
    total = decisions[0].new_zeros(())
    for d, rho in zip(decisions, keep_ratios):
        total = total + ((d.float().mean(dim=1) - float(rho)) ** 2).mean()
    return total / len(decisions)


def token_distill_loss(tokens: torch.Tensor, teacher_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the kept tokens (mask [B, N] > 0.5) and channels; 0 when none is kept."""
    if tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student tokens {tuple(tokens.shape)} vs teacher {tuple(teacher_tokens.shape)}")
    B, N, C = tokens.shape
    keep = mask.reshape(B * N) > 0.5
    if keep.sum() < 1:
        return tokens.new_zeros(())
    s, t = tokens.reshape(B * N, C)[keep], teacher_tokens.reshape(B * N, C)[keep]
    return ((s.float() - t.float()) ** 2).mean()


def dynamicvit_terms(model, teacher_feats: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"ratio": L_ratio[, "token_kd": L_distill]} of the model's last training forward; {} for other models.

    `teacher_feats`: the teacher's `forward_features` ([B, P_t + N, C], normalised); its patch tokens are
    the last N."""
    m = getattr(model, "module", model)  # DDP
    out = getattr(m, "dvit_out", None)
    if not out:
        return {}
    decisions, tokens, mask = out
    terms = {"ratio": ratio_loss(decisions, m.dvit_keep_ratios)}
    if teacher_feats is not None:
        N = tokens.shape[1]
        terms["token_kd"] = token_distill_loss(tokens, teacher_feats[:, -N:].detach(), mask.detach())
    return terms
