"""The one validated configuration object of crystal-vllm.

Values arrive from three places that all end in ``vllm_config.additional_config``:
the ``vllm serve`` flags (``--kv-policy``, ``--kv-budget``, ``--kv-policy-config``),
``--additional-config`` and the offline ``LLM(..., additional_config={...})``. Every
process (front end, EngineCore, worker) rebuilds the same :class:`CrystalKVConfig`
from that dict, so they cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: ``none`` is vanilla vLLM: the plugin stays out of the way entirely.
NO_POLICY = "none"

#: Keys of ``additional_config`` owned by this project.
ADDITIONAL_CONFIG_KEYS = ("kv_policy", "kv_budget", "kv_policy_config")

#: Keys of ``--kv-policy-config`` that the serving layer consumes itself; every other
#: key is a parameter of the policy and is validated by the policy's own config class.
SERVING_KEYS = ("think_end_token", "answer_reserve", "debug_checks")
SERVING_KEY_TYPES = {"think_end_token": int, "answer_reserve": int, "debug_checks": bool}

#: ``think_end_token`` value meaning "this model has no think stage".
NO_THINK_TOKEN = -1

DEFAULT_ANSWER_RESERVE = 1024

DEFAULT_BUDGET = 1024


def policy_names() -> tuple[str, ...]:
    """All values ``--kv-policy`` accepts."""
    from crystal_vllm.policy import POLICY_NAMES

    return (NO_POLICY, *POLICY_NAMES)


@dataclass(frozen=True)
class CrystalKVConfig:
    """What to evict and how much to keep.

    Attributes:
        policy: ``none`` (vanilla vLLM) or a policy of :mod:`crystal_vllm.policy`.
        budget: average KV entries kept per (layer, KV head) of one request.
        policy_params: parameters of the policy (docs/algorithm.md §9), validated by it.
        think_end_token: token id that ends the think stage; ``None`` means "the
            tokenizer's ``</think>`` if it has one" (resolved once, at startup), -1 means
            none (the whole generation is compressed).
        answer_reserve: entries each (layer, KV head) may grow by after the think stage
            ends, so the answer is not compressed (docs/algorithm.md §7); past it, eviction
            resumes at ``budget + answer_reserve``.
        debug_checks: check the cache invariants after every step (slow).
    """

    policy: str = NO_POLICY
    budget: int = DEFAULT_BUDGET
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    think_end_token: int | None = None
    answer_reserve: int = DEFAULT_ANSWER_RESERVE
    debug_checks: bool = False

    def __post_init__(self) -> None:
        allowed = policy_names()
        if self.policy not in allowed:
            raise ValueError(
                f"--kv-policy {self.policy!r} is not a known policy; "
                f"allowed values: {', '.join(allowed)}"
            )
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(
                f"--kv-budget {self.budget!r} is invalid: it must be an integer >= 1 "
                "(average tokens kept per layer and KV head)"
            )
        if self.think_end_token is not None and (
            isinstance(self.think_end_token, bool)
            or not isinstance(self.think_end_token, int)
            or self.think_end_token < NO_THINK_TOKEN
        ):
            raise ValueError(
                f"kv-policy-config think_end_token {self.think_end_token!r} is invalid: "
                "it must be a token id >= 0, -1 for none, or omitted to use the "
                "tokenizer's </think>"
            )
        if (
            isinstance(self.answer_reserve, bool)
            or not isinstance(self.answer_reserve, int)
            or self.answer_reserve < 0
        ):
            raise ValueError(
                f"kv-policy-config answer_reserve {self.answer_reserve!r} is invalid: "
                "it must be an integer >= 0"
            )
        if not isinstance(self.debug_checks, bool):
            raise ValueError(
                f"kv-policy-config debug_checks {self.debug_checks!r} is invalid: "
                "it must be true or false"
            )
        if self.policy == NO_POLICY:
            if self.policy_params:
                raise ValueError(
                    "--kv-policy-config sets policy parameters "
                    f"({', '.join(sorted(self.policy_params))}) but --kv-policy is 'none'; "
                    "choose a policy or drop them"
                )
        else:
            # Builds (and so validates) the policy's own dataclass config.
            self.make_policy()

    @property
    def has_think_stage(self) -> bool:
        """Whether a think-end token is known (after startup resolution)."""
        return self.think_end_token is not None and self.think_end_token != NO_THINK_TOKEN

    @property
    def enabled(self) -> bool:
        """Whether KV entries are managed by this project (any policy but ``none``)."""
        return self.policy != NO_POLICY

    def make_policy(self):  # -> crystal_vllm.policy.KVPolicy
        """A fresh policy object for this configuration."""
        from crystal_vllm.policy import make_policy

        return make_policy(self.policy, dict(self.policy_params))

    def to_additional_config(self) -> dict[str, Any]:
        """The ``additional_config`` entries that rebuild this object in another process."""
        params = dict(self.policy_params)
        if self.think_end_token is not None:
            params["think_end_token"] = self.think_end_token
        if self.answer_reserve != DEFAULT_ANSWER_RESERVE:
            params["answer_reserve"] = self.answer_reserve
        if self.debug_checks:
            params["debug_checks"] = True
        return {"kv_policy": self.policy, "kv_budget": self.budget, "kv_policy_config": params}

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> CrystalKVConfig:
        """Build and validate from ``vllm_config.additional_config``."""
        cfg = dict(additional_config or {})
        unknown = sorted(k for k in cfg if k.startswith("kv_") and k not in ADDITIONAL_CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"additional_config has unknown key(s) {', '.join(unknown)}; "
                f"crystal-vllm reads {', '.join(ADDITIONAL_CONFIG_KEYS)}"
            )
        params = parse_policy_config(cfg.get("kv_policy_config"))
        # Converted like policy parameters ("true", "1024"), as CLI and HTTP inputs arrive.
        serving = {
            key: coerce_value(params.pop(key), SERVING_KEY_TYPES[key])
            for key in SERVING_KEYS
            if key in params
        }
        budget = cfg.get("kv_budget", DEFAULT_BUDGET)
        if isinstance(budget, str):
            budget = _parse_int(budget, "--kv-budget")
        return cls(
            policy=str(cfg.get("kv_policy", NO_POLICY)),
            budget=budget,
            policy_params=params,
            **serving,
        )


def parse_policy_config(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``--kv-policy-config`` as a dict: accepts a JSON object string or a mapping."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"--kv-policy-config {value!r} is not valid JSON ({exc.msg}); "
            'expected an object such as \'{"top_p": 0.9, "lam": 0.6}\''
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(
            f"--kv-policy-config {value!r} must be a JSON object, got {type(parsed).__name__}"
        )
    return parsed


def _parse_int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is invalid: it must be an integer >= 1") from None


def coerce_value(value: Any, kind: type) -> Any:
    """Convert string inputs to ``kind``; leave other values, and strings that do not
    convert, to the config's validation (whose message names the allowed range)."""
    if not isinstance(value, str) or kind is str:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    text = value.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        return value
