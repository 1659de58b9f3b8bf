"""Tensor parallelism inside a real vLLM engine: two CPU workers (shared-memory TP), each
holding, attending over and evicting one of the tiny model's two KV heads.

vLLM's CPU worker refuses TP=2 on a one-NUMA-node machine unless it is told which cores
each rank binds to, so these tests set ``VLLM_CPU_OMP_THREADS_BIND`` (one core per rank
on the 2-core test machine; ``0|0`` would work too, only slower).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _bind_one_core_per_rank(monkeypatch) -> None:
    cores = os.cpu_count() or 1
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1" if cores >= 2 else "0|0")


def _tp(tp: int, *args: str) -> tuple[str, ...]:
    return ("--tensor-parallel-size", str(tp), "--dtype", "float32", *args)


def _total(result: dict, key: str) -> int:
    return sum(rank[key] for rank in result["ranks"])


def test_tp2_is_token_identical_to_tp1_above_every_length(tiny_model_fp32, offline_generate):
    config = {"kv_policy": "crystal", "kv_budget": 4096}
    one = offline_generate(tiny_model_fp32, config, *_tp(1))
    two = offline_generate(tiny_model_fp32, config, *_tp(2))
    assert len(two["ranks"]) == 2
    assert all(rank["steps"] > 0 and rank["evictions"] == 0 for rank in two["ranks"])
    assert two["tokens"] == one["tokens"]
    # Each rank holds its own heads: the prompt compression of the ranks adds up to TP=1's.
    assert _total(two, "prefill_evictions") == _total(one, "prefill_evictions") > 0
    assert _total(two, "head_blocks_in_use") == _total(one, "head_blocks_in_use")


@pytest.mark.parametrize(("policy", "prompt"), [("crystal", "keep"), ("snapkv", "evict")])
def test_tp2_small_budget_evicts_and_keeps_the_invariants(
    tiny_model_fp32, offline_generate, policy, prompt
) -> None:
    policy_config = {"debug_checks": True, "prompt": prompt, "prompt_budget": 8}
    if policy == "snapkv":
        policy_config["buffer"] = 8
    budget = 16
    if policy == "crystal":
        # The default boundary rule moves budget only between the heads of one layer, and
        # here a rank has one KV head per layer: the utilisation rule also moves it between
        # layers. Budgets move in whole head-blocks: the kept prompts leave room in them
        # (as test_eviction_engine.py's adaptive-budget test).
        policy_config.update(
            realloc_interval=4, realloc_rule="utilisation", min_tokens=1, floor_ratio=0.0
        )
        budget = 24
    config = {"kv_policy": policy, "kv_budget": budget, "kv_policy_config": policy_config}
    result = offline_generate(
        tiny_model_fp32, config, *_tp(2, "--block-size", "32", "--max-tokens", "64")
    )
    # debug_checks raised inside a worker if a head broke its bound; the run completed.
    assert all(rank["evictions"] > 0 for rank in result["ranks"])
    assert all(len(tokens) == 64 for tokens in result["tokens"])
    if policy == "crystal":
        assert all(rank["reallocations"] > 0 for rank in result["ranks"])


def test_random_at_tp2_keeps_what_tp1_keeps(tiny_model_fp32, offline_generate) -> None:
    """``random`` decides from (seed, position, model-wide KV head) only, so a rank keeps
    exactly what one worker keeps for the same heads: same evictions, same tokens."""
    config = {
        "kv_policy": "random",
        "kv_budget": 16,
        "kv_policy_config": {"debug_checks": True, "prompt": "evict"},
    }
    args = ("--block-size", "32", "--max-tokens", "48")
    one = offline_generate(tiny_model_fp32, config, *_tp(1, *args))
    two = offline_generate(tiny_model_fp32, config, *_tp(2, *args))
    assert _total(one, "evictions") > 0
    assert [rank["evictions"] for rank in two["ranks"]] == [_total(one, "evictions") // 2] * 2
    assert two["tokens"] == one["tokens"]


def test_tp2_blocks_stay_capped_rank_shares_hold_and_nothing_leaks(tiny_model) -> None:
    # As test_lifecycle.py, fewer requests: aborts, preemptions, per-request budgets; every
    # step each rank's crystal targets sum to the request's budget x its (layer, head)s.
    probe = [HERE / "lifecycle_probe.py", tiny_model, "crystal", "48", "80", "40", "compress", "2"]
    result = subprocess.run(
        [sys.executable, *probe],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # The worker processes may log to stdout after the report: take the report's line.
    report = json.loads([ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1])
    assert report["max_over_cap"] <= 0
    assert report["aborted"] > 0
    assert report["preempted_requests"] > 0
    assert report["share_checks"] > 0
    assert report["free_blocks"] == report["total_blocks"] - 1
    for rank in report["ranks"]:
        assert rank["evictions"] > 0
        assert set(rank["runtime_rows_left"]) <= {"flush"}
        assert rank["head_blocks_held_by_others"] == 0


def _cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@pytest.mark.skipif(
    _cpu_platform(),
    reason="vLLM 0.32's CPU platform has no Ray support (CpuPlatform.ray_device_key is empty; "
    "vanilla vLLM fails with 'current platform cpu does not support ray'); the plugin "
    "refuses Ray on CPU at startup (test_platform.py). Runs where vLLM picks CUDA.",
)
def test_tp2_serves_through_a_local_ray_cluster(tiny_model_fp32, offline_generate, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install .[ray])")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--port", str(port), "--num-cpus", "4"]
        + ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(tmp_path)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(20)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        config = {"kv_policy": "crystal", "kv_budget": 4096}
        mp = offline_generate(tiny_model_fp32, config, *_tp(2))
        ray_run = offline_generate(tiny_model_fp32, config, *_tp(2, "--executor", "ray"))
        assert ray_run["tokens"] == mp["tokens"]
        assert all(rank["steps"] > 0 for rank in ray_run["ranks"])
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        os.killpg(head.pid, 15)  # the head and the raylet/GCS it started, nothing else
        head.wait(timeout=60)
