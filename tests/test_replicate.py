"""The replicating L2 (``CacheConfig.replicate``: GPU L2 halves joined by a fabric, a read from
the far half keeps a near copy) against the slow pure-Python reference, counter for counter."""

import numpy as np
import pytest

from dsacache.errors import DsacacheError
from dsacache.simulator import Cache, CacheConfig
from dsacache.simulator.reference import COUNTERS, ReferenceCache, reference_reader

# The replicating engine against ReferenceCache: tests/test_engine_vs_reference.py.


def test_far_read_keeps_two_copies():
    # one set per partition, 2 ways: line 0 is homed in partition 0, line 1 in partition 1
    cfg = CacheConfig(4 * 128, 2, partitions=2, replicate=True)
    cache = Cache(cfg)
    clock = next(c for c in range(100) if reference_reader(c, 2) == 1)
    cache.clock = clock  # the next access comes from an SM of partition 1
    counters = np.zeros((1, len(COUNTERS)), np.int64)
    cache.run(np.array([0]), np.array([128]), np.zeros(1, bool), np.zeros(1, np.int64), counters)
    assert sorted(cache.tags[:4].tolist()) == [-1, -1, 0, 0]  # home set 0 and near set 1
    assert counters[0, 4] == 4  # all four sectors came from memory


def test_write_drops_far_copies():
    ref = ReferenceCache(4 * 128, 2, partitions=2, replicate=True)
    ref.clock = next(c for c in range(100) if reference_reader(c, 2) == 1)
    ref.access(0, 128)
    assert 0 in ref.sets[1]
    ref.access(0, 128, write=True)
    assert 0 not in ref.sets[1] and 0 in ref.sets[0]


@pytest.mark.parametrize("parts", [1, 3])
def test_replicate_needs_power_of_two_partitions(parts):
    with pytest.raises(DsacacheError, match="replicate needs a power-of-two"):
        CacheConfig.of(parts * 8 * 128, ways=8, partitions=parts, replicate=True)


def test_calibration_model_carries_the_replicating_geometry():
    from dsacache import calibration

    model = calibration.Model("lru", 8 * 2**20, 16, "hash", partitions=2, replicate=True)
    assert model.config().replicate and model.config().partitions == 2
    assert "2 halves replicating" in model.label
    # 2 MiB read twice fits: every second read hits, near copy or home
    assert calibration.simulate_reuse([2 * 2**20], model)[0] == 1.0
