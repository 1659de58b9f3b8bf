"""Crystal-KV's attention-LRFU policy (paper Algorithm 1) and its variants.

``crystal-lite`` is LRFU with uniform budgets, ``lru`` the same with ``lam = 0``, and
``crystal`` adds Algorithm 2 (see :mod:`crystal_vllm.policy.allocator`) at the end of every
``realloc_interval``-th step (:meth:`CrystalPolicy.end_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from crystal_vllm import ops
from crystal_vllm.ops import DecodeLayer
from crystal_vllm.policy.allocator import (
    allocate_budgets,
    boundary_targets,
    converge,
    fit_blocks,
    fit_growth,
    head_floor,
)
from crystal_vllm.policy.base import KeySource, KVPolicy, PolicyState
from crystal_vllm.policy.configs import CrystalConfig, LRFUConfig, LRUConfig
from crystal_vllm.policy.select import recency_key, row_index, select_lowest
from crystal_vllm.policy.topp import top_p_mask


@dataclass
class LRFUState(PolicyState):
    """Adds the LRFU pair: ``crf`` as of step ``tau`` (the last hit), decayed lazily."""

    crf: torch.Tensor  # float32 [R, L, H, S]
    tau: torch.Tensor  # int64 [R, L, H, S]

    EMPTY: ClassVar[dict[str, Any]] = {
        **PolicyState.EMPTY,
        "crf": 0.0,
        "tau": 0,
    }


class LRFUPolicy(KVPolicy):
    """Keep, per head, the entries with the highest decayed CRF (the LRFU family's base).

    ``CRF_t(e) = sum_j d**(t - t_j)`` (``d = lam ** (1 / time_unit)``, the decay per step)
    over the steps ``t_j`` at which ``e`` was inside its head's top-p attention nucleus,
    stored as ``(crf, tau)`` and decayed only when read.
    A decode layer runs as one fused kernel where the ops offer one for the pool and the
    configuration is one the kernels implement, else as the generic step.
    """

    state_cls: ClassVar[type[PolicyState]] = LRFUState
    config: LRFUConfig

    @property
    def obs_window(self) -> int:
        return self.config.obs_window

    def _extra_fields(
        self, shape: tuple[int, int, int, int], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {
            "crf": torch.zeros(shape, dtype=torch.float32, device=device),
            "tau": torch.zeros(shape, dtype=torch.int64, device=device),
        }

    def _new_entry_values(self, t: torch.Tensor, prefill: bool) -> dict[str, Any]:
        if prefill:
            return {"crf": 0.0, "tau": 0}
        return {"crf": 1.0, "tau": t}

    def decayed_crf(self, state: LRFUState, rows: torch.Tensor) -> torch.Tensor:
        """Current CRF ``lam**(t - tau) * crf`` of every slot (0 on empty slots)."""
        ri = row_index(rows, state.num_rows)
        t = state.step[ri].view(-1, 1, 1, 1)
        age = (t - state.tau[ri]).to(torch.float32)
        return state.crf[ri] * torch.pow(self.config.step_decay, age)

    def kernel_params(self) -> dict[str, Any] | None:
        """The scalars the fused LRFU kernels take, or None when this configuration needs
        something they do not implement (hits recorded only once a head is full, or
        eviction in bursts)."""
        config = self.config
        if not config.hits_before_full or config.evict_interval > 1:
            return None
        return {
            "lam": config.step_decay,
            "top_p": config.top_p,
            "gqa_max": config.gqa_reduce == "max",
            "protect_prompt": self.keeps_prompt,
            "recent_window": self.config.recent_window,
        }

    def decode_layer(
        self, state: LRFUState, step: DecodeLayer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.kernel_params()
        kernel = ops.fused_lrfu_decode(step.kv_pool) if params is not None else None
        if kernel is None:
            return super().decode_layer(state, step)
        return kernel(step, state, **params)

    def observe(
        self,
        state: LRFUState,
        rows: torch.Tensor,
        probs: torch.Tensor,
        *,
        budgets: torch.Tensor | None = None,
        **_: Any,
    ) -> None:
        """Record this step's top-p hits: ``crf = lam**(t - tau) * crf + 1; tau = t``.

        An entry already rewarded at step t (the one inserted in it) is not rewarded twice.
        With ``hits_before_full=False`` only heads holding ``>= budgets`` entries record.
        """
        ri = row_index(rows, state.num_rows)
        p = self._reduce(state, probs)
        valid = state.valid[ri]
        hit = top_p_mask(p, state.position[ri], valid, self.config.top_p)
        if not self.config.hits_before_full:
            if budgets is None:
                raise ValueError("hits_before_full=False needs observe(..., budgets=...)")
            full = self.counted(state, rows).sum(-1) >= budgets
            hit &= full.unsqueeze(-1)
        t = state.step[ri].view(-1, 1, 1, 1)
        tau = state.tau[ri]
        hit &= tau != t
        crf = state.crf[ri]
        decayed = crf * torch.pow(self.config.step_decay, (t - tau).to(torch.float32))
        state.crf[ri] = torch.where(hit, decayed + 1.0, crf)
        state.tau[ri] = torch.where(hit, t, tau)

    def _select_victims(
        self,
        state: LRFUState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        keys: KeySource | None,
    ) -> torch.Tensor:
        """Evict the lowest decayed CRF first; ties: older ``tau``, then older position.
        Entries born in the head's recent window (:meth:`recent_window`) are never evicted.
        A head over its budget keeps ``budget - evict_interval + 1`` (at least its recent
        entries), so with ``evict_interval`` k it evicts once every k steps."""
        ri = row_index(rows, state.num_rows)
        valid = state.valid[ri]
        t = state.step[ri].view(-1, 1, 1, 1)
        window = self.recent_window(budgets)
        born = state.born[ri]
        after = t - window.unsqueeze(-1)
        recent = valid & ((born == t) | (~state.prompt[ri] & (born > after)))
        held, protected = valid.sum(-1), recent.sum(-1)
        over = held > torch.maximum(budgets, protected)
        burst = (budgets - (self.config.evict_interval - 1)).clamp_min(0)
        keep = torch.maximum(torch.where(over, burst, budgets), protected)
        excess = (held - keep).clamp_min(0)
        secondary = recency_key(state.tau[ri], state.position[ri])
        return select_lowest(self.decayed_crf(state, rows), secondary, valid & ~recent, excess)

    def recent_window(self, budgets: torch.Tensor) -> torch.Tensor:
        """Steps whose decode entries a head never evicts: ``recent_window``, at most its
        budget (so the window never holds a head above it) and at least 1 (the step's own
        token, prompt entries included, as every policy keeps it)."""
        return budgets.clamp(max=self.config.recent_window).clamp_min(1)

    def head_utilisation(self, state: LRFUState, rows: torch.Tensor) -> torch.Tensor:
        """Sum of the current decayed CRF over the entries counted against each budget."""
        crf = self.decayed_crf(state, rows)
        return torch.where(self.counted(state, rows), crf, 0.0).sum(-1)

    def max_selected(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        return budget


class CrystalLitePolicy(LRFUPolicy):
    """``crystal-lite``: LRFU with one uniform budget for every (layer, KV head)."""

    name: ClassVar[str] = "crystal-lite"
    config_cls: ClassVar[type] = LRFUConfig


class LRUPolicy(LRFUPolicy):
    """``lru``: LRFU with ``lam = 0``, i.e. keep the entries most recently in a nucleus."""

    name: ClassVar[str] = "lru"
    config_cls: ClassVar[type] = LRUConfig


class CrystalPolicy(LRFUPolicy):
    """``crystal``: LRFU plus adaptive per-layer/head budgets (Algorithm 2)."""

    name: ClassVar[str] = "crystal"
    config_cls: ClassVar[type] = CrystalConfig
    config: CrystalConfig

    @property
    def adaptive_budgets(self) -> bool:
        return True

    def end_step(
        self,
        state: LRFUState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        targets: torch.Tensor,
        *,
        max_per_head: int | torch.Tensor,
        block_size: int = 1,
        capacity: torch.Tensor | None = None,
        counts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """New targets every ``realloc_interval`` steps of a row's own counter, once every
        head of the row holds its target, or within ``evict_interval`` of it (before
        that, scores mean nothing), by
        ``realloc_rule`` (:func:`~crystal_vllm.policy.allocator.boundary_targets` or the
        paper's Algorithm 2). Every step, the budgets then move the heads toward their
        targets without leaving budget unused
        (:func:`~crystal_vllm.policy.allocator.converge`): a head above its target gives
        up entries only as fast as the heads below theirs fill.

        Memory comes in blocks of ``block_size`` entries per head, ``capacity [b]`` of them
        per row (None: unbounded): targets are fitted to whole blocks and a head starts a
        new block only when one is free, so a request never needs more than the blocks
        its uniform budget was granted.

        Budgets and targets count what a head holds during a step, its new token included
        (:meth:`max_resident`): a head that keeps ``n`` entries now holds ``n + 1`` in the
        next step before it evicts. ``state`` must be the full state (all layers), since
        ``utilisation`` moves budget between layers.
        """
        config = self.config
        ri = row_index(rows, state.num_rows)
        if counts is None:
            counted = self.counted(state, rows)
            counts = counted.sum(dim=-1), (state.valid[ri] & ~counted).sum(dim=-1)
        held, fixed = counts  # counted entries per head, and those held on top (the prompt)
        next_held = held + 1
        targets = targets.clone()
        due = state.step[ri] % config.realloc_interval == 0
        # A full head evicting in bursts holds between target - evict_interval + 1 and
        # its target during a step: within evict_interval of it counts as full.
        due &= (held + config.evict_interval >= targets).flatten(1).all(dim=1)
        if bool(due.any()):
            b = rows.shape[0]
            cap = torch.as_tensor(max_per_head, device=targets.device).expand(b)[due]
            total = targets[due].sum(dim=(1, 2))
            n = targets.shape[1] * targets.shape[2]
            floor = torch.minimum(head_floor(total, n, config.floor_ratio, config.min_tokens), cap)
            if config.realloc_rule == "utilisation":
                new = allocate_budgets(
                    self.head_utilisation(state, rows[due]),
                    targets[due],
                    total,
                    floor_ratio=config.floor_ratio,
                    min_tokens=config.min_tokens,
                    max_per_head=cap,
                )
            else:
                counted = self.counted(state, rows[due])
                scores = torch.where(counted, self.decayed_crf(state, rows[due]), torch.inf)
                new = boundary_targets(
                    scores, targets[due], move=config.realloc_move, floor=floor, max_per_head=cap
                )
            if capacity is not None:
                new = fit_blocks(
                    new, fixed[due], block_size=block_size, capacity=capacity[due], floor=floor
                )
            targets[due] = new
        new_budgets = converge(next_held, targets)
        if capacity is not None:
            new_budgets = fit_growth(
                new_budgets, next_held, fixed, targets, block_size=block_size, capacity=capacity
            )
        if not bool(due.any()) and torch.equal(new_budgets, budgets):
            return None
        return new_budgets, targets
