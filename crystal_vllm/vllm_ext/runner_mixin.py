"""The compressed-KV behaviour of a vLLM V1 model runner, shared by the CPU and CUDA runners.

vLLM selects the worker class through ``parallel_config.worker_cls`` (set by the platform
when a policy is active); the worker builds a runner that mixes this class in before
vLLM's own runner, so that it
- reports :class:`CrystalAttentionSpec` for its attention layers (so the scheduler caps
  requests and hands the backend the raw KV buffer),
- builds the :class:`~crystal_vllm.runtime.CompressedKVCache` over that buffer,
- starts each step from the scheduled requests and ends it after the forward pass,
- releases a request's rows when it finishes, is aborted or is preempted.
None of this depends on the device: the runtime dispatches to the ops of the pool's device.
"""

from __future__ import annotations

import dataclasses
import time

from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec

from crystal_vllm.cache import HeadBlockLayout
from crystal_vllm.config import CrystalKVConfig
from crystal_vllm.runtime import CompressedKVCache, StepRequest
from crystal_vllm.vllm_ext import runner_registry
from crystal_vllm.vllm_ext.kv_spec import CrystalAttentionSpec, request_cap_blocks
from crystal_vllm.vllm_ext.request_params import request_budget

logger = init_logger(__name__)

#: Seconds between two log lines with the cache counters (like vLLM's own stats line).
STATS_LOG_INTERVAL_S = 10.0


class CrystalRunnerMixin:
    """Compressed-KV behaviour for a vLLM V1 model runner (mix in before the runner class).

    Attributes the attention backend reads: ``crystal_cache``, ``crystal_layer_index`` and
    ``crystal_begin_step`` (called by the metadata builder once per step).
    """

    def __init__(self, vllm_config, device) -> None:
        super().__init__(vllm_config, device)
        self.crystal_config = CrystalKVConfig.from_additional_config(vllm_config.additional_config)
        self.crystal_policy = self.crystal_config.make_policy()
        self.crystal_cache: CompressedKVCache | None = None
        self.crystal_layer_index: dict[str, int] = {}
        self._budgets: dict[str, int] = {}
        self._think_ended: set[str] = set()
        self._last_log = time.monotonic()
        runner_registry.register(self)

    # -- KV-cache spec and allocation ---------------------------------------------------

    def _cap_blocks(self, budget: int) -> int:
        return request_cap_blocks(
            self.crystal_policy,
            budget,
            self.cache_config.block_size,
            self.model_config.max_model_len,
        )

    def get_kv_cache_spec(self):
        specs = super().get_kv_cache_spec()
        cap = self._cap_blocks(self.crystal_config.max_request_budget())
        for name, spec in specs.items():
            if type(spec) is not FullAttentionSpec:
                raise ValueError(
                    f"layer {name} has a {type(spec).__name__}; --kv-policy supports only "
                    "plain full-attention layers"
                )
            fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
            specs[name] = CrystalAttentionSpec(**fields, max_blocks_per_request=cap)
        return specs

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        (group,) = kv_cache_config.kv_cache_groups
        spec = group.kv_cache_spec
        self.crystal_layer_index = {name: i for i, name in enumerate(group.layer_names)}
        layout = HeadBlockLayout(
            num_blocks=kv_cache_config.num_blocks,
            num_layers=len(group.layer_names),
            num_kv_heads=spec.num_kv_heads,
            block_size=spec.block_size,
            head_dim=spec.head_size,
        )
        raw = self.kv_caches[0]
        cap = spec.max_blocks_per_request
        self.crystal_cache = CompressedKVCache(
            self.crystal_policy,
            layout,
            layout.view_pool(raw, spec.dtype),
            max_rows=self.scheduler_config.max_num_seqs,
            max_slots=cap * spec.block_size,
            max_blocks_per_row=cap,
            scale=spec.head_size**-0.5,
            debug_checks=self.crystal_config.debug_checks,
        )
        logger.info(
            "crystal-vllm: policy %s, budget %d per (layer, KV head), at most %d blocks "
            "(%d tokens) per request, %d layers x %d KV heads",
            self.crystal_config.policy,
            self.crystal_config.budget,
            cap,
            cap * spec.block_size,
            layout.num_layers,
            layout.num_kv_heads,
        )

    # -- step lifecycle -----------------------------------------------------------------

    def crystal_begin_step(self, common_attn_metadata) -> None:
        """Called by the metadata builder once per step, before the first layer."""
        num_reqs = common_attn_metadata.num_reqs
        query_start = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = common_attn_metadata.seq_lens[:num_reqs].tolist()
        batch = []
        for i, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            state = self.requests[req_id]
            new_tokens = query_start[i + 1] - query_start[i]
            batch.append(
                StepRequest(
                    req_id=req_id,
                    num_new_tokens=new_tokens,
                    num_computed_tokens=seq_lens[i] - new_tokens,
                    block_ids=state.block_ids[0],
                    budget=self._request_budget(req_id, state),
                )
            )
        self.crystal_cache.begin_step(batch)

    def _request_budget(self, req_id: str, state) -> int:
        """The request's budget this step: its own ``kv_budget``, plus the answer reserve
        once it generated the think-end token (the scheduler grows its cap the same way)."""
        config = self.crystal_config
        budget = self._budgets.get(req_id)
        if budget is None:
            extra = state.sampling_params.extra_args if state.sampling_params else None
            budget = self._budgets[req_id] = request_budget(extra, config)
        if req_id in self._think_ended:
            return config.budget_after_think(budget)
        outputs = state.output_token_ids
        # Every sampled token is the last output at the next step of its request, and the
        # flag survives preemption, so looking at the last token is enough.
        if config.has_think_stage and outputs and outputs[-1] == config.think_end_token:
            self._think_ended.add(req_id)
            return config.budget_after_think(budget)
        return budget

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        try:
            return super().execute_model(scheduler_output, intermediate_tensors)
        finally:
            if self.crystal_cache is not None and self.crystal_cache.in_step:
                self.crystal_cache.end_step()
                self._maybe_log_stats()

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_log < STATS_LOG_INTERVAL_S:
            return
        self._last_log = now
        summary = self.crystal_cache.summary()
        logger.info(
            "crystal-vllm: %d running, %d evictions, %d budget reallocations, %d head-blocks "
            "in use; mean kept entries per (layer, KV head) by layer: %s",
            summary["requests"],
            summary["evictions"],
            summary["reallocations"],
            summary["head_blocks_in_use"],
            summary["kept_per_layer"],
        )

    def _update_states(self, scheduler_output):
        # Preempted requests keep their runner state but lose their blocks; vLLM will
        # re-prefill them from scratch, so drop their compressed entries now.
        if self.crystal_cache is not None:
            for req_id in scheduler_output.preempted_req_ids or ():
                self.crystal_cache.release(req_id)
        return super()._update_states(scheduler_output)

    def _on_request_state_removed(self, req_id, req_state) -> None:
        super()._on_request_state_removed(req_id, req_state)
        self._budgets.pop(req_id, None)
        self._think_ended.discard(req_id)
        if self.crystal_cache is not None:
            self.crystal_cache.release(req_id)
