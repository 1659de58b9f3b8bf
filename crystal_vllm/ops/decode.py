"""The inputs of one decode layer, shared by every implementation of the fused ops.

Plain tensors and scalars: the ops know nothing about policies. A policy builds a
:class:`DecodeLayer` once per layer and either runs its generic step over the single ops
or hands it to a fused kernel together with its state tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class DecodeLayer:
    """One layer of one decode step: each scheduled row adds one token per KV head.

    Attributes:
        layer: the layer index into the state and ``block_tables``.
        rows: ``[b]`` long, distinct rows of the state, in batch order.
        slots: ``[b, H]`` long, the free slot of each head that takes the new token
            (negative: the head has none, its token is not stored).
        positions: ``[b]`` long, the new token's logical position.
        budgets: ``[b, H]`` long, entries each head keeps after the step.
        query: ``[b, Hq, D]``; ``key``, ``value``: ``[b, H, D]`` (the new token).
        kv_pool: ``[num_head_blocks, 2, block_size, D]``, written in place.
        block_tables: ``[R, L, H, MB]`` head-block ids of every row and layer.
        scale: multiplier of ``q . k``.
    """

    layer: int
    rows: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    budgets: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kv_pool: torch.Tensor
    block_tables: torch.Tensor
    scale: float

    @property
    def layer_tables(self) -> torch.Tensor:
        """``[b, H, MB]``: the block tables of this layer for the batch's rows."""
        return self.block_tables[self.rows, self.layer]


class LRFUTensors(Protocol):
    """The per-entry tensors ``[R, L, H, S]`` and row counter ``step [R]`` a fused LRFU
    kernel reads and updates in place (the LRFU policy's state has exactly these)."""

    valid: torch.Tensor  # bool
    position: torch.Tensor  # int64
    born: torch.Tensor  # int64
    crf: torch.Tensor  # float32
    tau: torch.Tensor  # int64
    prompt: torch.Tensor  # bool
    step: torch.Tensor  # int64 [R]
