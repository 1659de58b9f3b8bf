"""Top-p (nucleus) hit masks over attention probabilities (docs/algorithm.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def top_p_mask(
    probs: torch.Tensor, position: torch.Tensor, valid: torch.Tensor, top_p: float
) -> torch.Tensor:
    """The smallest set of valid entries per head whose probabilities sum to ``>= top_p``.

    Entries are taken by decreasing probability, ties by more recent (larger) position, and
    an entry is a hit when the mass taken before it is still below ``top_p`` times the
    head's total (the total rather than 1, so GQA-renormalised or rounded inputs behave).
    ``top_p == 1`` takes every valid entry: a softmax gives every entry positive mass, so
    entries whose probability underflowed to 0 still belong to the full set. A head whose
    probabilities are all 0 has no hits.

    Ranking uses float32 probabilities: one int64 sort key packs the (non-negative) float32
    bit pattern above the position, which orders exactly as (probability, position).
    """
    if top_p >= 1.0:
        return valid.clone()
    p = torch.where(valid, probs.float(), 0.0).clamp_min(0.0) + 0.0  # +0.0 turns -0.0 into 0.0
    key = (p.view(torch.int32).to(torch.int64) << 32) | (position & 0xFFFFFFFF)
    key = torch.where(valid, key, -1)
    order = key.argsort(dim=-1, descending=True)
    sorted_p = p.gather(-1, order)
    cum = sorted_p.cumsum(-1)
    before = F.pad(cum[..., :-1], (1, 0))
    hit_sorted = before < top_p * cum[..., -1:]
    return torch.zeros_like(valid).scatter_(-1, order, hit_sorted) & valid
