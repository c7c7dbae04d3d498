"""The multi-scale variable-batch sampler of MobileViT (Mehta & Rastegari, ICLR 2022, Sec. 4.1 and
Fig. 5 "multi-scale sampler"), written for one process or for DDP.

Given sorted sizes S = {s_1 .. s_n} and a batch size b at a base size s_b, each iteration t draws a
size s_t from S and uses a batch of b_t = b * s_b^2 / s_t^2 images (the paper sets s_b = s_n, the
largest size, and b = the batch at that size). Small images come in large batches and large images in
small ones, so every iteration costs about the same and the GPU (or CPU) is evenly loaded.

The schedule of an epoch -- the permutation of the dataset and the (size, batch) of every iteration --
is a pure function of (seed, epoch), identical on every DDP process. `b_t` is a *global* batch, split
into equal shares (rounded down to a multiple of the world size), so a DDP run of N processes sees
exactly the images and sizes of a one-process run with the same global batch, and every process runs
the same number of iterations (DDP needs that). Each item is `(index, size, epoch)`; the dataset
decodes image `index` at `size` x `size` with augmentation seeded by `(seed, epoch, index)`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..errors import UserError


class MultiScaleBatchSampler:
    """Yields lists of `(index, size, epoch)` for this process, one list per iteration."""

    def __init__(
        self,
        num_samples: int,
        sizes: Sequence[int],
        batch_size: int,
        base_size: int | None = None,
        *,
        variable_batch: bool = True,
        min_batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
    ):
        if num_samples < 1:
            raise UserError("the sampler needs at least one sample")
        if not sizes:
            raise UserError("the sampler needs at least one size")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} outside world size {world_size}")
        self.num_samples = int(num_samples)
        self.sizes = sorted(int(s) for s in sizes)
        self.base_size = int(base_size) if base_size else self.sizes[-1]
        self.batch_size = int(batch_size)
        self.variable_batch = bool(variable_batch)
        self.min_batch_size = max(int(min_batch_size), 1)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.epoch = 0
        self._cache: tuple[int, list] | None = None
        if self.batch_size < self.world_size:
            raise UserError(f"global batch size {self.batch_size} is smaller than the world size {self.world_size}")

    def batch_for(self, size: int) -> int:
        """Global batch at `size`, a multiple of the world size."""
        b = self.batch_size
        if self.variable_batch:
            b = int(self.batch_size * self.base_size * self.base_size / (size * size))
        b = max(b, self.min_batch_size, self.world_size)
        return b - b % self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def schedule(self, epoch: int | None = None) -> list[tuple[int, list[int]]]:
        """[(size, global indices)] of every iteration of `epoch`: the same on every process."""
        import torch

        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        out, pos = [], 0
        while pos < self.num_samples:
            if len(self.sizes) > 1:
                size = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=g))]
            else:
                size = self.sizes[0]
            b = self.batch_for(size)
            take = order[pos:pos + b]
            pos += b
            take = take[: len(take) - len(take) % self.world_size]  # last batch: equal shares only
            if not take:
                break
            out.append((size, take))
        self._cache = (epoch, out)
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for size, idx in self.schedule():
            share = len(idx) // self.world_size
            mine = idx[self.rank * share:(self.rank + 1) * share]
            yield [(i, size, self.epoch) for i in mine]

    def __len__(self) -> int:
        return len(self.schedule())

    def images_per_epoch(self, epoch: int | None = None) -> int:
        return sum(len(i) for _, i in self.schedule(epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "sizes": self.sizes, "batch_size": self.batch_size,
                "base_size": self.base_size, "variable_batch": self.variable_batch}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "sizes", "batch_size", "base_size", "variable_batch"):
            if k in state and state[k] != getattr(self, k):
                raise UserError(f"cannot resume: sampler {k} was {state[k]!r}, "
                                f"the recipe now says {getattr(self, k)!r}")
        self.epoch = int(state["epoch"])
