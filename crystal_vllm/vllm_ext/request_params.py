"""Per-request overrides (OpenAI ``vllm_xargs`` / ``SamplingParams.extra_args``).

``kv_budget`` lets one request keep fewer KV entries than the server's ``--kv-budget``
(never more: the server's memory quota is sized from its own budget). Validation runs
in the front end through a logits-processor plugin's ``validate_params`` hook, which
is where vLLM turns a ``ValueError`` into an HTTP 400 for that request alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from crystal_vllm.config import CrystalKVConfig

REQUEST_KEYS = ("kv_budget",)


def request_budget(extra_args: Mapping[str, Any] | None, server: CrystalKVConfig) -> int:
    """The budget one request runs with; raises ``ValueError`` naming the bad value."""
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


class KVRequestValidator(LogitsProcessor):
    """Validates ``kv_*`` extra arguments; changes no logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        from crystal_vllm.vllm_ext.platform import server_config

        config = server_config()
        if config is not None:
            request_budget(sampling_params.extra_args, config)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass
