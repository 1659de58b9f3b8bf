"""Scheduler side: tells the capping KV-cache manager each request's own cap.

The single-type manager only ever sees request ids; the scheduler sees ``Request``
objects, so it is where a per-request ``kv_budget`` and the end of the think stage
become per-request block caps. The worker derives the same budgets from the same
tokens, so the two sides agree without talking to each other.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from crystal_vllm.config import CrystalKVConfig
from crystal_vllm.vllm_ext.kv_spec import CrystalKVCacheManager, request_cap_blocks
from crystal_vllm.vllm_ext.request_params import request_budget


class CrystalScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crystal_config = CrystalKVConfig.from_additional_config(
            self.vllm_config.additional_config
        )
        self.crystal_policy = self.crystal_config.make_policy()
        self.crystal_managers = [
            manager
            for manager in self.kv_cache_manager.coordinator.single_type_managers
            if isinstance(manager, CrystalKVCacheManager)
        ]
        self._budgets: dict[str, int] = {}

    def _set_cap(self, request, budget: int) -> None:
        for manager in self.crystal_managers:
            cap = request_cap_blocks(
                self.crystal_policy,
                budget,
                manager.block_size,
                self.vllm_config.model_config.max_model_len,
            )
            manager.set_request_cap(request.request_id, cap)

    def add_request(self, request) -> None:
        budget = request_budget(request.sampling_params.extra_args, self.crystal_config)
        self._budgets[request.request_id] = budget
        self._set_cap(request, budget)
        super().add_request(request)

    def _update_request_with_output(self, request, new_token_ids, *args, **kwargs):
        new_token_ids, stopped = super()._update_request_with_output(
            request, new_token_ids, *args, **kwargs
        )
        config = self.crystal_config
        if config.has_think_stage and config.think_end_token in new_token_ids:
            budget = self._budgets.get(request.request_id, config.budget)
            if budget <= config.budget:  # not grown yet
                self._budgets[request.request_id] = config.budget_after_think(budget)
                self._set_cap(request, config.budget_after_think(budget))
        return new_token_ids, stopped

    def _free_blocks(self, request) -> None:
        super()._free_blocks(request)
        self._budgets.pop(request.request_id, None)
        for manager in self.crystal_managers:
            manager.forget(request.request_id)
