"""Training: typed recipes, the multi-scale variable-batch sampler, the loop (DDP, EMA, KD), resume.

`from mobilevit_deploy.train import load_recipe, train`; the CLI is `python -m mobilevit_deploy.train`.
"""
from __future__ import annotations

from .config import TrainConfig, config_from_dict, load_recipe

__all__ = ["TrainConfig", "config_from_dict", "load_recipe", "train"]


def __getattr__(name):  # the loop imports torch; keep `import mobilevit_deploy.train` light
    if name in ("train", "TrainResult"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'mobilevit_deploy.train' has no attribute {name!r}")
