"""Imports every built-in policy module so that each registers itself."""

from dsacache.policies import (  # noqa: F401
    belady,
    fifo,
    hints,
    lfu,
    lru,
    persist,
    plru,
    random,
    reserve,
    rrip,
    s3fifo,
    sieve,
    token_lru,
)
