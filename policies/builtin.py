"""Imports every built-in policy module so that each registers itself."""

from dsacache.policies import fifo, lru, random  # noqa: F401
