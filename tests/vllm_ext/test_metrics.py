"""The KV policy's metrics: from a worker's counters to the front end's Prometheus metrics.

The fast tests follow the numbers through each hop with vLLM's real objects (its output
classes, its msgpack encoding of ``EngineCoreOutputs``, its stat logger manager); the slow
ones read ``/metrics`` of a live server.
"""

from __future__ import annotations

import pickle
import re
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from crystal_vllm.vllm_ext.metrics import (
    METRIC_PREFIX,
    CrystalKVStatLogger,
    KVStepStats,
    WorkerStatsReporter,
    attach_to_output,
    attach_to_scheduler_stats,
    stats_of_output,
)

CRYSTAL_CONFIG = {"kv_policy": "crystal", "kv_budget": 16}


def _summary(**values) -> SimpleNamespace:
    base = dict(
        evictions=0,
        prefill_evictions=0,
        reallocations=0,
        head_blocks_in_use=0,
        head_blocks_capacity=100,
        requests=0,
        kept_entries=0,
    )
    return SimpleNamespace(**{**base, **values})


def _vllm_config(additional_config: dict, model_name: str = "m") -> SimpleNamespace:
    return SimpleNamespace(
        additional_config=additional_config,
        model_config=SimpleNamespace(served_model_name=model_name),
    )


def _sample(name: str, engine: str = "0", model: str = "m") -> float | None:
    return REGISTRY.get_sample_value(METRIC_PREFIX + name, {"model_name": model, "engine": engine})


def test_worker_reports_increments_and_current_gauges() -> None:
    reporter = WorkerStatsReporter(heads_per_request=6)
    first = reporter.report(
        _summary(evictions=10, prefill_evictions=4, requests=2, kept_entries=120, reallocations=1)
    )
    assert (first.evicted_entries, first.prefill_evicted_entries) == (10, 4)
    assert first.budget_reallocations == 1
    assert first.kept_heads == 12 and first.mean_kept_entries == 10.0
    second = reporter.report(_summary(evictions=15, prefill_evictions=4, reallocations=1))
    assert (second.evicted_entries, second.prefill_evicted_entries) == (5, 0)
    assert second.budget_reallocations == 0
    assert second.requests == 0 and second.mean_kept_entries == 0.0


def test_merged_adds_increments_and_keeps_the_latest_gauges() -> None:
    a = KVStepStats(evicted_entries=3, head_blocks_in_use=9, requests=2)
    b = KVStepStats(evicted_entries=4, prefill_evicted_entries=1, head_blocks_in_use=1)
    merged = a.merged(b)
    assert (merged.evicted_entries, merged.prefill_evicted_entries) == (7, 1)
    assert (merged.head_blocks_in_use, merged.requests) == (1, 0)


def test_stats_ride_a_copy_of_the_shared_empty_output_through_pickle() -> None:
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    stats = KVStepStats(evicted_entries=5)
    output = attach_to_output(EMPTY_MODEL_RUNNER_OUTPUT, lambda: stats)
    assert output is not EMPTY_MODEL_RUNNER_OUTPUT
    assert stats_of_output(EMPTY_MODEL_RUNNER_OUTPUT) is None
    # The multiprocessing executor pickles the worker's output to the engine core.
    assert stats_of_output(pickle.loads(pickle.dumps(output))) == stats
    # Not a ModelRunnerOutput (None: sampling comes later): untouched, nothing reported.
    assert attach_to_output(None, lambda: pytest.fail("reported without an output")) is None


def test_stats_cross_vllms_msgpack_encoding_of_engine_core_outputs() -> None:
    """The engine core sends EngineCoreOutputs to the front end with vLLM's typed msgpack
    encoding, which keeps only declared fields: the stats must survive it."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    stats = KVStepStats(evicted_entries=7, head_blocks_in_use=3, kept_entries=30, kept_heads=6)
    outputs = {0: EngineCoreOutputs(scheduler_stats=SchedulerStats(num_running_reqs=1))}
    assert attach_to_scheduler_stats(outputs, stats)
    frames = MsgpackEncoder().encode(outputs[0])
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(frames)
    entries = decoded.scheduler_stats.num_kv_fetch_reqs_by_stage
    assert KVStepStats.pop_wire(entries) == stats
    assert entries == {}  # vLLM's own KV-fetch gauges see nothing of ours
    assert not attach_to_scheduler_stats({0: EngineCoreOutputs()}, stats)


def test_logger_exports_counters_and_gauges_with_vllms_labels() -> None:
    from vllm.v1.metrics.stats import SchedulerStats

    stat_logger = CrystalKVStatLogger(_vllm_config(CRYSTAL_CONFIG), engine_indexes=[0, 1])
    assert _sample("evicted_entries_total", engine="1") == 0.0
    scheduler_stats = SchedulerStats()
    step = KVStepStats(
        evicted_entries=11,
        prefill_evicted_entries=2,
        budget_reallocations=1,
        head_blocks_in_use=8,
        head_blocks_capacity=64,
        requests=2,
        kept_entries=36,
        kept_heads=12,
    )
    scheduler_stats.num_kv_fetch_reqs_by_stage.update(step.to_wire())
    stat_logger.record(scheduler_stats, None, engine_idx=1)
    stat_logger.record(scheduler_stats, None, engine_idx=1)  # popped: counted once
    assert scheduler_stats.num_kv_fetch_reqs_by_stage == {}
    assert _sample("evicted_entries_total", engine="1") == 11.0
    assert _sample("prefill_evicted_entries_total", engine="1") == 2.0
    assert _sample("budget_reallocations_total", engine="1") == 1.0
    assert _sample("head_blocks_in_use", engine="1") == 8.0
    assert _sample("head_blocks_capacity", engine="1") == 64.0
    assert _sample("num_requests_compressed", engine="1") == 2.0
    assert _sample("mean_kept_entries_per_head", engine="1") == 3.0
    assert _sample("evicted_entries_total", engine="0") == 0.0

    # An engine built again in this process (a new front-end logger) registers anew,
    # without Prometheus's duplicate-timeseries error, and counts from there.
    again = CrystalKVStatLogger(_vllm_config(CRYSTAL_CONFIG), engine_indexes=[0])
    assert _sample("evicted_entries_total") == 0.0
    scheduler_stats.num_kv_fetch_reqs_by_stage.update(KVStepStats(evicted_entries=4).to_wire())
    again.record(scheduler_stats, None, engine_idx=0)
    assert _sample("evicted_entries_total") == 4.0


def test_logger_stays_out_with_policy_none() -> None:
    from vllm.v1.metrics.stats import SchedulerStats

    CrystalKVStatLogger(_vllm_config(CRYSTAL_CONFIG, model_name="before"))
    stat_logger = CrystalKVStatLogger(_vllm_config({}, model_name="vanilla"))
    assert not stat_logger.enabled
    scheduler_stats = SchedulerStats()
    scheduler_stats.num_kv_fetch_reqs_by_stage.update(KVStepStats(evicted_entries=4).to_wire())
    stat_logger.record(scheduler_stats, None)
    assert scheduler_stats.num_kv_fetch_reqs_by_stage == {}
    assert _sample("evicted_entries_total", model="vanilla") is None


def test_plugin_loggers_run_before_vllms_own() -> None:
    """The front end strips our keys before vLLM's loggers read the KV-fetch counts: vLLM's
    StatLoggerManager must keep putting plugin loggers first."""
    import inspect

    from vllm.v1.metrics.loggers import StatLoggerManager

    source = inspect.getsource(StatLoggerManager.__init__)
    custom = source.index("stat_logger_factories.extend(custom_stat_loggers)")
    default = source.index("stat_logger_factories.append(default_logger_factory)")
    prometheus = source.index("PrometheusStatLogger(vllm_config, self.engine_indexes)")
    assert custom < default < prometheus


# -- over HTTP -------------------------------------------------------------------------


def _scrape(base_url: str) -> dict[str, float]:
    """Our metrics on /metrics, by name (engine 0; labels checked to be vLLM's)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "vllm:num_requests_running" in text  # next to vLLM's own
    values = {}
    for match in re.finditer(
        rf"^{re.escape(METRIC_PREFIX)}(\w+)\{{([^}}]*)\}} (\S+)$", text, flags=re.MULTILINE
    ):
        name, labels, value = match.groups()
        assert 'engine="0"' in labels and "model_name=" in labels, match.group(0)
        values[name] = float(value)
    return values


def _counters_rise_while_a_small_budget_request_runs(base_url: str, model: str) -> None:
    from openai import OpenAI

    before = _scrape(base_url)
    # Known from the start (the front end sizes it from vLLM's blocks), as the worker has it.
    assert before["head_blocks_capacity"] == _worker_summary(base_url)["head_blocks_capacity"] > 0
    assert before["head_blocks_in_use"] == 0 and before["num_requests_compressed"] == 0
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    seen: list[dict[str, float]] = []
    done = threading.Event()

    def scrape_until_done() -> None:
        # Apart from the stream's consumer, so a fast server cannot finish between two
        # scrapes that wait on chunk arrival (200 tokens took under 0.5 s on a CI machine).
        while not done.is_set():
            seen.append(_scrape(base_url))
            time.sleep(0.05)

    scraper = threading.Thread(target=scrape_until_done)
    scraper.start()
    # A prompt longer than prompt_budget (256) is cut at prefill; then decode evicts.
    stream = client.completions.create(
        model=model,
        prompt=[10 + i % 50 for i in range(300)],  # token ids
        max_tokens=1200,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True, "vllm_xargs": {"kv_budget": 8}},
    )
    for _chunk in stream:
        pass
    done.set()
    scraper.join()
    running = seen[:-1]  # the last one may have been taken after the final token
    assert len(running) >= 3, f"only {len(seen)} scrapes while 1200 tokens streamed"
    evicted = [s["evicted_entries_total"] for s in running]
    assert evicted == sorted(evicted), evicted
    assert len(set(evicted) - {0.0}) >= 2, f"no rise while the request ran: {evicted}"
    assert max(s["prefill_evicted_entries_total"] for s in running) > 0
    assert any(s["num_requests_compressed"] == 1 for s in running)
    busy = [s for s in running if s["num_requests_compressed"] == 1]
    assert all(s["head_blocks_in_use"] > 0 for s in busy)
    # Budget 8 (+ the step's new token) plus the 256 prompt entries kept on top.
    assert all(256 < s["mean_kept_entries_per_head"] <= 256 + 8 + 1 for s in busy[1:]), busy
    second = running[-1]
    # After the finish the worker releases the request on the next (empty) step.
    deadline = time.monotonic() + 30
    while (after := _scrape(base_url))["head_blocks_in_use"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert after["head_blocks_in_use"] == 0 and after["num_requests_compressed"] == 0
    assert after["evicted_entries_total"] >= second["evicted_entries_total"]


def _worker_summary(base_url: str) -> dict:
    """The worker's own counters (vLLM's dev-mode /collective_rpc)."""
    import json

    request = urllib.request.Request(
        f"{base_url}/collective_rpc",
        data=json.dumps({"method": "crystal_kv_summary"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        (summary,) = json.loads(response.read())["results"]
    return summary


SERVER_ARGS = [
    "--enforce-eager",
    "--max-model-len",
    "1600",
    "--kv-policy",
    "crystal",
    "--kv-budget",
    "16",
]


@pytest.mark.slow
@pytest.mark.parametrize("api_servers", [1, 2], ids=["one-api-server", "two-api-servers"])
def test_metrics_over_http_match_the_worker(tiny_model, api_servers) -> None:
    openai = pytest.importorskip("openai")
    from crystal_vllm.serving import serve

    args = [*SERVER_ARGS, "--api-server-count", str(api_servers)]
    with serve(tiny_model, args, env={"VLLM_SERVER_DEV_MODE": "1"}) as srv:
        model = str(tiny_model)
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused")
        for _ in range(4):  # every API server knows the policy and checks kv_budget
            with pytest.raises(openai.BadRequestError, match=r"kv_budget 100 is invalid.*16\]"):
                client.completions.create(
                    model=model,
                    prompt="x",
                    max_tokens=2,
                    extra_body={"vllm_xargs": {"kv_budget": 100}},
                )
        _counters_rise_while_a_small_budget_request_runs(srv.base_url, model)
        # Concurrent requests spread over the API servers: every increment is counted
        # once, whichever process received it.
        threads = [
            threading.Thread(target=_one_request, args=(srv.base_url, model, i)) for i in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(1.0)
        truth = _worker_summary(srv.base_url)
        for _ in range(4):  # each scrape may be answered by another API server
            scraped = _scrape(srv.base_url)
            assert scraped["evicted_entries_total"] == truth["evictions"]
            assert scraped["prefill_evicted_entries_total"] == truth["prefill_evictions"]
            assert scraped["budget_reallocations_total"] == truth["reallocations"]
            assert scraped["head_blocks_in_use"] == truth["head_blocks_in_use"] == 0
            assert scraped["head_blocks_capacity"] == truth["head_blocks_capacity"]


def _one_request(base_url: str, model: str, i: int) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    client.completions.create(
        model=model,
        prompt="Once upon a time " * (5 + i),
        max_tokens=40 + 10 * i,
        temperature=0.0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"kv_budget": 4 + i}},
    )
