"""Exponential moving average of model weights (MobileViT trains with one; Polyak averaging)."""
from __future__ import annotations

import copy


class ModelEma:
    """`ema = d * ema + (1 - d) * w` after every optimizer step; buffers (BN statistics) are copied.

    With `warmup`, d = min(decay, (1 + n) / (10 + n)) over the first updates (n = updates so far), so
    early EMA weights are not dominated by the random initialisation on short runs.
    """

    def __init__(self, model, decay: float = 0.9995, warmup: bool = False):
        import torch

        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self._torch = torch

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.updates) / (10 + self.updates))
        return self.decay

    def update(self, model) -> None:
        torch = self._torch
        d = self.current_decay()
        with torch.no_grad():
            msd = model.state_dict()
            for k, v in self.module.state_dict().items():
                src = msd[k].detach()
                if v.dtype.is_floating_point:
                    v.mul_(d).add_(src.to(v.dtype), alpha=1.0 - d)
                else:
                    v.copy_(src)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates}

    def load_state_dict(self, st: dict) -> None:
        self.updates = int(st["updates"])
