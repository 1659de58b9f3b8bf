"""A request's KV budget and block cap over its life: one rule for every side.

The scheduler (block caps), the worker (per-head budgets) and the replay benchmark all
call :class:`BudgetRule`, so they cannot disagree:

* a request starts at its own ``kv_budget`` (``vllm_xargs``; at most the server's
  ``--kv-budget``, which sizes the memory);
* once it has emitted the think-end token its budget is ``kv_budget + answer_reserve``,
  once: a second think-end token changes nothing;
* its cap in vLLM blocks holds the policy's ``max_resident(budget)`` entries per head,
  plus the prompt entries the policy keeps on top of the budget (``prompt`` ``keep``:
  all of them, ``compress``: ``prompt_budget`` at most, ``evict``: none), never more
  than a whole sequence needs. Adaptive budgets need no slack: they move in whole
  head-blocks within what the uniform budget was granted (``CrystalPolicy.end_step``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from crystal_vllm.config import CrystalKVConfig

#: Keys a request may set in ``vllm_xargs`` / ``SamplingParams.extra_args``.
REQUEST_KEYS = ("kv_budget",)


def requested_budget(extra_args: Mapping[str, Any] | None, server: CrystalKVConfig) -> int:
    """The ``kv_budget`` one request asks for (the server's by default); raises
    ``ValueError`` naming the bad value and the allowed range."""
    extra = extra_args or {}
    unknown = sorted(k for k in extra if k.startswith("kv_") and k not in REQUEST_KEYS)
    if unknown:
        raise ValueError(
            f"unknown per-request KV option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(REQUEST_KEYS)}"
        )
    if "kv_budget" not in extra:
        return server.budget
    budget = extra["kv_budget"]
    if not server.enabled:
        raise ValueError("kv_budget was given, but this server runs with --kv-policy none")
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= server.budget:
        raise ValueError(
            f"kv_budget {budget!r} is invalid: it must be an integer in [1, {server.budget}] "
            "(at most the server's --kv-budget)"
        )
    return budget


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BudgetRule:
    """Budgets and block caps of one server's requests (see the module docstring)."""

    config: CrystalKVConfig
    block_size: int
    max_model_len: int
    policy: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BudgetRule {name} {value!r} is invalid: it must be an int >= 1")
        object.__setattr__(self, "policy", self.config.make_policy())

    def think_ends(self, token_ids: Iterable[int]) -> bool:
        """Whether ``token_ids`` contain the think-end token (never, without a think stage)."""
        return self.config.has_think_stage and self.config.think_end_token in token_ids

    def budget(self, kv_budget: int, *, think_ended: bool) -> int:
        """Entries per (layer, KV head) of a request that asked for ``kv_budget``."""
        return kv_budget + self.config.answer_reserve if think_ended else kv_budget

    @property
    def max_budget(self) -> int:
        """The largest budget any request reaches: what the per-request memory is sized for."""
        return self.budget(self.config.budget, think_ended=self.config.has_think_stage)

    def resident_entries(self, budget: int, prompt_len: int) -> int:
        """Most entries one head of a request holds: its budget's bound plus the prompt
        entries kept on top of it, never more than the whole sequence."""
        return min(self.policy.resident_bound(budget, prompt_len), self.max_model_len)

    def cap_blocks(self, budget: int, prompt_len: int) -> int:
        """vLLM blocks a request with ``budget`` and a ``prompt_len``-token prompt may hold."""
        resident = self.resident_entries(budget, prompt_len)
        whole_sequence = _cdiv(self.max_model_len, self.block_size)
        return min(_cdiv(resident, self.block_size), whole_sequence)

    @property
    def max_cap_blocks(self) -> int:
        """The cap of a request at :attr:`max_budget` with the longest prompt: the KV-cache
        spec's cap (what the worker sizes its per-head tables for)."""
        return self.cap_blocks(self.max_budget, self.max_model_len)
