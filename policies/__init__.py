"""Replacement and reservation policies: registry and plug-in API (see ``base``)."""

from dsacache.policies.base import (
    Param,
    Policy,
    PolicyType,
    load_plugin,
    make_policy,
    register,
    registered,
)

__all__ = ["Param", "Policy", "PolicyType", "load_plugin", "make_policy", "register", "registered"]
