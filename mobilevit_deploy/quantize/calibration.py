"""Calibration images: real images only, preprocessed exactly as the deployed model is fed.

`load_calibration(calib_data, calib_size)` picks the images (never random tensors):
- `calib_data` given: every image below it (an ImageFolder tree or a plain folder, `data.list_images`),
  then a deterministic subset of `calib_size` (default 256) taken round-robin over the class folders
  (a seeded shuffle inside each folder), so a small subset still covers every class;
- `calib_data` None: the 40 images shipped with the package (`data.sample_images()`, 4 per CIFAR-10
  class, taken from the CIFAR-10 *training* split), and the manifest says so.

`calibration_batches(calib, deploy_cfg)` yields preprocessed batches (`data.eval_transform` of the
model's DeployCfg) behind a tqdm progress bar; an image that does not decode is skipped with a
warning, and a set with no decodable image is a DataError.
"""
from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import SAMPLES_DIR, list_images, load_rgb, sample_images
from ..errors import DataError, UserError

if TYPE_CHECKING:
    import torch

DEFAULT_CALIB_SIZE = 256  # with --calib-data; the shipped set is used whole (40 images)
DEFAULT_BATCH_SIZE = 16
_SEED = 0


@dataclass(frozen=True)
class CalibrationSet:
    """The images a scheme is calibrated on, and where they came from (for the manifest)."""

    paths: tuple[str, ...]
    source: str  # the directory given, or the shipped samples directory
    shipped: bool  # True: the package's own sample images (no --calib-data given)
    available: int  # images found before taking the subset
    classes: int  # class folders represented in the subset (1 for a plain folder)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> dict:
        """The manifest's `quantization.calibration` block."""
        d = {
            "source": self.source,
            "images": len(self.paths),
            "available": self.available,
            "classes": self.classes,
            "shipped_samples": self.shipped,
            "selection": "all" if len(self.paths) == self.available else
            f"deterministic, class-balanced round-robin over {self.classes} folder(s) (seed {_SEED})",
        }
        if self.shipped:
            d["note"] = ("no --calib-data given: calibrated on the 40 images shipped with the package "
                         "(CIFAR-10 training split, 4 per class); pass --calib-data DIR to calibrate on your own data")
        return d


def _balanced_subset(paths: list[str], root: Path, n: int) -> tuple[list[str], int]:
    """Round-robin over parent folders (seeded shuffle inside each): (subset, folders used)."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(str(Path(p).parent.relative_to(root)), []).append(p)
    rng = random.Random(_SEED)
    order = sorted(groups)
    for k in order:
        rng.shuffle(groups[k])
    out: list[str] = []
    i = 0
    while len(out) < n:
        took = False
        for k in order:
            if i < len(groups[k]):
                out.append(groups[k][i])
                took = True
                if len(out) == n:
                    break
        if not took:
            break
        i += 1
    return out, len({str(Path(p).parent) for p in out})


def load_calibration(calib_data: str | os.PathLike | None = None, calib_size: int | None = None) -> CalibrationSet:
    """Pick the calibration images (see the module docstring). Raises DataError for a missing or
    empty folder, UserError for a calib_size below 1."""
    if calib_size is not None:
        if isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1:
            raise UserError(f"--calib-size must be a positive integer, got {calib_size!r}")
    if calib_data is None:
        samples = [p for p, _ in sample_images()]
        if not samples:
            raise DataError(f"no shipped sample images in {SAMPLES_DIR}; pass --calib-data DIR")
        n = min(calib_size or len(samples), len(samples))
        picked, classes = _balanced_subset_flat(sample_images(), n)
        return CalibrationSet(tuple(picked), str(SAMPLES_DIR), True, len(samples), classes)

    root = Path(calib_data)
    if not root.exists():
        raise DataError(f"calibration data not found: {root}")
    if not root.is_dir():
        raise DataError(f"--calib-data must be a directory of images (or an ImageFolder), got a file: {root}")
    try:
        paths = list_images(root)
    except DataError as e:
        raise DataError(f"calibration data: {e}; calibration needs real images "
                        "(a folder of images or an ImageFolder tree <dir>/<class>/<image>)") from None
    n = min(calib_size or DEFAULT_CALIB_SIZE, len(paths))
    picked, classes = _balanced_subset(paths, root, n)
    return CalibrationSet(tuple(picked), str(root), False, len(paths), classes)


def _balanced_subset_flat(samples: list[tuple[str, str]], n: int) -> tuple[list[str], int]:
    """The shipped samples are one folder named <class>_<i>.jpg: round-robin over the class names."""
    by_class: dict[str, list[str]] = {}
    for p, c in samples:
        by_class.setdefault(c, []).append(p)
    out, i = [], 0
    while len(out) < n:
        for c in sorted(by_class):
            if i < len(by_class[c]) and len(out) < n:
                out.append(by_class[c][i])
        i += 1
    return out, len({c for p, c in samples if p in set(out)})


def calibration_batches(calib: CalibrationSet, deploy_cfg, *, batch_size: int = DEFAULT_BATCH_SIZE,
                        desc: str = "calibrating", progress: bool = True) -> Iterator[torch.Tensor]:
    """Preprocessed [B, 3, H, W] batches of `calib` (the model's own eval transform), with a progress bar.

    Undecodable images are skipped with a warning; a set where nothing decodes raises DataError.
    """
    import torch
    from tqdm.auto import tqdm

    from ..data import eval_transform

    t = eval_transform(deploy_cfg)
    good = 0
    buf: list = []
    bar = tqdm(total=len(calib.paths), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for p in calib.paths:
            try:
                img = load_rgb(p)
            except Exception as e:  # PIL raises many types for corrupt files
                warnings.warn(f"calibration: skipping undecodable image {p}: {type(e).__name__}", stacklevel=2)
                bar.update(1)
                continue
            buf.append(t(img))
            good += 1
            bar.update(1)
            if len(buf) == batch_size:
                yield torch.stack(buf)
                buf = []
        if buf:
            yield torch.stack(buf)
    finally:
        bar.close()
    if good == 0:
        raise DataError(f"calibration: none of the {len(calib.paths)} images in {calib.source} could be decoded")


def run_calibration(module, calib: CalibrationSet, deploy_cfg, *, batch_size: int = DEFAULT_BATCH_SIZE,
                    desc: str = "calibrating", progress: bool = True) -> int:
    """Feed every calibration batch through `module` (a pt2e-prepared graph); returns images seen."""
    import torch

    n = 0
    with torch.no_grad():
        for x in calibration_batches(calib, deploy_cfg, batch_size=batch_size, desc=desc, progress=progress):
            module(x)
            n += x.shape[0]
    return n
