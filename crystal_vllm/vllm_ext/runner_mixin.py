"""The compressed-KV behaviour of a vLLM V1 model runner, shared by the CPU and CUDA runners.

vLLM selects the worker class through ``parallel_config.worker_cls`` (set by the platform
when a policy is active); the worker builds a runner that mixes this class in before
vLLM's own runner. The runner owns the step lifecycle of its
:class:`~crystal_vllm.runtime.CompressedKVCache`:

- spec: it reports :class:`CrystalAttentionSpec` for its attention layers (so the
  scheduler caps requests and hands the backend the raw KV buffer);
- init: it builds the cache over that buffer and binds the attention metadata builders
  to it;
- step begin: once vLLM has settled the batch (``_update_states``), it begins the step
  with the scheduled requests and their budgets (:class:`~crystal_vllm.budget.BudgetRule`);
- per layer: the backend's ``forward`` calls the cache's ``attention``;
- step end: after the forward pass (``execute_model``), reallocation and checks;
- release: a request's rows go back when it finishes, is aborted or is preempted.
None of this depends on the device: the runtime dispatches to the ops of the pool's device.

Under tensor parallelism every rank runs this runner over its own KV heads (vLLM's spec
reports the rank's heads): it holds, attends over and evicts them, and reallocates
adaptive budgets among them only (docs/serving.md, "Tensor parallelism"). Nothing here
talks to the other ranks.
"""

from __future__ import annotations

import dataclasses
import time

from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.v1.kv_cache_interface import FullAttentionSpec

from crystal_vllm.budget import BudgetRule, requested_budget
from crystal_vllm.cache import HeadBlockLayout
from crystal_vllm.config import CrystalKVConfig
from crystal_vllm.runtime import CompressedKVCache, StepRequest
from crystal_vllm.vllm_ext import get_logger
from crystal_vllm.vllm_ext.backend import CrystalAttentionMetadataBuilder
from crystal_vllm.vllm_ext.kv_spec import CrystalAttentionSpec
from crystal_vllm.vllm_ext.metrics import WorkerStatsReporter, attach_to_output

logger = get_logger(__name__)

#: Seconds between two log lines with the cache counters (like vLLM's own stats line).
STATS_LOG_INTERVAL_S = 10.0


def first_kv_head(total_kv_heads: int, tp_size: int, tp_rank: int) -> int:
    """Model-wide index of the first KV head tensor-parallel rank ``tp_rank`` holds.

    vLLM splits the KV heads evenly when ``tp_size`` divides them, and otherwise (more
    ranks than KV heads) gives each rank one head, replicated over ``tp_size //
    total_kv_heads`` consecutive ranks; ``tp_rank * total_kv_heads // tp_size`` is both.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} is outside [0, {tp_size})")
    if total_kv_heads % tp_size and tp_size % total_kv_heads:
        raise ValueError(
            f"{total_kv_heads} KV heads cannot be split over {tp_size} tensor-parallel ranks "
            "(one must divide the other)"
        )
    return tp_rank * total_kv_heads // tp_size


class CrystalRunnerMixin:
    """Compressed-KV behaviour for a vLLM V1 model runner (mix in before the runner class)."""

    def __init__(self, vllm_config, device) -> None:
        super().__init__(vllm_config, device)
        self.crystal_config = CrystalKVConfig.from_additional_config(vllm_config.additional_config)
        self.crystal_budgets = BudgetRule(
            self.crystal_config,
            block_size=self.cache_config.block_size,
            max_model_len=self.model_config.max_model_len,
        )
        self.crystal_cache: CompressedKVCache | None = None
        self._metrics: WorkerStatsReporter | None = None
        self._requested: dict[str, int] = {}
        self._think_ended: set[str] = set()
        self._last_log = time.monotonic()
        #: " (TP rank r/n)" in the stats line when several ranks log their own counters.
        self._crystal_rank_label = ""

    # -- KV-cache spec and allocation ---------------------------------------------------

    def get_kv_cache_spec(self):
        specs = super().get_kv_cache_spec()
        cap = self.crystal_budgets.max_cap_blocks
        # The platform leaves prefix caching on only under prompt mode `keep`.
        shares = bool(self.cache_config.enable_prefix_caching)
        for name, spec in specs.items():
            if type(spec) is not FullAttentionSpec:
                raise ValueError(
                    f"layer {name} has a {type(spec).__name__}; --kv-policy supports only "
                    "plain full-attention layers"
                )
            fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
            specs[name] = CrystalAttentionSpec(
                **fields, max_blocks_per_request=cap, shares_prompt_blocks=shares
            )
        return specs

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        (group,) = kv_cache_config.kv_cache_groups
        spec = group.kv_cache_spec
        layer_index = {name: i for i, name in enumerate(group.layer_names)}
        layout = HeadBlockLayout(
            num_blocks=kv_cache_config.num_blocks,
            num_layers=len(group.layer_names),
            num_kv_heads=spec.num_kv_heads,
            block_size=spec.block_size,
            head_dim=spec.head_size,
        )
        raw = self.kv_caches[0]
        cap = spec.max_blocks_per_request
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        total_kv_heads = self.model_config.get_total_num_kv_heads()
        self.crystal_budgets.policy.first_kv_head = first_kv_head(total_kv_heads, tp_size, tp_rank)
        if tp_size > 1:
            self._crystal_rank_label = f" (TP rank {tp_rank}/{tp_size})"
        self.crystal_cache = CompressedKVCache(
            self.crystal_budgets.policy,
            layout,
            layout.view_pool(raw, spec.dtype),
            max_rows=self.scheduler_config.max_num_seqs,
            max_slots=cap * spec.block_size,
            max_blocks_per_row=cap,
            scale=spec.head_size**-0.5,
            share_prompt_blocks=spec.shares_prompt_blocks,
            debug_checks=self.crystal_config.debug_checks,
        )
        for builder in self._crystal_builders():
            builder.bind(self.crystal_cache, layer_index)
        self._metrics = WorkerStatsReporter(layout.num_layers * layout.num_kv_heads)
        policy_config = self.crystal_budgets.policy.config
        full_length = -(-self.model_config.max_model_len // spec.block_size)
        usable = kv_cache_config.num_blocks - 1  # vLLM keeps one null block
        logger.info(
            "crystal-vllm: policy %s, budget %d per (layer, KV head), prompt %s "
            "(prompt_budget %d; prompt blocks %s); a request holds at most %d blocks of %d "
            "tokens (its longest prompt and the largest budget); %d such requests fit in %d "
            "blocks, against %d full-length (%d-token) ones; %d layers x %d KV heads (heads "
            "%d-%d of %d, tensor-parallel rank %d of %d)",
            self.crystal_config.policy,
            self.crystal_config.budget,
            policy_config.prompt,
            policy_config.prompt_budget,
            "shared through the prefix cache" if spec.shares_prompt_blocks else "private",
            cap,
            spec.block_size,
            usable // cap,
            usable,
            usable // full_length,
            self.model_config.max_model_len,
            layout.num_layers,
            layout.num_kv_heads,
            self.crystal_budgets.policy.first_kv_head,
            self.crystal_budgets.policy.first_kv_head + layout.num_kv_heads - 1,
            total_kv_heads,
            tp_rank,
            tp_size,
        )

    def _crystal_builders(self) -> list[CrystalAttentionMetadataBuilder]:
        builders = [
            builder
            for groups in self.attn_groups
            for group in groups
            for builder in group.metadata_builders
            if isinstance(builder, CrystalAttentionMetadataBuilder)
        ]
        if not builders:
            raise RuntimeError("crystal-vllm: no attention layer uses the crystal backend")
        return builders

    # -- step lifecycle -----------------------------------------------------------------

    def _update_states(self, scheduler_output):
        # Preempted requests keep their runner state but lose their blocks; vLLM will
        # re-prefill them from scratch, so drop their compressed entries now.
        if self.crystal_cache is not None:
            for req_id in scheduler_output.preempted_req_ids or ():
                self.crystal_cache.release(req_id)
        result = super()._update_states(scheduler_output)
        # The batch is settled (condensed, reordered): its order is the token order of
        # the forward pass.
        if self.crystal_cache is not None and scheduler_output.total_num_scheduled_tokens:
            self.crystal_cache.begin_step(self._scheduled_requests(scheduler_output))
        return result

    def _scheduled_requests(self, scheduler_output) -> list[StepRequest]:
        batch = self.input_batch
        return [
            StepRequest(
                req_id=req_id,
                num_new_tokens=scheduler_output.num_scheduled_tokens[req_id],
                num_computed_tokens=int(batch.num_computed_tokens_cpu[i]),
                num_prompt_tokens=self.requests[req_id].num_prompt_tokens,
                block_ids=self.requests[req_id].block_ids[0],
                budget=self._request_budget(req_id),
            )
            for i, req_id in enumerate(batch.req_ids)
        ]

    def _request_budget(self, req_id: str) -> int:
        """The request's budget this step, by the rule the scheduler's caps follow."""
        state = self.requests[req_id]
        requested = self._requested.get(req_id)
        if requested is None:
            extra = state.sampling_params.extra_args if state.sampling_params else None
            requested = self._requested[req_id] = requested_budget(extra, self.crystal_config)
        # Every sampled token is the last output at the next step of its request, and the
        # flag survives preemption, so looking at the last token is enough.
        outputs = state.output_token_ids
        if outputs and self.crystal_budgets.think_ends(outputs[-1:]):
            self._think_ended.add(req_id)
        return self.crystal_budgets.budget(requested, think_ended=req_id in self._think_ended)

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        try:
            output = super().execute_model(scheduler_output, intermediate_tensors)
        finally:
            if self.crystal_cache is not None and self.crystal_cache.in_step:
                self.crystal_cache.end_step()
                self._maybe_log_stats()
        # Not None when there was nothing to run (vLLM then skips sample_tokens).
        return self._with_metrics(output)

    def sample_tokens(self, grammar_output):
        return self._with_metrics(super().sample_tokens(grammar_output))

    def _with_metrics(self, output):
        """The step's output carrying the cache's metrics to the scheduler
        (:mod:`crystal_vllm.vllm_ext.metrics`)."""
        if self.crystal_cache is None or self._metrics is None:
            return output
        cache, reporter = self.crystal_cache, self._metrics
        return attach_to_output(output, lambda: reporter.report(cache.summary(by_layer=False)))

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_log < STATS_LOG_INTERVAL_S:
            return
        self._last_log = now
        summary = self.crystal_cache.summary()
        logger.info(
            "crystal-vllm%s: %d running, %d evictions, %d budget reallocations, %d head-blocks "
            "in use; mean kept entries per (layer, KV head) by layer: %s; peak entries per "
            "(layer, KV head): mean %.2f over %d released requests, max %.1f",
            self._crystal_rank_label,
            summary.requests,
            summary.total_evictions,
            summary.reallocations,
            summary.head_blocks_in_use,
            summary.kept_per_layer,
            summary.mean_peak_entries,
            summary.released_requests,
            summary.max_peak_entries,
        )

    def crystal_kv_summary(self) -> dict[str, object] | None:
        """The cache's :class:`~crystal_vllm.runtime.CacheSummary` as a dict (None before
        the KV cache exists); reached through the worker by ``LLM.collective_rpc``."""
        if self.crystal_cache is None:
            return None
        return dataclasses.asdict(self.crystal_cache.summary())

    def _on_request_state_removed(self, req_id, req_state) -> None:
        super()._on_request_state_removed(req_id, req_state)
        self._requested.pop(req_id, None)
        self._think_ended.discard(req_id)
        if self.crystal_cache is not None:
            self.crystal_cache.release(req_id)
