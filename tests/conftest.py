import numpy as np
import pytest

from dsacache.tracer import SynthConfig, synthesize
from dsacache.tracer.models import missing_capture_libraries

CAPTURE_MISSING = missing_capture_libraries(model_package=True)
needs_model = pytest.mark.skipif(
    bool(CAPTURE_MISSING),
    reason=f"capture from SmolLM2-135M needs {', '.join(CAPTURE_MISSING)} installed",
)


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
