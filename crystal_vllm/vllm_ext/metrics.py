"""The KV policy's Prometheus metrics on the API server's ``/metrics``, next to vLLM's own.

vLLM 0.32 has no channel for a worker's own numbers to reach the front end's metrics, so
they ride on the ones it has, one hop at a time:

1. worker: after each step the model runner attaches a :class:`KVStepStats` (counter
   increments since the last one it sent, gauges as they are now) to the
   ``ModelRunnerOutput`` it returns, as attribute :data:`OUTPUT_ATTR` (the output reaches
   the engine core pickled, attributes included);
2. engine core: :class:`~crystal_vllm.vllm_ext.scheduler.CrystalScheduler` adds up what
   arrives and, when vLLM attaches a ``SchedulerStats`` to an output for a front end,
   writes it there as integer entries of ``SchedulerStats.num_kv_fetch_reqs_by_stage``
   under keys that start with :data:`WIRE_PREFIX` (that dict is the only free-form
   field of ``SchedulerStats`` that crosses vLLM's typed msgpack decoding: unknown fields
   of a subclass are dropped there);
3. front end: :class:`CrystalKVStatLogger` (entry point ``vllm.stat_logger_plugins``) runs
   before vLLM's own loggers (vLLM puts plugin loggers first), takes those keys out again
   (so vLLM's KV-fetch gauges and log line never see them) and updates the metrics.

Counters travel as increments: vLLM hands each ``SchedulerStats`` to one front end only,
so with ``--api-server-count N`` each API server adds what reached it and Prometheus's
multiprocess collector sums the N processes; a restarted engine starts sending
increments from zero again and no counter goes backwards. Gauges are set by the API
server that got the latest stats and exported with ``multiprocess_mode="mostrecent"``,
as vLLM's are. Metric names start with ``crystal_kv:``, not ``vllm:``: vLLM unregisters
every ``vllm:`` collector whenever it builds its own Prometheus logger.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge
from vllm.v1.metrics.loggers import AggregateStatLoggerBase
from vllm.v1.outputs import ModelRunnerOutput

from crystal_vllm.config import CrystalKVConfig
from crystal_vllm.vllm_ext import get_logger

logger = get_logger(__name__)

#: Attribute of a ``ModelRunnerOutput`` that carries the step's :class:`KVStepStats`.
OUTPUT_ATTR = "crystal_kv_stats"

#: Prefix of the keys the stats travel under in ``SchedulerStats.num_kv_fetch_reqs_by_stage``.
WIRE_PREFIX = "crystal_kv:"

#: Prefix of every metric name (``_total`` is appended to counters on export).
METRIC_PREFIX = "crystal_kv:"

#: Label names of every metric, as vLLM's own.
LABELNAMES = ("model_name", "engine")


@dataclasses.dataclass
class KVStepStats:
    """What one or more worker steps report: counter increments and current gauges.

    All fields are integers (they cross vLLM's ``dict[str, int]`` field).
    """

    # Counter increments.
    evicted_entries: int = 0
    prefill_evicted_entries: int = 0
    budget_reallocations: int = 0
    # Gauges, as of the latest step.
    head_blocks_in_use: int = 0
    head_blocks_capacity: int = 0
    requests: int = 0
    kept_entries: int = 0  # summed over running requests, layers and KV heads
    kept_heads: int = 0  # running requests x layers x KV heads

    COUNTERS = ("evicted_entries", "prefill_evicted_entries", "budget_reallocations")

    def merged(self, later: KVStepStats) -> KVStepStats:
        """This report followed by ``later``: increments add up, gauges are ``later``'s."""
        merged = dataclasses.replace(later)
        for name in self.COUNTERS:
            setattr(merged, name, getattr(self, name) + getattr(later, name))
        return merged

    @property
    def mean_kept_entries(self) -> float:
        """Mean entries kept per (layer, KV head) of the running requests (0 when none)."""
        return self.kept_entries / self.kept_heads if self.kept_heads else 0.0

    def to_wire(self) -> dict[str, int]:
        return {WIRE_PREFIX + f.name: int(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def pop_wire(cls, entries: dict[str, int]) -> KVStepStats | None:
        """Take the stats out of ``entries`` (removing every ``crystal_kv:`` key); None when
        there were none."""
        keys = [key for key in entries if key.startswith(WIRE_PREFIX)]
        if not keys:
            return None
        values = {key[len(WIRE_PREFIX) :]: entries.pop(key) for key in keys}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: int(value) for name, value in values.items() if name in names})


class WorkerStatsReporter:
    """Turns a worker's cumulative :class:`~crystal_vllm.runtime.CacheSummary` into the
    increments since the last report (``heads_per_request``: layers x KV heads)."""

    def __init__(self, heads_per_request: int) -> None:
        self.heads_per_request = heads_per_request
        self._reported = dict.fromkeys(KVStepStats.COUNTERS, 0)

    def report(self, summary: Any) -> KVStepStats:
        """The stats of ``summary`` (a ``CacheSummary``), counters as increments since the
        previous call."""
        totals = {
            "evicted_entries": summary.evictions,
            "prefill_evicted_entries": summary.prefill_evictions,
            "budget_reallocations": summary.reallocations,
        }
        increments = {name: totals[name] - self._reported[name] for name in KVStepStats.COUNTERS}
        self._reported = totals
        return KVStepStats(
            **increments,
            head_blocks_in_use=summary.head_blocks_in_use,
            head_blocks_capacity=summary.head_blocks_capacity,
            requests=summary.requests,
            kept_entries=summary.kept_entries,
            kept_heads=summary.requests * self.heads_per_request,
        )


def attach_to_output(output: Any, stats_fn) -> Any:
    """``output`` with ``stats_fn()`` attached when it is a ``ModelRunnerOutput`` (a shallow
    copy: vLLM returns one shared empty output object); anything else unchanged."""
    if not isinstance(output, ModelRunnerOutput):
        return output
    output = copy.copy(output)
    setattr(output, OUTPUT_ATTR, stats_fn())
    return output


def stats_of_output(output: Any) -> KVStepStats | None:
    """The stats a worker attached to a ``ModelRunnerOutput`` (None if none)."""
    return getattr(output, OUTPUT_ATTR, None)


def attach_to_scheduler_stats(engine_core_outputs: Mapping[int, Any], stats: KVStepStats) -> bool:
    """Write ``stats`` into the ``SchedulerStats`` vLLM attached to one of this step's
    ``EngineCoreOutputs`` (at most one carries them); False when none does."""
    for outputs in engine_core_outputs.values():
        scheduler_stats = outputs.scheduler_stats
        if scheduler_stats is not None:
            scheduler_stats.num_kv_fetch_reqs_by_stage.update(stats.to_wire())
            return True
    return False


def _unregister_ours() -> None:
    """Remove this module's collectors from the default registry (a second logger in the
    same process, e.g. an engine built again, registers them anew)."""
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(METRIC_PREFIX):
            REGISTRY.unregister(collector)


#: (name, documentation) of each counter, keyed by its KVStepStats field.
COUNTER_METRICS = {
    "evicted_entries": (
        "evicted_entries",
        "KV entries evicted at decode time and by budget reallocation, summed over layers "
        "and KV heads.",
    ),
    "prefill_evicted_entries": (
        "prefill_evicted_entries",
        "Prompt KV entries dropped right after a prefill, summed over layers and KV heads.",
    ),
    "budget_reallocations": (
        "budget_reallocations",
        "Requests whose per-(layer, KV head) budgets the allocator moved (crystal).",
    ),
}

#: (name, documentation) of each gauge, keyed by what it reads.
GAUGE_METRICS = {
    "head_blocks_in_use": ("head_blocks_in_use", "Per-(layer, KV head) blocks held now."),
    "head_blocks_capacity": (
        "head_blocks_capacity",
        "Per-(layer, KV head) blocks of the whole KV cache.",
    ),
    "requests": ("num_requests_compressed", "Running requests whose KV entries are managed."),
    "mean_kept_entries": (
        "mean_kept_entries_per_head",
        "Mean KV entries kept per (layer, KV head) of the running requests.",
    ),
}


class CrystalKVStatLogger(AggregateStatLoggerBase):
    """Exports the KV policy's counters and gauges (does nothing with ``--kv-policy none``)."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None) -> None:
        self.engine_indexes = list(engine_indexes or [0])
        self.vllm_config = vllm_config
        config = CrystalKVConfig.from_additional_config(vllm_config.additional_config)
        self.enabled = config.enabled
        self.counters: dict[str, dict[int, Any]] = {}
        self.gauges: dict[str, dict[int, Any]] = {}
        if not self.enabled:
            return
        _unregister_ours()
        model_name = vllm_config.model_config.served_model_name
        labels = {idx: (model_name, str(idx)) for idx in self.engine_indexes}
        for field, (name, doc) in COUNTER_METRICS.items():
            metric = Counter(METRIC_PREFIX + name, doc, labelnames=LABELNAMES)
            self.counters[field] = {idx: metric.labels(*lv) for idx, lv in labels.items()}
        for field, (name, doc) in GAUGE_METRICS.items():
            metric = Gauge(
                METRIC_PREFIX + name, doc, labelnames=LABELNAMES, multiprocess_mode="mostrecent"
            )
            self.gauges[field] = {idx: metric.labels(*lv) for idx, lv in labels.items()}
            for gauge in self.gauges[field].values():
                # Set once, so that Prometheus's multiprocess collector (which skips a
                # "mostrecent" gauge never set) shows it from the start.
                gauge.set(0)

    def record(
        self,
        scheduler_stats,
        iteration_stats,
        mm_cache_stats=None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        stats = KVStepStats.pop_wire(scheduler_stats.num_kv_fetch_reqs_by_stage)
        if stats is None or not self.enabled or engine_idx not in self.engine_indexes:
            return
        for field, per_engine in self.counters.items():
            increment = getattr(stats, field)
            if increment > 0:
                per_engine[engine_idx].inc(increment)
        for field, per_engine in self.gauges.items():
            per_engine[engine_idx].set(getattr(stats, field))

    def log_engine_initialized(self) -> None:
        """Set the capacity gauge before the first step reports it (the engines are
        sized by now)."""
        if not self.enabled:
            return
        model, cache = self.vllm_config.model_config, self.vllm_config.cache_config
        if cache.num_gpu_blocks:
            heads = model.get_num_layers(self.vllm_config.parallel_config)
            heads *= model.get_total_num_kv_heads()
            for gauge in self.gauges["head_blocks_capacity"].values():
                gauge.set(cache.num_gpu_blocks * heads)
        logger.info(
            "crystal-vllm: KV policy metrics on /metrics as %s* (labels %s)",
            METRIC_PREFIX,
            ", ".join(LABELNAMES),
        )
