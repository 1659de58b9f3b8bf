"""Load a running ``vllm serve`` with concurrent streaming completions, and watch it.

Clients stream from ``/v1/completions`` with token-id prompts, ``ignore_eos`` and
``return_token_ids`` (so every chunk says how many tokens it carries), and time each
request from the stream. Meanwhile ``/metrics`` is polled for vLLM's running- and
waiting-requests gauges and KV block usage (:func:`poll_metrics`, also used with other
clients; the KV policy's own ``crystal_kv:*`` metrics are read by ``benchmarks/soak.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common.engine_runs import RequestTiming

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_INFO = "vllm:cache_config_info"


# -- Prometheus ----------------------------------------------------------------------------


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample called ``name`` in a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


@dataclass(frozen=True)
class ServerGauges:
    """One reading of vLLM's scheduler gauges (summed over engines)."""

    running: float
    kv_usage: float  # fraction of the usable KV blocks in use
    waiting: float = 0.0  # queued in the scheduler (preempted ones included)

    @classmethod
    def parse(cls, text: str) -> ServerGauges:
        values = {}
        for name in (RUNNING, KV_USAGE, WAITING):
            samples = metric_samples(text, name)
            if not samples:
                raise ValueError(f"the server's /metrics has no {name}")
            values[name] = sum(value for _, value in samples)
        return cls(running=values[RUNNING], kv_usage=values[KV_USAGE], waiting=values[WAITING])


def server_num_blocks(text: str) -> int | None:
    """``num_gpu_blocks`` of ``vllm:cache_config_info`` (the pool, null block included)
    in a ``/metrics`` page."""
    for labels, _ in metric_samples(text, CACHE_INFO):
        blocks = labels.get("num_gpu_blocks", "None")
        if blocks.isdigit():
            return int(blocks)
    return None


# -- streaming clients ---------------------------------------------------------------------


def timing_from_stream(
    start: float, events: Sequence[tuple[float, int]], reported_tokens: int | None
) -> RequestTiming:
    """A request's timing from its stream: ``events`` are (arrival time, tokens in the
    chunk); chunks without tokens are ignored. ``reported_tokens`` (the usage block) must
    agree with the tokens counted, when given."""
    carrying = [(t, n) for t, n in events if n > 0]
    if not carrying:
        raise ValueError("the stream carried no tokens")
    counted = sum(n for _, n in carrying)
    if reported_tokens is not None and reported_tokens != counted:
        raise ValueError(f"the stream carried {counted} tokens, its usage says {reported_tokens}")
    return RequestTiming(
        start=start, first_token=carrying[0][0], end=carrying[-1][0], output_tokens=counted
    )


async def stream_events(
    client, model: str, prompt: list[int], max_tokens: int, events: list[tuple[float, int]]
) -> int | None:
    """Stream one greedy completion of ``max_tokens`` tokens (``ignore_eos``), appending
    ``(arrival time, tokens in the chunk)`` to ``events`` as chunks arrive (so a caller that
    cancels the request still has them); returns the tokens the usage block reports."""
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    reported = None
    async for chunk in stream:
        now = time.perf_counter()
        for choice in chunk.choices:
            events.append((now, len(getattr(choice, "token_ids", None) or ())))
        if chunk.usage is not None:
            reported = chunk.usage.completion_tokens
    return reported


async def stream_completion(
    client, model: str, prompt: list[int], max_tokens: int
) -> RequestTiming:
    """One streaming completion of exactly ``max_tokens`` tokens (``ignore_eos``)."""
    start = time.perf_counter()
    events: list[tuple[float, int]] = []
    reported = await stream_events(client, model, prompt, max_tokens, events)
    timing = timing_from_stream(start, events, reported)
    if timing.output_tokens != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens, got {timing.output_tokens}")
    return timing


async def poll_metrics(
    http,
    url: str,
    interval: float,
    t0: float,
    stop: asyncio.Event,
    out: list,
    parse: Callable[[str], Any] = ServerGauges.parse,
) -> None:
    """Append ``(seconds since t0, parse(page))`` (by default a :class:`ServerGauges`) to
    ``out`` every ``interval`` seconds until ``stop`` is set (``http``: an
    ``httpx.AsyncClient``, ``url``: /metrics)."""
    while not stop.is_set():
        response = await http.get(url)
        response.raise_for_status()
        out.append((time.perf_counter() - t0, parse(response.text)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


@dataclass
class LoadResult:
    """What one load run measured; times are seconds since the first request was sent."""

    elapsed: float
    timings: list[RequestTiming] = field(default_factory=list)
    gauges: list[tuple[float, ServerGauges]] = field(default_factory=list)


async def run_load(
    base_url: str,
    model: str,
    prompts: Sequence[list[int]],
    max_tokens: int,
    concurrency: int,
    poll_interval: float,
    label: str,
) -> LoadResult:
    """Send every prompt with at most ``concurrency`` in flight while polling /metrics,
    with a progress bar named ``label``."""
    import httpx
    from openai import AsyncOpenAI
    from tqdm import tqdm

    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    stop = asyncio.Event()
    gauges: list[tuple[float, ServerGauges]] = []
    timings: list[RequestTiming] = []

    async with (
        AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key="unused", timeout=3600.0, max_retries=0
        ) as client,
        httpx.AsyncClient(timeout=30.0) as http,
    ):
        bar = tqdm(total=len(prompts), desc=label, unit="req", leave=False)

        async def client_loop() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                timings.append(await stream_completion(client, model, prompt, max_tokens))
                bar.update()

        t0 = time.perf_counter()
        poller = asyncio.create_task(
            poll_metrics(http, f"{base_url}/metrics", poll_interval, t0, stop, gauges)
        )
        try:
            await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(prompts)))))
        finally:
            elapsed = time.perf_counter() - t0
            stop.set()
            await poller
            bar.close()
    shifted = [
        RequestTiming(t.start - t0, t.first_token - t0, t.end - t0, t.output_tokens)
        for t in timings
    ]
    return LoadResult(elapsed=elapsed, timings=shifted, gauges=gauges)
