"""End to end: a real `vllm serve` on 127.0.0.1 with the plugin installed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from crystal_vllm.serving import serve, vllm_executable

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent


def test_help_lists_the_flags_with_explanations() -> None:
    result = subprocess.run(
        [vllm_executable(), "serve", "--help=CrystalKV"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    for flag in ("--kv-policy", "--kv-budget", "--kv-policy-config"):
        assert flag in text
    assert "{none,full,crystal,crystal-lite,lru,streaming,h2o,snapkv,rkv,random}" in text
    assert "Average number of KV entries kept per layer and KV head" in text


def test_bad_flag_value_refuses_to_start(tiny_model) -> None:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run(
        [vllm_executable(), "serve", str(tiny_model), "--kv-policy", "crystal", "--kv-budget", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode != 0
    assert "--kv-budget 0 is invalid: it must be an integer >= 1" in result.stderr + result.stdout


@pytest.mark.parametrize(
    "policy_args",
    [
        ["--kv-policy", "none"],
        ["--kv-policy", "crystal", "--kv-budget", "16", "--block-size", "32"],
    ],
    ids=["none", "crystal"],
)
def test_server_answers_the_openai_api(tiny_model, policy_args) -> None:
    openai = pytest.importorskip("openai")
    with serve(tiny_model, ["--enforce-eager", "--max-model-len", "512", *policy_args]) as srv:
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused")
        model = client.models.list().data[0].id

        completion = client.completions.create(
            model=model,
            prompt="Hello there " * 10,
            max_tokens=40,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        assert completion.usage.completion_tokens == 40
        assert isinstance(completion.choices[0].text, str)

        chat = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=8,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        assert chat.usage.completion_tokens == 8
        assert chat.choices[0].message.role == "assistant"

        stream = client.completions.create(
            model=model,
            prompt="Count:",
            max_tokens=6,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
        assert len(pieces) >= 2
        assert "".join(pieces)

        if "crystal" in policy_args:
            _check_per_request_budget(openai, client, model)
            # The startup decisions reach a plain `vllm serve` log through vLLM's handler
            # (its INFO format, file and line), with no logging configuration of ours.
            log = srv.log_path.read_text(errors="replace")
            startup = [line for line in log.splitlines() if "crystal-vllm: policy crystal" in line]
            assert startup, srv.log_tail()
            assert "INFO" in startup[0] and "runner_mixin.py" in startup[0]
            assert "budget 16 per (layer, KV head), prompt compress" in startup[0]
            assert "such requests fit in" in startup[0]


def _check_per_request_budget(openai, client, model: str) -> None:
    """A bad kv_budget is an HTTP 400 for that request only; a good one is served."""
    with pytest.raises(openai.BadRequestError, match=r"kv_budget 100000 is invalid.*\[1, 16\]"):
        client.completions.create(
            model=model, prompt="x", max_tokens=4, extra_body={"vllm_xargs": {"kv_budget": 100000}}
        )
    with pytest.raises(openai.BadRequestError, match="unknown per-request KV option"):
        client.completions.create(
            model=model, prompt="x", max_tokens=4, extra_body={"vllm_xargs": {"kv_budgt": 8}}
        )
    small = client.completions.create(
        model=model,
        prompt="Hello there " * 10,
        max_tokens=40,
        temperature=0.0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"kv_budget": 8}},
    )
    assert small.usage.completion_tokens == 40


def test_policy_none_is_token_identical_to_vllm_without_the_plugin(
    tiny_model_fp32, offline_generate
) -> None:
    vanilla = offline_generate(tiny_model_fp32, {}, plugins="")
    with_plugin = offline_generate(tiny_model_fp32, {"kv_policy": "none"})
    assert vanilla["platform"] == "CpuPlatform"
    assert with_plugin["platform"] == "CrystalCpuPlatform"
    assert len(vanilla["tokens"]) == 4 and all(len(t) == 32 for t in vanilla["tokens"])
    assert with_plugin["tokens"] == vanilla["tokens"]
