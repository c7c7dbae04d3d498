"""Train-time augmentation without torchvision: random-resized crop + horizontal flip, normalised with
the model's DeployCfg mean/std (evaluation uses `mobilevit_deploy.data.eval_transform`).

Randomness comes from a `numpy.random.Generator` passed per call, seeded by (seed, epoch, index) in
the dataset, so an image gets the same augmentation whatever process, worker or resume loads it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

_INTERP = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                            rng) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering a random fraction `scale` of the area with a
    random aspect ratio in `ratio` (log-uniform); falls back to the largest centred crop in range."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class TrainTransform:
    """`(PIL image, size, rng) -> float tensor [3, size, size]`, normalised with mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, interpolation: str = "bicubic"):
        import numpy as np

        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3) * 255.0
        self.inv_std = 1.0 / (np.asarray(std, dtype=np.float32).reshape(1, 1, 3) * 255.0)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.resample = _INTERP[interpolation]

    def __call__(self, img, size: int, rng):
        import numpy as np
        import torch

        box = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng)
        img = img.resize((size, size), resample=self.resample, box=box)
        a = np.asarray(img, dtype=np.float32)
        if self.hflip > 0 and rng.random() < self.hflip:
            a = a[:, ::-1]
        a = (a - self.mean) * self.inv_std
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
