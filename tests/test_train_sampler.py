"""The multi-scale variable-batch sampler: batch sizes, coverage, determinism, DDP sharding."""
from __future__ import annotations

import pytest

from mobilevit_deploy.errors import UserError
from mobilevit_deploy.train.sampler import MultiScaleBatchSampler


def test_batch_size_scales_with_pixels():
    s = MultiScaleBatchSampler(10_000, [160, 192, 256, 288, 320], batch_size=128, base_size=256)
    # b_t = b * (base / s_t)^2, rounded down
    assert s.batch_for(256) == 128
    assert s.batch_for(160) == int(128 * 256 * 256 / (160 * 160))  # 327
    assert s.batch_for(320) == int(128 * 256 * 256 / (320 * 320))  # 81
    fixed = MultiScaleBatchSampler(10_000, [160, 320], batch_size=128, variable_batch=False)
    assert fixed.batch_for(160) == fixed.batch_for(320) == 128


def test_epoch_covers_every_sample_once_and_varies_sizes():
    s = MultiScaleBatchSampler(1000, [64, 80, 96], batch_size=48, base_size=96, seed=3)
    batches = list(s)
    seen = [i for b in batches for i, _, _ in b]
    assert len(seen) == len(set(seen)) == 1000  # world 1: nothing dropped
    sizes = {sz for b in batches for _, sz, _ in b}
    assert sizes == {64, 80, 96}
    for b in batches:
        sz = b[0][1]
        assert all(x[1] == sz for x in b)  # one size per batch
        assert len(b) <= s.batch_for(sz)
    assert len(batches) == len(s)


def test_schedule_depends_on_seed_and_epoch_only():
    a = MultiScaleBatchSampler(500, [64, 96], 32, seed=1)
    b = MultiScaleBatchSampler(500, [64, 96], 32, seed=1)
    assert a.schedule(4) == b.schedule(4)
    assert a.schedule(4) != a.schedule(5)
    assert a.schedule(4) != MultiScaleBatchSampler(500, [64, 96], 32, seed=2).schedule(4)
    a.set_epoch(2)
    assert [x[0] for bt in a for x in bt] == [i for _, idx in b.schedule(2) for i in idx]


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shards_make_up_the_single_process_batch(world):
    n, sizes, bs = 997, [64, 80, 96], 48
    single = MultiScaleBatchSampler(n, sizes, bs, base_size=96, seed=5, world_size=world, rank=0)
    ranks = [MultiScaleBatchSampler(n, sizes, bs, base_size=96, seed=5, world_size=world, rank=r) for r in range(world)]
    for r in ranks:
        r.set_epoch(1)
    per_rank = [list(r) for r in ranks]
    assert len({len(p) for p in per_rank}) == 1  # same number of steps everywhere (DDP needs that)
    for t, (size, idx) in enumerate(single.schedule(1)):
        shares = [per_rank[r][t] for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # equal shares
        assert [i for s in shares for i, _, _ in s] == idx  # together: the global batch
        assert all(x[1] == size for s in shares for x in s)
        assert len(idx) % world == 0


def test_state_round_trip_and_mismatch():
    s = MultiScaleBatchSampler(100, [64, 96], 16, seed=1)
    s.set_epoch(7)
    t = MultiScaleBatchSampler(100, [64, 96], 16, seed=1)
    t.load_state_dict(s.state_dict())
    assert t.epoch == 7 and list(t) == list(s)
    with pytest.raises(UserError, match="batch_size"):
        MultiScaleBatchSampler(100, [64, 96], 32, seed=1).load_state_dict(s.state_dict())
