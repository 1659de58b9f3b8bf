"""Per-request overrides (OpenAI ``vllm_xargs`` / ``SamplingParams.extra_args``).

``kv_budget`` lets one request keep fewer KV entries than the server's ``--kv-budget``
(never more: the server's memory quota is sized from its own budget). Validation runs
in the front end through a logits-processor plugin's ``validate_params`` hook, which
is where vLLM turns a ``ValueError`` into an HTTP 400 for that request alone. The rule
itself is :func:`crystal_vllm.budget.requested_budget`. The same hook refuses
``prompt_logprobs`` where chunked prefill would make them inexact (see the platform).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from crystal_vllm.budget import requested_budget


class KVRequestValidator(LogitsProcessor):
    """Validates ``kv_*`` extra arguments; changes no logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        from crystal_vllm.vllm_ext.platform import prompt_logprobs_refusal, server_config

        config = server_config()
        if config is not None:
            requested_budget(sampling_params.extra_args, config)
        refusal = prompt_logprobs_refusal()
        if refusal is not None and sampling_params.prompt_logprobs is not None:
            raise ValueError(refusal)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass
