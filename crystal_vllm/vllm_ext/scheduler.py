"""Scheduler side: tells the capping KV-cache manager each request's own cap.

The single-type manager only ever sees request ids; the scheduler sees ``Request``
objects, so it is where a per-request ``kv_budget`` and the end of the think stage
become per-request block caps, through :class:`~crystal_vllm.budget.BudgetRule`. The
worker applies the same rule to the same tokens, so the two sides agree without talking
to each other.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from crystal_vllm.budget import BudgetRule, requested_budget
from crystal_vllm.config import CrystalKVConfig
from crystal_vllm.vllm_ext.kv_spec import CrystalKVCacheManager
from crystal_vllm.vllm_ext.metrics import (
    KVStepStats,
    attach_to_scheduler_stats,
    stats_of_output,
)


class CrystalScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = CrystalKVConfig.from_additional_config(self.vllm_config.additional_config)
        self.crystal_budgets = BudgetRule(
            config,
            block_size=self.cache_config.block_size,
            max_model_len=self.vllm_config.model_config.max_model_len,
        )
        self.crystal_managers = [
            manager
            for manager in self.kv_cache_manager.coordinator.single_type_managers
            if isinstance(manager, CrystalKVCacheManager)
        ]
        self._requested: dict[str, tuple[int, int]] = {}  # (kv_budget, prompt tokens)
        self._think_ended: set[str] = set()
        self._kv_stats: KVStepStats | None = None  # the workers' stats not yet sent

    def _set_cap(self, request_id: str) -> None:
        rule = self.crystal_budgets
        requested, prompt_len = self._requested[request_id]
        budget = rule.budget(requested, think_ended=request_id in self._think_ended)
        cap = rule.cap_blocks(budget, prompt_len)
        for manager in self.crystal_managers:
            manager.set_request_cap(request_id, cap)

    def add_request(self, request) -> None:
        config = self.crystal_budgets.config
        self._requested[request.request_id] = (
            requested_budget(request.sampling_params.extra_args, config),
            request.num_prompt_tokens,
        )
        self._set_cap(request.request_id)
        super().add_request(request)

    def _update_request_with_output(self, request, new_token_ids, *args, **kwargs):
        new_token_ids, stopped = super()._update_request_with_output(
            request, new_token_ids, *args, **kwargs
        )
        request_id = request.request_id
        if request_id not in self._think_ended and self.crystal_budgets.think_ends(new_token_ids):
            self._think_ended.add(request_id)
            self._set_cap(request_id)
        return new_token_ids, stopped

    def update_from_output(self, scheduler_output, model_runner_output):
        step_stats = stats_of_output(model_runner_output)
        if step_stats is not None:
            pending = self._kv_stats
            self._kv_stats = step_stats if pending is None else pending.merged(step_stats)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        # vLLM attaches its stats to one front end's outputs (when stats are on); ours go
        # along with them, or wait for the next step's.
        if self._kv_stats is not None and attach_to_scheduler_stats(outputs, self._kv_stats):
            self._kv_stats = None
        return outputs

    def _free_blocks(self, request) -> None:
        super()._free_blocks(request)
        self._requested.pop(request.request_id, None)
        self._think_ended.discard(request.request_id)
        for manager in self.crystal_managers:
            manager.forget(request.request_id)
