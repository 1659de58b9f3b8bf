"""Scheduler side: tells the capping KV-cache manager each request's own budget.

The single-type manager only ever sees request ids; the scheduler sees ``Request``
objects, so it is where a per-request ``kv_budget`` becomes a per-request block cap.
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

    def add_request(self, request) -> None:
        budget = request_budget(request.sampling_params.extra_args, self.crystal_config)
        if budget != self.crystal_config.budget:
            for manager in self.crystal_managers:
                cap = request_cap_blocks(
                    self.crystal_policy,
                    budget,
                    manager.block_size,
                    self.vllm_config.model_config.max_model_len,
                )
                manager.set_request_cap(request.request_id, cap)
        super().add_request(request)
