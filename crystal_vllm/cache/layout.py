"""How vLLM's single KV backing buffer is viewed as a pool of head-blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadBlockLayout:
    """Geometry of the head-block pool.

    A head-block holds ``block_size`` tokens of K and V for one (layer, KV head). One
    vLLM block id stands for ``num_layers * num_kv_heads`` head-blocks, numbered
    layer-outermost like vLLM's backing buffer (``offset + l * layer_stride +
    b * block_stride``): head-block ``(l * num_blocks + b) * num_kv_heads + h``. With this
    numbering, a request that never evicts uses exactly the bytes vLLM would have used.
    """

    num_blocks: int
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_blocks", "num_layers", "num_kv_heads", "block_size", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HeadBlockLayout.{name}={value!r} must be an int >= 1")

    @property
    def heads_per_block(self) -> int:
        """Head-blocks one vLLM block stands for."""
        return self.num_layers * self.num_kv_heads

    @property
    def num_head_blocks(self) -> int:
        return self.num_blocks * self.heads_per_block

    def head_block_id(
        self, block: torch.Tensor | int, layer: torch.Tensor | int, head: torch.Tensor | int
    ) -> torch.Tensor | int:
        """Head-block id of (vLLM block, layer, KV head); broadcasts over tensors."""
        return (layer * self.num_blocks + block) * self.num_kv_heads + head

    def split_head_block_id(
        self, head_block: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`head_block_id`: ``(block, layer, head)``."""
        head = head_block % self.num_kv_heads
        rest = head_block // self.num_kv_heads
        return rest % self.num_blocks, rest // self.num_blocks, head

    def pool_bytes(self, dtype: torch.dtype) -> int:
        """Size in bytes of the whole pool in ``dtype``."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.num_head_blocks * 2 * self.block_size * self.head_dim * itemsize

    def view_pool(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """View a raw buffer (any dtype, contiguous) as ``[num_head_blocks, 2, bs, D]``.

        No copy: writes through the view land in ``raw``. The buffer must be exactly
        :meth:`pool_bytes` long, so a layout that disagrees with the allocation fails here
        instead of silently aliasing memory.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"view_pool: dtype must be a floating dtype, got {dtype}")
        if not raw.is_contiguous():
            raise ValueError("view_pool: the raw buffer must be contiguous")
        have = raw.numel() * raw.element_size()
        want = self.pool_bytes(dtype)
        if have != want:
            raise ValueError(
                f"view_pool: raw buffer has {have} bytes but {self} in {dtype} needs {want} "
                f"({self.num_head_blocks} head-blocks x 2 x {self.block_size} x "
                f"{self.head_dim} elements)"
            )
        flat = raw.reshape(-1).view(torch.uint8).view(dtype)
        return flat.view(self.num_head_blocks, 2, self.block_size, self.head_dim)
