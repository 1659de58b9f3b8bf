"""HeadBlockLayout: numbering agrees with vLLM's layer-outermost backing buffer."""

from __future__ import annotations

import pytest
import torch

from crystal_vllm.cache import HeadBlockLayout


def test_head_block_bytes_sit_where_vllm_puts_them():
    layout = HeadBlockLayout(num_blocks=5, num_layers=3, num_kv_heads=2, block_size=4, head_dim=8)
    dtype = torch.bfloat16
    raw = torch.zeros(layout.pool_bytes(dtype), dtype=torch.int8)
    pool = layout.view_pool(raw, dtype)
    assert pool.shape == (layout.num_head_blocks, 2, 4, 8) and pool.dtype == dtype

    # vLLM: offset + l * layer_stride + b * block_stride, H heads of (bs, 2 * D) inside.
    head_bytes = 2 * 4 * 8 * 2
    block_stride = 2 * head_bytes
    layer_stride = 5 * block_stride
    for block, layer, head in [(0, 0, 0), (4, 2, 1), (2, 1, 0), (3, 0, 1)]:
        hb = layout.head_block_id(block, layer, head)
        pool[hb] = 1.0
        start = layer * layer_stride + block * block_stride + head * head_bytes
        touched = (raw != 0).nonzero().flatten()
        assert int(touched.min()) == start and int(touched.max()) == start + head_bytes - 1
        pool[hb] = 0.0


def test_head_block_id_vectorised_and_inverse():
    layout = HeadBlockLayout(num_blocks=7, num_layers=4, num_kv_heads=3, block_size=16, head_dim=64)
    block = torch.arange(7).view(7, 1, 1)
    layer = torch.arange(4).view(1, 4, 1)
    head = torch.arange(3).view(1, 1, 3)
    ids = layout.head_block_id(block, layer, head)
    assert sorted(ids.flatten().tolist()) == list(range(layout.num_head_blocks))
    b, la, h = layout.split_head_block_id(ids)
    assert torch.equal(b, block.expand_as(ids))
    assert torch.equal(la, layer.expand_as(ids))
    assert torch.equal(h, head.expand_as(ids))


def test_view_pool_rejects_wrong_size():
    layout = HeadBlockLayout(num_blocks=2, num_layers=1, num_kv_heads=1, block_size=4, head_dim=8)
    with pytest.raises(ValueError, match=r"has 511 bytes .* needs 512"):
        layout.view_pool(torch.zeros(511, dtype=torch.int8), torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        layout.view_pool(torch.zeros(1024, dtype=torch.int8)[::2], torch.float32)
    # Any raw dtype works as long as the byte count matches.
    pool = layout.view_pool(torch.zeros(256, dtype=torch.float16), torch.float32)
    assert pool.shape == (2, 2, 4, 8)


@pytest.mark.parametrize("field", ["num_blocks", "num_layers", "num_kv_heads", "block_size"])
def test_layout_validation_names_field(field: str):
    kwargs = dict(num_blocks=1, num_layers=1, num_kv_heads=1, block_size=1, head_dim=1)
    kwargs[field] = 0
    with pytest.raises(ValueError, match=f"{field}=0 must be an int >= 1"):
        HeadBlockLayout(**kwargs)
