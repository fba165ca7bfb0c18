"""Imports every built-in policy module so that each registers itself."""

from dsacache.policies import belady, fifo, hints, lru, random, reserve, token_lru  # noqa: F401
