"""Image data without torchvision: ImageFolder listing, the model's own preprocessing, samples.

Preprocessing always comes from a DeployCfg (input size, crop, mean/std), so training, calibration,
verification and evaluation feed a model exactly as the deployed artifact will be fed.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import DataError

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")
SAMPLES_DIR = Path(__file__).parent / "assets" / "samples"
_INTERP = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTS and not p.name.startswith(".")


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class-folder names directly under `root` (ImageFolder layout)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image>.jpg)")
    return classes


def list_image_folder(root: str | os.PathLike,
                      classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(samples, classes) of an ImageFolder root: samples are (path, class index), sorted."""
    root = Path(root)
    classes = list(classes) if classes is not None else find_classes(root)
    samples = []
    for i, c in enumerate(classes):
        d = root / c
        if d.is_dir():
            samples += [(str(p), i) for p in sorted(d.rglob("*")) if _is_image(p)]
    if not samples:
        raise DataError(f"no images in {root} (extensions: {', '.join(IMG_EXTS)})")
    return samples, classes


def list_images(root: str | os.PathLike) -> list[str]:
    """Every image below `root`: a plain folder of images or an ImageFolder tree."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image directory not found: {root}")
    paths = [str(p) for p in sorted(root.rglob("*")) if _is_image(p)]
    if not paths:
        raise DataError(f"no images in {root} (extensions: {', '.join(IMG_EXTS)})")
    return paths


def sample_images() -> list[tuple[str, str]]:
    """The images shipped with the package: (path, CIFAR-10 class name), 4 per class.

    Taken from the CIFAR-10 *training* split, so they never overlap a validation set.
    """
    return [(str(p), p.stem.rsplit("_", 1)[0]) for p in sorted(SAMPLES_DIR.glob("*.jpg"))]


def load_rgb(path: str | os.PathLike):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def eval_transform(cfg) -> Callable:
    """PIL image -> float tensor [3, H, W]: resize shorter side to H / crop_pct, centre-crop, normalise."""
    import numpy as np
    import torch

    _, h, w = cfg.input_size
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    resample = _INTERP[cfg.interpolation]

    def transform(img):
        iw, ih = img.size
        short = int(round(min(h, w) / cfg.crop_pct))
        scale = short / min(iw, ih)
        nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
        img = img.resize((nw, nh), resample=resample)
        left, top = (nw - w) // 2, (nh - h) // 2
        img = img.crop((left, top, left + w, top + h))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - mean) / std

    return transform


def load_batch(paths: Sequence[str], cfg):
    """Preprocessed [N, 3, H, W] batch of image files (a torch.Tensor)."""
    import torch

    t = eval_transform(cfg)
    return torch.stack([t(load_rgb(p)) for p in paths])


def load_labeled_folder(root: str | os.PathLike, cfg, limit: int | None = None, chunk: int = 200):
    """An ImageFolder whose class folders are `cfg`'s labels, preprocessed in memory: (x [N, 3, H, W],
    y [N] label indices in the cfg's label order, paths). `limit`: that many images, evenly spaced
    over the sorted (class-grouped) list. DataError when the class folders are not the labels."""
    import torch

    samples, classes = list_image_folder(root)
    labels = cfg.class_labels
    if sorted(classes) != sorted(labels):
        raise DataError(f"class folders {classes} of {root} do not match the model's labels {labels}")
    if limit and limit < len(samples):
        step = len(samples) / limit
        samples = [samples[int(i * step)] for i in range(limit)]
    paths = [p for p, _ in samples]
    x = torch.cat([load_batch(paths[i:i + chunk], cfg) for i in range(0, len(paths), chunk)])
    y = torch.tensor([labels.index(classes[c]) for _, c in samples])
    return x, y, paths


class ImageFolderDataset:
    """Map-style dataset over an ImageFolder root. An image that fails to decode is skipped with a
    warning (counted in `.bad`) and replaced by the next good one, so a run never crashes on it."""

    def __init__(self, root, transform: Callable, classes: Sequence[str] | None = None):
        self.samples, self.classes = list_image_folder(root, classes)
        self.transform = transform
        self.bad: set[str] = set()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for k in range(len(self.samples)):
            path, target = self.samples[(i + k) % len(self.samples)]
            if path in self.bad:
                continue
            try:
                img = load_rgb(path)
            except Exception as e:  # PIL raises many types for corrupt files
                self.bad.add(path)
                warnings.warn(f"skipping undecodable image {path}: {type(e).__name__} "
                              f"({len(self.bad)} skipped so far)", stacklevel=2)
                continue
            return self.transform(img), target
        raise DataError("no decodable images left in the dataset")
