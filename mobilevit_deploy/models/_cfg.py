"""DeployCfg: the one source of truth for a model's input size, normalisation, crop and labels.

Training, export, the artifact manifest, the benchmark and the iOS app all read it from here (or
from the manifest, which is written from it). Shipped/trained checkpoints may carry an override
(`DeployCfg.to_dict()` stored in the checkpoint's JSON), e.g. CIFAR-10 weights trained at 96 px.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DeployCfg:
    """Everything outside the weights that a deployed model needs to be fed and read correctly."""

    input_size: tuple[int, int, int] = (3, 256, 256)  # C, H, W
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # applied to RGB in [0, 1]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop_pct: float = 0.9  # resize shorter side to H / crop_pct, then centre-crop H x W
    interpolation: str = "bicubic"
    num_classes: int = 1000
    labels: tuple[str, ...] = field(default=(), repr=False)  # empty -> "class_<i>"

    def __post_init__(self):
        if len(self.input_size) != 3 or self.input_size[0] != 3:
            raise ValueError(f"input_size must be (3, H, W), got {self.input_size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}")
        if self.labels and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    @property
    def class_labels(self) -> list[str]:
        return list(self.labels) if self.labels else [f"class_{i}" for i in range(self.num_classes)]

    @property
    def scale_bias(self) -> tuple[float, list[float]]:
        """Core ML ImageType form of the normalisation for pixels in [0, 255]: y = scale * x + bias.

        Core ML has one scalar scale, so per-channel std is folded to its mean; exact when the std
        is the same for all channels (MobileViT: 1.0), an approximation (< 6 % for ImageNet std)
        otherwise, which is recorded in the manifest.
        """
        s = sum(self.std) / 3.0
        scale = 1.0 / (255.0 * s)
        bias = [-m / s for m in self.mean]
        return scale, bias

    @property
    def channel_scale(self) -> list[float] | None:
        """Per-channel factors that turn the ImageType's scalar normalisation into the exact one.

        The ImageType computes y = (pixel / 255 - mean) / mean(std) (`scale_bias`); the model needs
        (pixel / 255 - mean) / std_c = y * mean(std) / std_c. None when the std is uniform (exact
        already, as for MobileViT); the Core ML export applies it inside the graph otherwise.
        """
        std = [float(s) for s in self.std]
        if max(std) - min(std) <= 1e-12 * max(abs(s) for s in std):
            return None
        s_mean = sum(std) / 3.0
        return [s_mean / s for s in std]

    def example_input(self, batch: int = 1):
        """A deterministic normalised-looking input [batch, 3, H, W] (seeded randn; values only steer
        tracing): what every `torch.export` capture of the pipeline is traced with."""
        import torch

        g = torch.Generator().manual_seed(0)
        return torch.randn((batch, *self.input_size), generator=g)

    def with_classes(self, num_classes: int, labels: Sequence[str] | None = None) -> DeployCfg:
        labels = tuple(labels) if labels else (self.labels if num_classes == self.num_classes else ())
        return replace(self, num_classes=num_classes, labels=labels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"], d["labels"] = list(self.mean), list(self.std), list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DeployCfg:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DeployCfg keys {sorted(unknown)} (valid: {sorted(known)})")
        d = dict(d)
        for k in ("input_size", "mean", "std", "labels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)
