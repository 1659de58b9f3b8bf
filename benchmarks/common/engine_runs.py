"""Pieces shared by the speed benchmarks (throughput, latency): cases, engine settings,
deterministic prompts, KV byte accounting, timing math and the per-case subprocess.

Every case runs in a fresh process so that one case's allocator state, threads and
compiled kernels never leak into the next; the child reports progress and its result as
tagged lines on stdout (vLLM logs there too, untagged).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROGRESS_TAG = "PROGRESS "
RESULT_TAG = "RESULT "

#: Bytes per K or V element: every side runs bf16.
DTYPE_BYTES = 2

Case = tuple[str, int | None]


# -- cases ---------------------------------------------------------------------------------


def parse_case(text: str) -> Case:
    """``none`` or ``POLICY:BUDGET`` with a policy ``--kv-policy`` accepts (argparse type)."""
    from crystal_vllm.config import policy_names

    if text == "none":
        return "none", None
    policy, sep, budget = text.partition(":")
    if not sep or not budget.isdigit() or int(budget) < 1:
        raise argparse.ArgumentTypeError(
            f"case {text!r} must be 'none' or POLICY:BUDGET with BUDGET >= 1 (e.g. crystal:256)"
        )
    policies = [name for name in policy_names() if name != "none"]
    if policy not in policies:
        raise argparse.ArgumentTypeError(
            f"case {text!r}: unknown policy {policy!r}; known: {', '.join(policies)}"
        )
    return policy, int(budget)


def case_label(policy: str, budget: int | None) -> str:
    return policy if budget is None else f"{policy}:{budget}"


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be an integer >= 1")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be a number > 0")
    return value


def block_size_arg(text: str) -> int:
    """vLLM's CPU attention needs block sizes that are multiples of 32 (argparse type)."""
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(
            f"block size {value} is invalid: vLLM's CPU attention needs a multiple of 32"
        )
    return value


# -- model geometry and KV bytes -----------------------------------------------------------


@dataclass(frozen=True)
class KVGeometry:
    """What sizes a model's KV cache: layers, KV heads, head size, longest context."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> KVGeometry:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        heads = config["num_attention_heads"]
        return cls(
            num_layers=config["num_hidden_layers"],
            num_kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            max_context=config["max_position_embeddings"],
        )

    def head_block_bytes(self, block_size: int) -> int:
        """One (layer, KV head) slice of a block: ``block_size`` K and V vectors."""
        return block_size * self.head_dim * 2 * DTYPE_BYTES

    def block_bytes(self, block_size: int) -> int:
        """One vLLM block: a head-block for every layer and KV head."""
        return self.num_layers * self.num_kv_heads * self.head_block_bytes(block_size)


def kv_bytes_held(
    policy: str,
    geometry: KVGeometry,
    block_size: int,
    peak_blocks: int | None,
    peak_head_blocks: int | None,
) -> int | None:
    """KV bytes really held at the peak, or None when the count it needs is unknown.

    A policy writes K/V into head-blocks and frees a head-block once every entry in it is
    evicted, so it holds ``head-blocks x bytes per head-block`` (at most its vLLM blocks);
    vanilla vLLM holds whole blocks.
    """
    if policy == "none":
        return None if peak_blocks is None else peak_blocks * geometry.block_bytes(block_size)
    if peak_head_blocks is None:
        return None
    return peak_head_blocks * geometry.head_block_bytes(block_size)


# -- engine settings and prompts -----------------------------------------------------------


def engine_settings(max_model_len: int, block_size: int, max_num_seqs: int) -> dict[str, Any]:
    """Engine arguments every side of a comparison shares (offline ``LLM`` keywords).

    Chunked prefill and prefix caching are off on every side because an active policy turns
    both off; a whole prompt then prefills in one step everywhere (vLLM also wants a step
    to fit one token of every running request).
    """
    return {
        "enforce_eager": True,
        "dtype": "bfloat16",
        "max_model_len": max_model_len,
        "block_size": block_size,
        "max_num_seqs": max_num_seqs,
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(max_model_len, max_num_seqs),
        "seed": 0,
    }


def cli_flags(settings: dict[str, Any]) -> list[str]:
    """The same settings as ``vllm serve`` flags (``True`` -> ``--x``, ``False`` -> ``--no-x``)."""
    flags: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def policy_config(policy: str, budget: int | None) -> dict[str, Any]:
    """``additional_config`` for a case (empty for vanilla)."""
    return {} if policy == "none" else {"kv_policy": policy, "kv_budget": budget}


def prompt_tokens(index: int, length: int, vocab_size: int) -> list[int]:
    """Deterministic token ids for prompt ``index``: distinct prompts, no special tokens."""
    return [(7919 * (index * length + j) + 13) % (vocab_size - 100) + 50 for j in range(length)]


# -- timing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestTiming:
    """When a request was sent, produced its first token and its last, and how many."""

    start: float
    first_token: float
    end: float
    output_tokens: int

    def __post_init__(self) -> None:
        if self.output_tokens < 1:
            raise ValueError(f"a timed request needs >= 1 output token, got {self.output_tokens}")
        if not self.start <= self.first_token <= self.end:
            raise ValueError(
                f"times must satisfy start <= first token <= end, got {self.start}, "
                f"{self.first_token}, {self.end}"
            )

    @property
    def ttft(self) -> float:
        return self.first_token - self.start

    @property
    def tpot(self) -> float:
        """Seconds per output token after the first (NaN for a single-token request)."""
        if self.output_tokens == 1:
            return math.nan
        return (self.end - self.first_token) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float:
        return self.end - self.start


def latency_summary(timings: Sequence[RequestTiming]) -> dict[str, float]:
    """Median TTFT, TPOT and end-to-end latency over requests (seconds)."""
    tpots = [t.tpot for t in timings if not math.isnan(t.tpot)]
    return {
        "ttft_median_s": statistics.median(t.ttft for t in timings),
        "tpot_median_s": statistics.median(tpots) if tpots else math.nan,
        "e2e_median_s": statistics.median(t.e2e for t in timings),
    }


def time_weighted_mean(samples: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Mean of a step function over ``[start, end)``: each ``(time, value)`` sample holds
    until the next sample's time (the last one until ``end``); 0 before the first."""
    if end <= start:
        raise ValueError(f"empty window [{start}, {end})")
    total = 0.0
    for i, (t, value) in enumerate(samples):
        t_next = samples[i + 1][0] if i + 1 < len(samples) else end
        lo, hi = max(t, start), min(t_next, end)
        if hi > lo:
            total += value * (hi - lo)
    return total / (end - start)


def running_stats(samples: Sequence[tuple[float, float]], elapsed: float) -> dict[str, float]:
    """Peak, time-weighted mean and steady (time-weighted mean over the middle half of the
    run, past the ramp-up and before the tail) running requests."""
    return {
        "peak_running": max((n for _, n in samples), default=0),
        "mean_running": time_weighted_mean(samples, 0.0, elapsed),
        "steady_running": time_weighted_mean(samples, 0.25 * elapsed, 0.75 * elapsed),
    }


def downsample(samples: Sequence[tuple[float, float]], limit: int = 600) -> list:
    """At most ``limit`` evenly spaced samples, always keeping the last (for result files)."""
    if len(samples) <= limit:
        return list(samples)
    step = len(samples) / limit
    picked = [samples[int(i * step)] for i in range(limit - 1)]
    return [*picked, samples[-1]]


# -- one case per subprocess ---------------------------------------------------------------


def worker_env() -> dict[str, str]:
    """Environment of a case's process: in-process engine, no hub, one OpenMP thread unless
    the caller chose otherwise, and no ``VLLM_CPU_KVCACHE_SPACE`` (vLLM's CPU platform lets
    it replace ``kv_cache_memory_bytes``)."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def report_progress(count: int = 1) -> None:
    """Child side: ``count`` more units (requests, measurements) are done."""
    print(f"{PROGRESS_TAG}{count}", flush=True)


def report_result(result: dict[str, Any]) -> None:
    """Child side: the case's result, the last thing it prints."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(script: Path, spec: dict[str, Any], label: str, total: int) -> dict[str, Any]:
    """Run ``script --worker SPEC`` in a fresh process with a progress bar of ``total``
    units; return its result. Exits with the end of its output if it fails."""
    from tqdm import tqdm

    result = None
    untagged: deque[str] = deque(maxlen=40)
    with (
        tempfile.TemporaryFile(mode="w+") as stderr,
        tqdm(total=total, desc=label, unit="req", leave=False) as bar,
    ):
        proc = subprocess.Popen(
            [sys.executable, str(script), "--worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=worker_env(),
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS_TAG):
                bar.update(int(line[len(PROGRESS_TAG) :]))
            elif line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG) :])
            else:
                untagged.append(line.rstrip())
        proc.wait()
        if proc.returncode != 0 or result is None:
            stderr.seek(0)
            tail = stderr.read()[-4000:]
            raise SystemExit(
                f"case {label} failed (exit code {proc.returncode}):\n"
                + "\n".join(untagged)
                + "\n"
                + tail
            )
    return result


def open_engine(spec: dict[str, Any]) -> Any:
    """Child side: an in-process ``LLM`` with the shared settings, the case's policy and
    ``spec['kv_bytes']`` of KV memory."""
    from vllm import LLM

    return LLM(
        model=spec["model"],
        **spec["engine"],
        kv_cache_memory_bytes=spec["kv_bytes"],
        distributed_executor_backend="uni",
        additional_config=policy_config(spec["policy"], spec["budget"]),
    )


@dataclass
class EngineParts:
    """The in-process pieces a benchmark reads each step."""

    engine: Any
    scheduler: Any
    block_pool: Any
    cache: Any | None  # crystal_vllm's CompressedKVCache; None for vanilla vLLM

    @classmethod
    def of(cls, llm: Any) -> EngineParts:
        engine = llm.llm_engine
        core = engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
        return cls(
            engine=engine,
            scheduler=core.scheduler,
            block_pool=core.scheduler.kv_cache_manager.block_pool,
            cache=getattr(runner, "crystal_cache", None),
        )

    def blocks_in_use(self) -> int:
        """vLLM blocks held by requests (the pool's null block excluded)."""
        pool = self.block_pool
        return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()

    def total_blocks(self) -> int:
        return self.block_pool.num_gpu_blocks - 1

    def cache_summary(self) -> dict[str, Any] | None:
        return None if self.cache is None else self.cache.summary()

    def threads(self) -> int:
        """Torch threads of the engine (the CPU-time figures assume one)."""
        import torch

        return torch.get_num_threads()

    def ops_impl(self) -> str | None:
        """Which crystal_vllm ops implementation ran (C++ or torch), for the record."""
        if self.cache is None:
            return None
        from crystal_vllm import ops

        return ops.get_impl().__name__.rsplit(".", 1)[-1]
