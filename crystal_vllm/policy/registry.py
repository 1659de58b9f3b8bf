"""Build policies by name from plain parameter mappings (CLI flags, per-request args)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from crystal_vllm.config import coerce_value
from crystal_vllm.policy.base import KVPolicy
from crystal_vllm.policy.baselines import FullPolicy, H2OPolicy, RandomPolicy, StreamingPolicy
from crystal_vllm.policy.lrfu import CrystalLitePolicy, CrystalPolicy, LRUPolicy
from crystal_vllm.policy.windowed import RKVPolicy, SnapKVPolicy

_POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (
        FullPolicy,
        CrystalPolicy,
        CrystalLitePolicy,
        LRUPolicy,
        StreamingPolicy,
        H2OPolicy,
        SnapKVPolicy,
        RKVPolicy,
        RandomPolicy,
    )
}

POLICY_NAMES: tuple[str, ...] = (
    "full",
    "crystal",
    "crystal-lite",
    "lru",
    "streaming",
    "h2o",
    "snapkv",
    "rkv",
    "random",
)
assert set(POLICY_NAMES) == set(_POLICIES)


def policy_class(name: str) -> type[KVPolicy]:
    """The policy class registered under ``name``."""
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown KV policy {name!r}; allowed: {', '.join(POLICY_NAMES)}"
        ) from None


def policy_param_names(name: str) -> set[str]:
    """Parameters ``make_policy(name, params)`` accepts."""
    return {f.name for f in fields(policy_class(name).config_cls) if f.init}


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> KVPolicy:
    """Build policy ``name`` with ``params`` over its defaults (docs/algorithm.md §9).

    Raises ``ValueError`` naming the unknown policy, the unknown parameter (with the allowed
    ones) or the bad value (with its allowed range). Strings such as ``"0.9"`` or
    ``"true"`` are converted to the parameter's type, since CLI and HTTP inputs arrive so.
    """
    cls = policy_class(name)
    allowed = policy_param_names(name)
    defaults = {f.name: f.default for f in fields(cls.config_cls) if f.init}
    values = {}
    for key, value in (params or {}).items():
        if key not in allowed:
            listed = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"unknown parameter {key!r} for KV policy {name!r}; allowed: {listed}")
        values[key] = coerce_value(value, type(defaults[key]))
    return cls(cls.config_cls(**values))
