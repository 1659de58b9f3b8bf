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
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common.cli import add_counts, add_model_arg, positive_int, resolve_model

PROGRESS_TAG = "PROGRESS "
KV_USAGE = "vllm:kv_cache_usage_perc"
RESULT_TAG = "RESULT "

#: Bytes per K or V element in bf16, the benchmarks' default dtype (KVGeometry.dtype_bytes).
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


def label_of(row: dict[str, Any]) -> str:
    return case_label(row["policy"], row["budget"])


def load_avg_cell(row: dict[str, Any]) -> str:
    return "{:.1f} / {:.1f}".format(*row["load_avg_1m"])


def block_size_arg(text: str) -> int:
    """vLLM's CPU attention needs block sizes that are multiples of 32 (argparse type)."""
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(
            f"block size {value} is invalid: vLLM's CPU attention needs a multiple of 32"
        )
    return value


def add_case_args(
    parser: argparse.ArgumentParser,
    cases: str,
    output_len: int,
    num_requests: int | None = None,
    prompt_len: int | None = None,
    kv_policy_config: str = "{}",
) -> None:
    """The arguments every speed benchmark takes: model, cases, request shape, block size,
    and the ``--kv-policy-config`` every policy case runs with."""
    add_model_arg(parser)
    parser.add_argument(
        "--cases",
        nargs="+",
        type=parse_case,
        default=[parse_case(c) for c in cases.split()],
        help="cases to run, each 'none' or POLICY:BUDGET, BUDGET = KV entries kept per "
        f"(layer, KV head) (default: {cases})",
    )
    add_counts(
        parser,
        ("--num-requests", num_requests, "requests per case"),
        ("--prompt-len", prompt_len, "prompt tokens per request"),
        ("--output-len", output_len, "tokens generated per request, ignore_eos"),
    )
    parser.add_argument(
        "--block-size",
        type=block_size_arg,
        default=32,
        help="KV block size in tokens, a multiple of 32 (default 32)",
    )
    parser.add_argument(
        "--kv-policy-config",
        type=json_object,
        default=json_object(kv_policy_config),
        help="JSON object of policy options for every case but none, as vllm serve's "
        f'--kv-policy-config, e.g. \'{{"prompt": "evict"}}\' (default: {kv_policy_config})',
    )


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object given on the command line, as a dict."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object")
    return value


# -- model geometry and KV bytes -----------------------------------------------------------


@dataclass(frozen=True)
class KVGeometry:
    """What sizes a model's KV cache: layers, KV heads, head size, longest context, and
    bytes per element of the dtype the engines run in."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    dtype_bytes: int = DTYPE_BYTES

    @classmethod
    def from_model_dir(cls, model_dir: Path, dtype: str = "bfloat16") -> KVGeometry:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        heads = config["num_attention_heads"]
        return cls(
            num_layers=config["num_hidden_layers"],
            num_kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            max_context=config["max_position_embeddings"],
            dtype_bytes=4 if dtype == "float32" else DTYPE_BYTES,
        )

    def head_block_bytes(self, block_size: int) -> int:
        """One (layer, KV head) slice of a block: ``block_size`` K and V vectors."""
        return block_size * self.head_dim * 2 * self.dtype_bytes

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


def model_geometry(name: str, dtype: str = "bfloat16") -> tuple[Path, KVGeometry, int]:
    """The model's folder in ``dtype`` (a bundled one is built on first use), KV geometry
    and vocabulary size (for :func:`prompt_tokens`)."""
    from transformers import AutoTokenizer

    model = resolve_model(name, dtype)
    geometry = KVGeometry.from_model_dir(model, dtype)
    return model, geometry, AutoTokenizer.from_pretrained(model).vocab_size


# -- engine settings and prompts -----------------------------------------------------------


def engine_settings(
    max_model_len: int,
    block_size: int | None = None,
    max_num_seqs: int | None = None,
    dtype: str = "bfloat16",
    tensor_parallel_size: int = 1,
) -> dict[str, Any]:
    """Engine arguments every side of a comparison shares (offline ``LLM`` keywords; a
    size left None is vLLM's default).

    Chunked prefill and prefix caching are off on every side because an active policy turns
    both off; a whole prompt then prefills in one step everywhere (vLLM also wants a step
    to fit one token of every running request).
    """
    settings = {
        "enforce_eager": True,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "block_size": block_size,
        "max_num_seqs": max_num_seqs,
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(max_model_len, max_num_seqs or 0),
        "seed": 0,
        # Only when above 1, so single-worker runs keep the flags they always had.
        "tensor_parallel_size": tensor_parallel_size if tensor_parallel_size > 1 else None,
    }
    return {key: value for key, value in settings.items() if value is not None}


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


def policy_config(
    policy: str, budget: int | None, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``additional_config`` for a case (empty for vanilla)."""
    if policy == "none":
        return {}
    return {
        "kv_policy": policy,
        "kv_budget": budget,
        **({"kv_policy_config": config} if config else {}),
    }


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


def case_spec(
    model: Path, case: Case, args: argparse.Namespace, vocab_size: int, **extra: Any
) -> dict[str, Any]:
    """What a case's process needs: model, policy, budget, the request shape (of
    ``--num-requests``, ``--prompt-len``, ``--output-len``, those the script has) and the
    vocabulary size, plus ``extra``."""
    shape = ("num_requests", "prompt_len", "output_len")
    policy, budget = case
    return {
        "model": str(model),
        "policy": policy,
        "budget": budget,
        "policy_config": getattr(args, "kv_policy_config", None) or None,
        **{key: getattr(args, key) for key in shape if hasattr(args, key)},
        "vocab_size": vocab_size,
        **extra,
    }


def progress(cases: Sequence[Case]) -> Iterator[Case]:
    from tqdm import tqdm

    yield from tqdm(cases, desc="cases", unit="case")


def measure_case(run: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``run(*args)`` plus the case's wall time and the machine's 1-minute load average when
    it started and ended (other jobs share the machine)."""
    start, load = time.perf_counter(), os.getloadavg()[0]
    result = run(*args)
    return {
        **result,
        "case_wall_s": time.perf_counter() - start,
        "load_avg_1m": [load, os.getloadavg()[0]],
    }


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


def parse_or_work(
    parser: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[dict], dict]
) -> argparse.Namespace:
    """The parsed arguments; in a case's own process (``--worker SPEC``) run the case,
    report its result and exit."""
    args = parser.parse_args(argv)
    if args.worker is not None:
        report_result(run(json.loads(args.worker)))
        raise SystemExit(0)
    return args


def run_worker(
    script: Path, spec: dict[str, Any], label: str, total: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script --worker SPEC`` in a fresh process (:func:`worker_env` plus ``env``)
    with a progress bar of ``total`` units; return its result. Exits with the end of its
    output if it fails."""
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
            env={**worker_env(), **(env or {})},
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


class Engine:
    """Child side: an in-process ``LLM`` with the shared settings, the case's policy (and
    its ``policy_config``) and ``kv_bytes`` of KV memory (if given), read through vLLM's
    public API only: vLLM's gauges from ``LLM.get_metrics()``, the policy's counters from
    ``LLM.collective_rpc("crystal_kv_summary")``.

    ``get_metrics`` walks the Prometheus registry (milliseconds, a large share of a small
    model's step), so :meth:`read` stops the clocks: :meth:`wall` and :meth:`cpu` (this
    process's CPU time) leave out the time spent reading.
    """

    def __init__(self, spec: dict[str, Any], **llm_args: Any) -> None:
        from vllm import LLM

        self.policy = spec["policy"]
        self.llm = LLM(
            model=spec["model"],
            **spec["engine"],
            kv_cache_memory_bytes=spec.get("kv_bytes"),
            # Tensor-parallel ranks are worker processes; one worker stays in this process.
            distributed_executor_backend="mp"
            if spec["engine"].get("tensor_parallel_size", 1) > 1
            else "uni",
            additional_config=policy_config(
                spec["policy"], spec["budget"], spec.get("policy_config")
            ),
            disable_log_stats=False,  # the gauges
            **llm_args,
        )
        self.engine = self.llm.llm_engine
        (info,) = [m for m in self.llm.get_metrics() if m.name == "vllm:cache_config_info"]
        self.total_blocks = int(info.labels["num_gpu_blocks"]) - 1  # vLLM's null block
        self._paused_wall = self._paused_cpu = 0.0

    def add(self, request_id: str, tokens: list[int], max_tokens: int) -> None:
        """One request of exactly ``max_tokens`` greedy tokens (``ignore_eos``)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=tokens), params)

    def add_batch(self, spec: dict[str, Any]) -> None:
        """``num_requests`` prompts of ``prompt_len`` tokens, ``output_len`` tokens each."""
        for i in range(spec["num_requests"]):
            tokens = prompt_tokens(i, spec["prompt_len"], spec["vocab_size"])
            self.add(str(i), tokens, spec["output_len"])

    def wall(self) -> float:
        return time.perf_counter() - self._paused_wall

    def cpu(self) -> float:
        return time.process_time() - self._paused_cpu

    def read(self) -> tuple[int, int | None]:
        """vLLM blocks in use (null block excluded) and the policy's head-blocks in use."""
        wall, cpu = time.perf_counter(), time.process_time()
        usage = sum(m.value for m in self.llm.get_metrics() if m.name == KV_USAGE)
        summary = self.summary()
        self._paused_wall += time.perf_counter() - wall
        self._paused_cpu += time.process_time() - cpu
        return round(usage * self.total_blocks), summary and summary["head_blocks_in_use"]

    def summary(self) -> dict[str, Any] | None:
        """The policy's counters (``crystal_vllm.runtime.CacheSummary``); None for vanilla,
        whose worker has no such method."""
        if self.policy == "none":
            return None
        summary, *others = self.llm.collective_rpc("crystal_kv_summary")
        # Tensor-parallel ranks each count their own KV heads: add the counters up.
        for rank in others:
            for key in ("evictions", "prefill_evictions", "reallocations", "head_blocks_in_use"):
                summary[key] += rank[key]
        return summary

    def evictions(self) -> int | None:
        """Entries evicted so far, after prefills included."""
        summary = self.summary()
        return summary and summary["evictions"] + summary["prefill_evictions"]

    def info(self) -> dict[str, Any]:
        """Torch threads (the CPU-time figures assume one) and which crystal_vllm ops
        implementation ran (C++ or torch), for the record."""
        import torch

        from crystal_vllm import ops

        impl = None if self.policy == "none" else ops.get_impl().__name__.rsplit(".", 1)[-1]
        return {"ops": impl, "torch_threads": torch.get_num_threads()}
