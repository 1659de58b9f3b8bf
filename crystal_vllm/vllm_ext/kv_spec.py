"""Scheduler side: a KV-cache spec and manager that cap the blocks a request holds.

vLLM's block accounting stays as it is; the manager only decides how many blocks a
request may hold: like full attention until its resident tokens reach the policy's
bound for its budget, then no more. The caps come from
:class:`crystal_vllm.budget.BudgetRule`, which the worker applies to the same tokens, so
the two sides agree without feedback.

Prefix caching (only with ``prompt: keep``, ``shares_prompt_blocks``): the worker writes
the prompt in vLLM's layout and never touches it again, so the prompt's full blocks are
offered to vLLM's prefix cache, and no other block: what follows the prompt is entries in
eviction order, not the tokens its block hash names.
"""

from __future__ import annotations

import dataclasses

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrystalAttentionSpec(FullAttentionSpec):
    """Full attention whose requests are capped at ``max_blocks_per_request`` blocks.

    The backing buffer is handed to the backend raw (``has_layer_views`` False) so that
    it can be addressed as one pool of per-(layer, KV head) head-blocks.
    """

    max_blocks_per_request: int = 0
    #: Full prompt blocks may be shared through vLLM's prefix cache (prompt mode ``keep``
    #: and prefix caching on); every other block is private.
    shares_prompt_blocks: bool = False

    @property
    def has_layer_views(self) -> bool:
        return False

    @property
    def prefix_cacheable(self) -> bool:
        return self.shares_prompt_blocks

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return min(
            super().max_memory_usage_bytes(vllm_config),
            self.max_blocks_per_request * self.page_size_bytes,
        )

    @classmethod
    def merge(cls, specs: list[CrystalAttentionSpec]) -> CrystalAttentionSpec:
        # FullAttentionSpec.merge rebuilds the object and would drop our fields.
        merged = super().merge(specs)
        ours = {(spec.max_blocks_per_request, spec.shares_prompt_blocks) for spec in specs}
        if len(ours) != 1:
            raise ValueError(
                f"layers of one KV-cache group disagree on (cap, shared prompt blocks): {ours}"
            )
        cap, shares = ours.pop()
        return dataclasses.replace(merged, max_blocks_per_request=cap, shares_prompt_blocks=shares)


class CrystalKVCacheManager(FullAttentionManager):
    """Grants blocks like full attention, up to each request's cap.

    Per-request caps (from the request's budget, larger once its think stage ends) are
    set by :class:`~crystal_vllm.vllm_ext.scheduler.CrystalScheduler`, which sees the
    ``Request`` objects; the manager itself only sees request ids. A cap outlives
    ``free`` (which preemption calls too) and is dropped by ``forget`` when the request
    is finished.
    """

    def __init__(self, kv_cache_spec: CrystalAttentionSpec, *args, **kwargs) -> None:
        super().__init__(kv_cache_spec, *args, **kwargs)
        self.default_cap_tokens = kv_cache_spec.max_blocks_per_request * kv_cache_spec.block_size
        self._cap_tokens: dict[str, int] = {}

    def set_request_cap(self, request_id: str, max_blocks: int) -> None:
        self._cap_tokens[request_id] = max_blocks * self.block_size

    def forget(self, request_id: str) -> None:
        self._cap_tokens.pop(request_id, None)

    def resident_tokens(self, request_id: str, num_tokens: int) -> int:
        """Token slots the request needs when its sequence is ``num_tokens`` long."""
        return min(num_tokens, self._cap_tokens.get(request_id, self.default_cap_tokens))

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        # Must clamp here too: allocate_slots compares this demand with the free blocks,
        # and an uncapped demand would leave a long request unschedulable forever.
        return super().get_num_blocks_to_allocate(
            request_id,
            self.resident_tokens(request_id, num_tokens),
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            self.resident_tokens(request_id, num_tokens_main_model),
            apply_admission_cap=apply_admission_cap,
            prefill_end=prefill_end,
        )

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        # Only full prompt blocks hold the tokens their hash names (and are never written
        # again); later blocks hold whatever entries eviction kept.
        full_prompt = request.num_prompt_tokens // self.block_size * self.block_size
        super().cache_blocks(request, min(num_tokens, full_prompt), *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(
            request_id,
            self.resident_tokens(request_id, num_tokens),
            self.resident_tokens(request_id, num_tokens_main_model),
        )
