"""Datasets for training and validation over ImageFolder samples.

Items are requested by the multi-scale sampler as `(index, size, epoch)`; augmentation randomness is
seeded by `(seed, epoch, index)`. An image that fails to decode is skipped with a warning and replaced
by the next good one; each item also returns the index it really used, so the training loop can count
skipped images even when they were met inside DataLoader worker processes.

`cache=True` decodes every image once up front and keeps the RGB images in memory (worth it for
small datasets such as the 32 x 32 CIFAR-10 subset, where JPEG open/decode dominates the data time).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

from ..data import load_rgb
from ..errors import DataError


class _Images:
    def __init__(self, samples: Sequence[tuple[str, int]], cache: bool, progress: bool = False, what: str = "images"):
        self.samples = list(samples)
        self.bad: set[int] = set()
        self._cache = None
        if cache:
            from tqdm import tqdm

            imgs = []
            bar = tqdm(self.samples, desc=f"decode {what}", disable=not progress, leave=False, unit="img")
            for i, (p, _) in enumerate(bar):
                imgs.append(self._decode(i, p))
            self._cache = imgs
            if len(self.bad) == len(self.samples):
                raise DataError(f"none of the {len(self.samples)} {what} could be decoded")

    def _decode(self, i: int, path: str):
        try:
            img = load_rgb(path)
            img.load()
            return img
        except Exception as e:  # PIL raises many types for corrupt files
            self.bad.add(i)
            warnings.warn(f"skipping undecodable image {path}: {type(e).__name__} ({len(self.bad)} skipped so far)",
                          stacklevel=2)
            return None

    def get(self, i: int):
        """(image, target, used index) of sample i or of the next decodable one."""
        n = len(self.samples)
        for k in range(n):
            j = (i + k) % n
            if j in self.bad:
                continue
            img = self._cache[j] if self._cache is not None else self._decode(j, self.samples[j][0])
            if img is None:
                continue
            return img, self.samples[j][1], j
        raise DataError("no decodable images left in the dataset")

    def __len__(self):
        return len(self.samples)


class TrainDataset(_Images):
    """`ds[(index, size, epoch)] -> (tensor [3, size, size], target, used index)`."""

    def __init__(self, samples, transform: Callable, seed: int = 0, cache: bool = False, progress: bool = False):
        super().__init__(samples, cache, progress, "train images")
        self.transform = transform
        self.seed = int(seed)

    def __getitem__(self, item):
        import numpy as np

        idx, size, epoch = item
        img, target, used = self.get(int(idx))
        rng = np.random.default_rng([self.seed, int(epoch), int(idx)])
        return self.transform(img, int(size), rng), target, used


class EvalDataset(_Images):
    """`ds[index] -> (tensor, target, used index)` with a deterministic eval transform."""

    def __init__(self, samples, transform: Callable, cache: bool = False, progress: bool = False):
        super().__init__(samples, cache, progress, "val images")
        self.transform = transform

    def __getitem__(self, idx):
        img, target, used = self.get(int(idx))
        return self.transform(img), target, used


def skipped_between(requested, used, n: int) -> set[int]:
    """Indices skipped when `requested` was replaced by `used` (the ones in between, cyclically)."""
    out = set()
    for r, u in zip(requested, used):
        r, u = int(r), int(u)
        while r != u:
            out.add(r)
            r = (r + 1) % n
    return out
