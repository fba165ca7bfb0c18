import numpy as np
import pytest

from dsacache.tracer import SynthConfig, synthesize


@pytest.fixture
def small_trace(tmp_path):
    """A small synthetic GQA-style trace: 3 layers, 2 groups, 2 requests, 6 steps."""
    cfg = SynthConfig(
        layers=3,
        groups=2,
        requests=2,
        context=300,
        steps=6,
        k=40,
        seed=3,
        model={"name": "tiny", "attention": "GQA", "kv_heads": 2, "head_dim": 64},
    )
    return synthesize(cfg, tmp_path / "small.dsatrace")


def random_rows(rng: np.random.Generator, n: int, k: int, position: int):
    return [np.sort(rng.choice(position, min(k, position), replace=False)) for _ in range(n)]
