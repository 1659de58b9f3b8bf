"""Per-request validation (the front end's HTTP 400s): ``kv_budget`` and ``prompt_logprobs``."""

from __future__ import annotations

import pytest
from vllm.engine.arg_utils import EngineArgs
from vllm.sampling_params import SamplingParams

from crystal_vllm.vllm_ext.request_params import KVRequestValidator


def _serve(tiny_model, prompt: str, chunked: bool) -> None:
    """Build a server config in this process, as `vllm serve` does in its front end."""
    EngineArgs(
        model=str(tiny_model),
        enforce_eager=True,
        max_model_len=512,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=None if chunked else 512,
        additional_config={
            "kv_policy": "crystal",
            "kv_budget": 64,
            "kv_policy_config": {"prompt": prompt},
        },
    ).create_engine_config()


@pytest.mark.parametrize(
    ("prompt", "chunked", "refused"),
    [
        ("compress", True, True),
        ("evict", True, True),
        ("keep", True, False),
        ("compress", False, False),
    ],
)
def test_prompt_logprobs_are_refused_only_where_chunks_make_them_inexact(
    tiny_model, prompt, chunked, refused
) -> None:
    _serve(tiny_model, prompt, chunked)
    KVRequestValidator.validate_params(SamplingParams(max_tokens=4))  # no prompt logprobs
    asking = SamplingParams(max_tokens=4, prompt_logprobs=1)
    if refused:
        with pytest.raises(ValueError, match=f"prompt mode '{prompt}' and chunked prefill"):
            KVRequestValidator.validate_params(asking)
    else:
        KVRequestValidator.validate_params(asking)


def test_a_budget_above_the_servers_is_refused(tiny_model) -> None:
    _serve(tiny_model, "keep", True)
    with pytest.raises(ValueError, match="kv_budget"):
        KVRequestValidator.validate_params(
            SamplingParams(max_tokens=4, extra_args={"kv_budget": 65})
        )
