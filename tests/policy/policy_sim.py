"""A small driver that runs a policy through prefill + decode steps on random inputs.

Randomness is drawn per (seed, row, step), so a row sees the same inputs whether it is run
alone or in a batch, and in any row order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crystal_vllm.policy import KVPolicy, PolicyState

GROUP = 2  # query heads per KV head
KEY_DIM = 4

# Small cadence parameters so that snapkv/rkv compress within a short simulation.
SMALL_PARAMS: dict[str, dict] = {
    "snapkv": {"buffer": 3, "window": 2, "kernel": 3},
    "rkv": {"buffer": 3, "window": 2, "kernel": 3},
}


def _gen(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % (2**61 - 1)
    return torch.Generator().manual_seed(seed)


def draw_probs(seed: int, row: int, step: int, valid: torch.Tensor, dyadic: bool) -> torch.Tensor:
    """``[L, H*G, S]`` attention for one row: zero on invalid slots.

    ``dyadic`` draws small integers / 64 (exact in float32, many ties); otherwise a masked
    softmax of random logits.
    """
    n_layers, n_heads, n_slots = valid.shape
    g = _gen(seed, row, step, 1)
    shape = (n_layers, n_heads * GROUP, n_slots)
    mask = valid.repeat_interleave(GROUP, dim=1)
    if dyadic:
        p = torch.randint(0, 9, shape, generator=g).float() / 64
        return torch.where(mask, p, 0.0)
    logits = torch.randn(shape, generator=g) * 2
    return torch.where(mask, logits, -torch.inf).softmax(-1).nan_to_num(0.0)


@dataclass
class Sim:
    """Drives ``policy`` over ``num_rows`` rows; ``budgets`` is ``[R, L, H]``."""

    policy: KVPolicy
    budgets: torch.Tensor
    num_slots: int
    seed: int = 0
    dyadic: bool = False
    layerwise: bool = False
    state: PolicyState = field(init=False)
    keys: torch.Tensor = field(init=False)
    next_pos: torch.Tensor = field(init=False)
    log: list = field(init=False, default_factory=list)
    #: After the last decode: valid slots and entries born in the step, before selection.
    last_valid: torch.Tensor | None = field(init=False, default=None)
    last_born_now: torch.Tensor | None = field(init=False, default=None)
    last_prompt: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        r, n_layers, n_heads = self.budgets.shape
        self.state = self.policy.init_state(r, n_layers, n_heads, self.num_slots)
        self.keys = torch.zeros(r, n_layers, n_heads, self.num_slots, KEY_DIM)
        self.next_pos = torch.zeros(r, dtype=torch.int64)

    def _write_keys(self, rows: torch.Tensor, new: torch.Tensor) -> None:
        for i, row in enumerate(rows.tolist()):
            step = int(self.state.step[row])
            k = torch.randn(self.keys.shape[1:], generator=_gen(self.seed, row, step, 2))
            self.keys[row] = torch.where(new[i].unsqueeze(-1), k, self.keys[row])

    def _observe(self, rows: torch.Tensor) -> torch.Tensor:
        valid = self.state.valid[rows]
        probs = torch.stack(
            [
                draw_probs(self.seed, row, int(self.state.step[row]), valid[i], self.dyadic)
                for i, row in enumerate(rows.tolist())
            ]
        )
        if self.layerwise:
            for layer in range(self.state.num_layers):
                view = self.state.layer(layer)
                self.policy.observe(view, rows, probs[:, layer : layer + 1])
        else:
            self.policy.observe(self.state, rows, probs)
        return probs

    def _select_and_remove(self, rows: torch.Tensor) -> torch.Tensor:
        # As the server runtime: select so that the next step's token fits in the budget.
        budgets = self.policy.keep_between_steps(self.budgets[rows])
        keys = self.keys[rows] if self.policy.needs_keys else None
        if self.layerwise:
            parts = []
            for layer in range(self.state.num_layers):
                view = self.state.layer(layer)
                k = keys[:, layer : layer + 1] if keys is not None else None
                parts.append(
                    self.policy.select_evictions(view, rows, budgets[:, layer : layer + 1], k)
                )
            evict = torch.cat(parts, dim=1)
        else:
            evict = self.policy.select_evictions(self.state, rows, budgets, keys)
        self.policy.remove(self.state, rows, evict)
        return evict

    def prefill(self, rows: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Insert ``lengths[i]`` prompt entries per head, replay the obs window, select."""
        s = self.num_slots
        b = rows.numel()
        lens = torch.tensor(lengths)
        slot = torch.arange(s)
        new = (slot < lens.view(-1, 1)).view(b, 1, 1, s).expand(-1, *self.budgets.shape[1:], s)
        positions = slot.expand_as(new)
        self.policy.reset(self.state, rows)
        self.policy.insert(self.state, rows, new.clone(), positions.clone(), prefill=True)
        self._write_keys(rows, new)
        self.next_pos[rows] = lens
        for _ in range(self.policy.obs_window):
            self.policy.begin_step(self.state, rows)
            self._observe(rows)
        if self.policy.obs_window == 0:
            self.policy.begin_step(self.state, rows)
        evict = self._select_and_remove(rows)
        self.log.append(("prefill", evict))
        return evict

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """One decode step: one new entry per head in its first free slot."""
        self.policy.begin_step(self.state, rows)
        free = ~self.state.valid[rows]
        assert bool(free.any(-1).all()), "a head has no free slot"
        slot = free.to(torch.int8).argmax(-1, keepdim=True)
        new = torch.zeros_like(free).scatter_(-1, slot, True)
        positions = self.next_pos[rows].view(-1, 1, 1, 1).expand_as(new).clone()
        self.policy.insert(self.state, rows, new, positions)
        self._write_keys(rows, new)
        self.next_pos[rows] += 1
        self._observe(rows)
        self.last_valid = self.state.valid[rows].clone()
        self.last_prompt = self.state.prompt[rows].clone()
        self.last_born_now = new
        evict = self._select_and_remove(rows)
        self.log.append(("decode", evict))
        return evict
