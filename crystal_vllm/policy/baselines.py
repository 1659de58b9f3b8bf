"""Baselines that act every step: ``full``, ``streaming``, ``h2o`` and ``random``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from crystal_vllm.policy.base import UNBOUNDED, KeySource, KVPolicy, PolicyState
from crystal_vllm.policy.configs import FullConfig, H2OConfig, RandomConfig, StreamingConfig
from crystal_vllm.policy.select import masked_update, row_index, select_lowest


def _born_now(state: PolicyState, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    ri = row_index(rows, state.num_rows)
    return valid & (state.born[ri] == state.step[ri].view(-1, 1, 1, 1))


def _excess(valid: torch.Tensor, born_now: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """How many entries each head must drop to hold ``max(budget, #born now)``."""
    return (valid.sum(-1) - torch.maximum(budgets, born_now.sum(-1))).clamp_min(0)


def _evict_lowest(
    state: PolicyState,
    rows: torch.Tensor,
    budgets: torch.Tensor,
    primary: torch.Tensor,
    secondary: torch.Tensor,
) -> torch.Tensor:
    """Each head's excess over ``max(budget, #born now)``, lowest ``(primary, secondary)``
    first, never an entry born in this step."""
    ri = row_index(rows, state.num_rows)
    valid = state.valid[ri]
    born_now = _born_now(state, rows, valid)
    return select_lowest(primary, secondary, valid & ~born_now, _excess(valid, born_now, budgets))


class FullPolicy(KVPolicy):
    """``full``: never evicts (the reference path through this project's cache code)."""

    name: ClassVar[str] = "full"
    config_cls: ClassVar[type] = FullConfig
    needs_attention: ClassVar[bool] = False

    def _select_victims(
        self,
        state: PolicyState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        keys: KeySource | None,
    ) -> torch.Tensor:
        ri = row_index(rows, state.num_rows)
        return torch.zeros_like(state.valid[ri])

    def max_selected(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """:data:`UNBOUNDED`: a head grows with the sequence."""
        return UNBOUNDED

    def max_resident(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        return UNBOUNDED


class StreamingPolicy(KVPolicy):
    """``streaming`` (StreamingLLM): keep the ``sinks`` oldest positions and the newest rest."""

    name: ClassVar[str] = "streaming"
    config_cls: ClassVar[type] = StreamingConfig
    needs_attention: ClassVar[bool] = False
    config: StreamingConfig

    def _select_victims(
        self,
        state: PolicyState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        keys: KeySource | None,
    ) -> torch.Tensor:
        """Evict the oldest non-sink positions; sinks go last (only if the budget < sinks)."""
        ri = row_index(rows, state.num_rows)
        position = state.position[ri]
        sinks = _lowest_positions(position, state.valid[ri], self.config.sinks)
        primary = torch.where(sinks, torch.finfo(torch.float64).max, position.double())
        # Among sinks the newest goes first; among the rest the oldest.
        secondary = torch.where(sinks, -position, position)
        return _evict_lowest(state, rows, budgets, primary, secondary)

    def max_selected(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        return budget


def _lowest_positions(position: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` smallest positions among valid slots of each head."""
    k = min(k, position.shape[-1])
    if k == 0:
        return torch.zeros_like(valid)
    key = torch.where(valid, position, torch.iinfo(torch.int64).max)
    idx = key.topk(k, dim=-1, largest=False).indices
    return torch.zeros_like(valid).scatter_(-1, idx, True) & valid


@dataclass
class H2OState(PolicyState):
    """Adds the attention accumulated by each entry since its insertion."""

    acc: torch.Tensor  # float32 [R, L, H, S]

    EMPTY: ClassVar[dict[str, Any]] = {**PolicyState.EMPTY, "acc": 0.0}


class H2OPolicy(KVPolicy):
    """``h2o``: keep ``budget // 2`` most recent entries, fill the rest by cumulative attention."""

    name: ClassVar[str] = "h2o"
    config_cls: ClassVar[type] = H2OConfig
    state_cls: ClassVar[type[PolicyState]] = H2OState
    config: H2OConfig

    @property
    def obs_window(self) -> int:
        return self.config.obs_window

    def _extra_fields(
        self, shape: tuple[int, int, int, int], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {"acc": torch.zeros(shape, dtype=torch.float32, device=device)}

    def observe(self, state: H2OState, rows: torch.Tensor, probs: torch.Tensor, **_: Any) -> None:
        ri = row_index(rows, state.num_rows)
        p = self._reduce(state, probs).to(torch.float32)
        state.acc[ri] = state.acc[ri] + torch.where(state.valid[ri], p, 0.0)

    def _select_victims(
        self,
        state: H2OState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        keys: KeySource | None,
    ) -> torch.Tensor:
        """Evict the lowest cumulative attention outside the recent half; ties: older first."""
        ri = row_index(rows, state.num_rows)
        valid = state.valid[ri]
        position = state.position[ri]
        born_now = _born_now(state, rows, valid)
        excess = _excess(valid, born_now, budgets)
        if not bool((excess > 0).any()):
            return torch.zeros_like(valid)
        recent = _highest_positions(position, valid, budgets // 2)
        primary = torch.where(recent, torch.finfo(torch.float32).max, state.acc[ri])
        return select_lowest(primary, position, valid & ~born_now, excess)

    def head_utilisation(self, state: H2OState, rows: torch.Tensor) -> torch.Tensor:
        ri = row_index(rows, state.num_rows)
        return torch.where(self.counted(state, rows), state.acc[ri], 0.0).sum(-1)

    def max_selected(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        return budget


def _highest_positions(
    position: torch.Tensor, valid: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Mask of the ``k[...]`` (per head) largest positions among valid slots."""
    key = torch.where(valid, position, -1)
    ordered = key.sort(dim=-1, descending=True).values
    idx = (k - 1).clamp(0, position.shape[-1] - 1).unsqueeze(-1)
    threshold = ordered.gather(-1, idx)
    return valid & (key >= threshold) & (k > 0).unsqueeze(-1)


@dataclass
class RandomState(PolicyState):
    """Adds a uniform random rank per entry, drawn when it is inserted."""

    rank: torch.Tensor  # float32 [R, L, H, S]

    EMPTY: ClassVar[dict[str, Any]] = {**PolicyState.EMPTY, "rank": 0.0}


#: The Mersenne prime 2**31 - 1 and the MINSTD multiplier: products stay inside int64.
_MODULUS, _MULTIPLIER = 2**31 - 1, 48271


def uniform_rank(seed: int, position: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """A uniform number in [0, 1) per (seed, position, KV head): a fixed function, so a
    request's ranks depend on nothing but its own tokens (not on its batch or its row)."""
    h = (position * 2654435761 + head * 40503 + seed * 97531 + 12345) % _MODULUS
    for _ in range(4):
        h = (h * _MULTIPLIER) % _MODULUS
        h = h ^ (h >> 13)
    return h.to(torch.float64).div(_MODULUS).to(torch.float32)


class RandomPolicy(KVPolicy):
    """``random``: evict uniformly at random among the evictable entries.

    Each entry gets a uniform rank at insert (:func:`uniform_rank` of ``seed``, its
    position and its KV head); the lowest ranks go first, which picks every subset of a
    given size with the same probability. The same position ranks alike in every layer of
    a head. The simplest baseline the paper's method must beat.
    """

    name: ClassVar[str] = "random"
    config_cls: ClassVar[type] = RandomConfig
    state_cls: ClassVar[type[PolicyState]] = RandomState
    needs_attention: ClassVar[bool] = False
    config: RandomConfig

    def _extra_fields(
        self, shape: tuple[int, int, int, int], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {"rank": torch.zeros(shape, dtype=torch.float32, device=device)}

    def insert(
        self,
        state: RandomState,
        rows: torch.Tensor,
        new: torch.Tensor,
        positions: torch.Tensor,
        *,
        prefill: bool = False,
    ) -> None:
        super().insert(state, rows, new, positions, prefill=prefill)
        heads = torch.arange(new.shape[2], device=new.device).view(1, 1, -1, 1)
        heads = heads + self.first_kv_head
        masked_update(state.rank, rows, new, uniform_rank(self.config.seed, positions, heads))

    def _select_victims(
        self,
        state: RandomState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        keys: KeySource | None,
    ) -> torch.Tensor:
        ri = row_index(rows, state.num_rows)
        return _evict_lowest(state, rows, budgets, state.rank[ri], state.position[ri])

    def max_selected(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        return budget
