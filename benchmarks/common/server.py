"""A local ``vllm serve`` for a benchmark, and the KV policy's counters from its log.

The policy's counters are on ``/metrics`` (``crystal_kv:*``, see ``benchmarks/soak.py``);
the peak entries per head are only in the ``crystal-vllm: ...`` line the model runner logs
every ``STATS_LOG_INTERVAL_S`` (on a step) in vLLM's own log, which is parsed here.
Offline engines read the same counters with ``LLM.collective_rpc("crystal_kv_summary")``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The stats line; its evictions are the total, prefill evictions included; the peak
#: entries per (layer, KV head) are the mean over the requests released so far.
_STATS_LINE = re.compile(
    r"crystal-vllm: (?P<running>\d+) running, (?P<evictions>\d+) evictions, "
    r"(?P<reallocations>\d+) budget reallocations, (?P<head_blocks>\d+) head-blocks in use"
    r"(?:[^\n]*?peak entries per \(layer, KV head\): mean (?P<peak_mean>[\d.]+) over "
    r"(?P<released>\d+) released requests, max (?P<peak_max>[\d.]+))?"
)


@dataclass(frozen=True)
class CacheStats:
    """One periodic stats line of the policy's model runner."""

    running: int
    evictions: int
    reallocations: int
    head_blocks: int
    peak_mean: float | None = None
    released: int | None = None
    peak_max: float | None = None


def parse_cache_stats(log_text: str) -> list[CacheStats]:
    """Every stats line in a server log, in order."""
    return [
        CacheStats(
            **{
                key: (float(value) if key.startswith("peak") else int(value))
                for key, value in m.groupdict().items()
                if value is not None
            }
        )
        for m in _STATS_LINE.finditer(log_text)
    ]


def peak_entries_between(before: CacheStats | None, after: CacheStats) -> float | None:
    """Mean peak entries per (layer, KV head) of the requests released between two stats
    lines (the memory a case really used), or None when the lines do not say."""
    if after.peak_mean is None or after.released is None:
        return None
    n0 = before.released if before is not None and before.released is not None else 0
    m0 = before.peak_mean if before is not None and before.peak_mean is not None else 0.0
    released = after.released - n0
    if released <= 0:
        return None
    return (after.peak_mean * after.released - m0 * n0) / released


def logged_cache_stats(log_path: Path) -> list[CacheStats]:
    return parse_cache_stats(Path(log_path).read_text(errors="replace"))


def policy_flags(
    policy: str, budget: int | None, config: dict[str, Any] | None = None
) -> list[str]:
    """The ``vllm serve`` flags of a KV policy, its budget and its other parameters."""
    flags = ["--kv-policy", policy]
    if budget is not None:
        flags += ["--kv-budget", str(budget)]
    if config:
        flags += ["--kv-policy-config", json.dumps(config)]
    return flags


@contextlib.contextmanager
def policy_server(
    model: Path, flags: Sequence[str], log_path: Path, startup_timeout: float = 900.0
) -> Iterator[Any]:
    """``vllm serve MODEL FLAGS`` logging to ``log_path`` (the plugin's stats line is in
    vLLM's own log at INFO).

    The default start-up timeout is long: the server's processes each import vLLM, which
    took over 300 s on a 2-core machine shared with other jobs.
    """
    from crystal_vllm.serving import serve

    with serve(model, list(flags), log_path=log_path, startup_timeout=startup_timeout) as server:
        yield server


def flush_stats(base_url: str, model: str) -> None:
    """Get the policy's counters logged now: the runner logs them on a step at most every
    ``STATS_LOG_INTERVAL_S``, so wait that long and make one one-token step."""
    from openai import OpenAI

    from crystal_vllm.vllm_ext.runner_mixin import STATS_LOG_INTERVAL_S

    time.sleep(STATS_LOG_INTERVAL_S + 0.5)
    with OpenAI(base_url=f"{base_url}/v1", api_key="unused") as client:
        client.completions.create(model=model, prompt="1", max_tokens=1)
