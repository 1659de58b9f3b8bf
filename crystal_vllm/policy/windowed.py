"""Baselines that compress in bursts (docs/algorithm.md §8): ``snapkv`` and ``rkv``.

A head is left alone until it holds ``budget + buffer`` entries; then it keeps the
``window`` most recent entries plus the best ``budget - window`` of the rest. Scores use
the attention of the last ``window`` queries, kept per entry in a small ring indexed by
``step % window``, max-pooled over neighbouring *positions* (slot order is arbitrary).

Only the heads that compress in this step are gathered and scored, so the burst cost is
paid once per ``buffer`` steps per head instead of every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from crystal_vllm.policy.base import KeySource, KVPolicy, PolicyState
from crystal_vllm.policy.configs import RKVConfig, SnapKVConfig
from crystal_vllm.policy.select import inverse_permutation, row_index, select_lowest

#: Bytes of one similarity-matrix chunk in R-KV's redundancy (bounds peak memory).
_SIMILARITY_CHUNK_BYTES = 256 * 2**20


@dataclass
class WindowState(PolicyState):
    """Adds ``ring[..., i]``: the attention the entry got at the last step ``t`` with
    ``t % window == i`` (0 if it was not yet inserted then)."""

    ring: torch.Tensor  # float32 [R, L, H, S, window]

    EMPTY: ClassVar[dict[str, Any]] = {**PolicyState.EMPTY, "ring": 0.0}


class SnapKVPolicy(KVPolicy):
    """``snapkv`` applied during decode, as R-KV's and Crystal-KV's papers run it."""

    name: ClassVar[str] = "snapkv"
    config_cls: ClassVar[type] = SnapKVConfig
    state_cls: ClassVar[type[PolicyState]] = WindowState
    config: SnapKVConfig

    @property
    def obs_window(self) -> int:
        return self.config.window

    def _extra_fields(
        self, shape: tuple[int, int, int, int], device: torch.device
    ) -> dict[str, torch.Tensor]:
        ring = torch.zeros((*shape, self.config.window), dtype=torch.float32, device=device)
        return {"ring": ring}

    def observe(
        self, state: WindowState, rows: torch.Tensor, probs: torch.Tensor, **_: Any
    ) -> None:
        ri = row_index(rows, state.num_rows)
        p = self._reduce(state, probs).to(torch.float32)
        col = state.step[ri] % self.config.window
        state.ring[rows, :, :, :, col] = torch.where(state.valid[ri], p, 0.0)

    def _select_victims(
        self,
        state: WindowState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        keys: KeySource | None,
    ) -> torch.Tensor:
        """Compress heads holding ``>= budget + buffer`` entries down to their budget."""
        ri = row_index(rows, state.num_rows)
        valid = state.valid[ri]
        count = valid.sum(-1)
        due = count >= budgets + self.config.buffer
        evict = torch.zeros_like(valid)
        if not bool(due.any()):
            return evict
        bi, li, hi = due.nonzero(as_tuple=True)
        r = rows[bi]
        h_valid = valid[bi, li, hi]
        position = state.position[r, li, hi]
        born_now = h_valid & (state.born[r, li, hi] == state.step[r].unsqueeze(-1))
        h_budget = budgets[bi, li, hi]

        order = torch.where(h_valid, position, -1).argsort(dim=-1, descending=True)
        recency = inverse_permutation(order)  # 0 = newest valid entry
        score = self._scores(state, r, li, hi, h_valid, order, keys, bi)
        window = recency < torch.clamp(h_budget, max=self.config.window).unsqueeze(-1)
        primary = torch.where(window, torch.finfo(torch.float32).max, score)
        excess = (count[bi, li, hi] - torch.maximum(h_budget, born_now.sum(-1))).clamp_min(0)
        evict[bi, li, hi] = select_lowest(primary, position, h_valid & ~born_now, excess)
        return evict

    def _importance(
        self,
        state: WindowState,
        r: torch.Tensor,
        li: torch.Tensor,
        hi: torch.Tensor,
        valid: torch.Tensor,
        order: torch.Tensor,
    ) -> torch.Tensor:
        """Mean window attention, max-pooled over ``kernel`` neighbouring positions."""
        attn = state.ring[r, li, hi].mean(-1)
        attn = torch.where(valid, attn, -torch.inf)
        by_pos = attn.gather(-1, order).unsqueeze(1)
        k = self.config.kernel
        pooled = F.max_pool1d(by_pos, kernel_size=k, stride=1, padding=k // 2).squeeze(1)
        return torch.empty_like(pooled).scatter_(-1, order, pooled)

    def _scores(
        self,
        state: WindowState,
        r: torch.Tensor,
        li: torch.Tensor,
        hi: torch.Tensor,
        valid: torch.Tensor,
        order: torch.Tensor,
        keys: KeySource | None,
        bi: torch.Tensor,
    ) -> torch.Tensor:
        return self._importance(state, r, li, hi, valid, order)

    def max_selected(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """Below ``budget + buffer`` nothing is compressed."""
        return budget + self.config.buffer - 1

    def keep_between_steps(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """The budget itself: the buffer is the room new tokens take between compressions,
        so a head peaks at ``budget + buffer`` entries, the new token included."""
        return budget


class RKVPolicy(SnapKVPolicy):
    """``rkv`` (R-KV): ``w * importance - (1 - w) * redundancy`` on SnapKV's cadence."""

    name: ClassVar[str] = "rkv"
    config_cls: ClassVar[type] = RKVConfig
    needs_keys: ClassVar[bool] = True
    config: RKVConfig

    def _scores(
        self,
        state: WindowState,
        r: torch.Tensor,
        li: torch.Tensor,
        hi: torch.Tensor,
        valid: torch.Tensor,
        order: torch.Tensor,
        keys: KeySource | None,
        bi: torch.Tensor,
    ) -> torch.Tensor:
        if keys is None:
            raise ValueError("rkv needs keys: select_evictions(..., keys=[b, L, H, S, D])")
        importance = self._importance(state, r, li, hi, valid, order)
        red = redundancy(
            keys[bi, li, hi], valid, state.position[r, li, hi], self.config.similarity_threshold
        )
        w = self.config.importance_weight
        return w * importance - (1.0 - w) * red


def redundancy(
    keys: torch.Tensor, valid: torch.Tensor, position: torch.Tensor, threshold: float
) -> torch.Tensor:
    """R-KV's redundancy of each key among its head's valid keys, as a distribution.

    Cosine similarity between keys (self excluded); for each key its most recent (largest
    position) neighbour with similarity ``> threshold`` is zeroed, so the newest copy of a
    repeated pattern does not make the older one look redundant to itself; the row mean
    over valid keys, softmax over valid keys. ``keys [n, S, D]``, ``valid``/``position``
    ``[n, S]``; heads are processed in chunks to bound the ``[S, S]`` matrices' memory.
    """
    n, s, _ = keys.shape
    chunk = max(1, _SIMILARITY_CHUNK_BYTES // (s * s * 4))
    parts = [
        _redundancy(keys[i : i + chunk], valid[i : i + chunk], position[i : i + chunk], threshold)
        for i in range(0, n, chunk)
    ]
    return torch.cat(parts) if parts else keys.new_zeros((0, s), dtype=torch.float32)


def _redundancy(
    keys: torch.Tensor, valid: torch.Tensor, position: torch.Tensor, threshold: float
) -> torch.Tensor:
    k = F.normalize(keys.float(), dim=-1, eps=1e-8)
    sim = k @ k.transpose(-1, -2)
    pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    pair &= ~torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    sim = torch.where(pair, sim, 0.0)
    similar = pair & (sim > threshold)
    newest = torch.where(similar, position.unsqueeze(-2), -1).argmax(-1, keepdim=True)
    has = similar.any(-1, keepdim=True)
    sim = sim.scatter(-1, newest, torch.where(has, 0.0, sim.gather(-1, newest)))
    mean = sim.sum(-1) / valid.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(valid, mean, -torch.inf).softmax(-1).nan_to_num(0.0)
