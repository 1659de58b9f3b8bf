"""The contract every KV eviction policy implements, and the state it works on.

A policy sees a batch of persistent request rows, each holding per-(layer, KV head) slots.
All per-entry tensors have shape ``[R, L, H, S]`` (rows, layers, KV heads, slots) and are
mutated in place, so that the same methods work on :meth:`PolicyState.layer` views while the
caller walks the model layer by layer.

Slots are not in position order: a freed slot is reused by a later token. Everything that
depends on order uses the ``position`` field, never the slot index.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch

from crystal_vllm import ops
from crystal_vllm.ops import DecodeLayer
from crystal_vllm.policy.select import gqa_reduce, masked_update, row_index

#: ``max_resident`` of a policy that never evicts.
UNBOUNDED = sys.maxsize


@dataclass
class PolicyState:
    """Per-entry bookkeeping shared by all policies; subclasses add their own fields.

    ``EMPTY`` maps every per-entry field to the value an empty slot holds; removal writes it
    back, so a freed slot is indistinguishable from one never used.
    """

    valid: torch.Tensor  # bool [R, L, H, S]: the slot holds an entry
    position: torch.Tensor  # int64 [R, L, H, S]: logical token position, -1 when empty
    born: torch.Tensor  # int64 [R, L, H, S]: step at which the entry was inserted
    prompt: torch.Tensor  # bool [R, L, H, S]: a prompt entry (inserted by a prefill)
    step: torch.Tensor  # int64 [R]: the row's own step counter t

    ROW_FIELDS: ClassVar[tuple[str, ...]] = ("step",)
    EMPTY: ClassVar[dict[str, Any]] = {
        "valid": False,
        "position": -1,
        "born": 0,
        "prompt": False,
    }

    def entry_fields(self) -> list[str]:
        """Names of every per-entry field (leading dims ``[R, L, H, S]``)."""
        return [f.name for f in fields(self) if f.name not in self.ROW_FIELDS]

    def layer(self, l: int) -> PolicyState:  # noqa: E741 - `l` is the layer index throughout
        """A view of layer ``l`` (``L == 1``); writes reach this state, ``step`` is shared."""
        if not 0 <= l < self.num_layers:
            raise IndexError(f"layer {l} out of range [0, {self.num_layers})")
        return replace(self, **{n: getattr(self, n)[:, l : l + 1] for n in self.entry_fields()})

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]

    @property
    def num_layers(self) -> int:
        return self.valid.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.valid.shape[2]

    @property
    def num_slots(self) -> int:
        return self.valid.shape[3]


class PagedKeys:
    """One decode layer's keys, indexed like a float32 ``[b, 1, H, S, D]`` tensor but read
    from the paged pool only for the heads indexed.

    ``rkv`` scores keys only for the heads that compress in a step (about one step in
    ``buffer``); copying every head's keys every step took about two thirds of its decode
    layer.
    """

    def __init__(self, kv_pool: torch.Tensor, layer_tables: torch.Tensor, num_slots: int) -> None:
        self._kv_pool = kv_pool
        self._layer_tables = layer_tables  # [b, H, MB]
        self._num_slots = num_slots

    def __getitem__(self, index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``keys[batch, layer, head]`` with index tensors: ``[n, S, D]`` float32."""
        batch, layer, head = index
        if bool((layer != 0).any()):
            raise IndexError("PagedKeys holds a single layer: every layer index must be 0")
        tables = self._layer_tables[batch, head]
        return ops.gather_kv(self._kv_pool, tables, self._num_slots)[0].float()


#: Keys as :meth:`KVPolicy.select_evictions` takes them: a ``[b, L, H, S, D]`` tensor or
#: anything indexed the same way with ``(batch, layer, head)`` index tensors.
KeySource = torch.Tensor | PagedKeys


class KVPolicy(ABC):
    """Scores cached entries and picks victims; knows nothing about where K/V live.

    Call order in a decode step: ``begin_step`` -> ``insert`` (the new token) -> ``observe``
    (per layer, this step's attention) -> ``select_evictions`` -> ``remove``. After a prefill:
    ``insert(prefill=True)``, then replay the last ``obs_window`` prompt queries as
    ``begin_step`` + ``observe``, then select. ``rows`` always indexes the R dimension, and
    every ``[b, ...]`` tensor follows its order.
    """

    name: ClassVar[str]
    #: The dataclass holding this policy's parameters (see ``configs.py``).
    config_cls: ClassVar[type]
    state_cls: ClassVar[type[PolicyState]] = PolicyState
    #: ``select_evictions`` needs the keys (``keys=[b, L, H, S, D]``).
    needs_keys: ClassVar[bool] = False
    #: ``observe`` does anything; when False the caller may skip computing probabilities.
    needs_attention: ClassVar[bool] = True
    #: Model-wide index of the first KV head this policy's states hold: a tensor-parallel
    #: rank holds a slice of the heads (the runner sets it). Only choices that depend on
    #: a head's identity read it (``random``), so they match a single-worker run.
    first_kv_head: int = 0

    def __init__(self, config: Any | None = None) -> None:
        config = config if config is not None else self.config_cls()
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"policy {self.name!r} takes a {self.config_cls.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @property
    def adaptive_budgets(self) -> bool:
        """Whether the caller should run Algorithm 2 (``allocate_budgets``) for this policy."""
        return False

    @property
    def obs_window(self) -> int:
        """How many trailing prompt queries the caller replays as ``observe`` after prefill."""
        return 0

    # ------------------------------------------------------------------ state lifecycle

    def init_state(
        self,
        num_rows: int,
        num_layers: int,
        num_kv_heads: int,
        num_slots: int,
        device: torch.device | str | None = None,
    ) -> PolicyState:
        """An empty state; ``num_slots`` is the most entries one head can hold."""
        shape = (num_rows, num_layers, num_kv_heads, num_slots)
        names = ("num_rows", "num_layers", "num_kv_heads", "num_slots")
        for n, v in zip(names, shape, strict=True):
            if v < 1:
                raise ValueError(f"{n} must be an integer >= 1, got {v}")
        device = torch.device(device if device is not None else "cpu")
        tensors = {
            "valid": torch.zeros(shape, dtype=torch.bool, device=device),
            "position": torch.full(shape, -1, dtype=torch.int64, device=device),
            "born": torch.zeros(shape, dtype=torch.int64, device=device),
            "prompt": torch.zeros(shape, dtype=torch.bool, device=device),
            "step": torch.zeros(num_rows, dtype=torch.int64, device=device),
        }
        tensors.update(self._extra_fields(shape, device))
        return self.state_cls(**tensors)

    def _extra_fields(
        self, shape: tuple[int, int, int, int], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Per-entry tensors a subclass adds to the state, filled with their EMPTY values."""
        return {}

    def reset(self, state: PolicyState, rows: torch.Tensor) -> None:
        """Forget everything about ``rows`` (a finished, aborted or preempted request)."""
        ri = row_index(rows, state.num_rows)
        for name in state.entry_fields():
            getattr(state, name)[ri] = state.EMPTY[name]
        state.step[ri] = 0

    def begin_step(self, state: PolicyState, rows: torch.Tensor) -> None:
        """Advance the rows' own step counter t (once per step, not once per layer)."""
        ri = row_index(rows, state.num_rows)
        state.step[ri] += 1

    def insert(
        self,
        state: PolicyState,
        rows: torch.Tensor,
        new: torch.Tensor,
        positions: torch.Tensor,
        *,
        prefill: bool = False,
    ) -> None:
        """Record new entries in the slots where ``new`` is set.

        A decode insert counts as a hit at the current step and is never evicted in it; a
        prefill insert starts cold. Every insert is stamped ``born = t``, so the caller
        advances the step (the obs-window replay does) before selecting after a prefill.
        Slots outside ``new`` are untouched.
        """
        ri = row_index(rows, state.num_rows)
        t = state.step[ri].view(-1, 1, 1, 1)
        masked_update(state.valid, rows, new, True)
        masked_update(state.position, rows, new, positions)
        masked_update(state.born, rows, new, t)
        masked_update(state.prompt, rows, new, prefill)
        for name, value in self._new_entry_values(t, prefill).items():
            masked_update(getattr(state, name), rows, new, value)

    def _new_entry_values(self, t: torch.Tensor, prefill: bool) -> dict[str, Any]:
        """Subclass field values of a freshly inserted entry (scalars or ``[b, 1, 1, 1]``)."""
        return {}

    def remove(self, state: PolicyState, rows: torch.Tensor, mask: torch.Tensor) -> None:
        """Drop the entries where ``mask`` is set, resetting their slots to EMPTY."""
        for name in state.entry_fields():
            masked_update(getattr(state, name), rows, mask, state.EMPTY[name])

    # ------------------------------------------------------------------ scoring

    def observe(
        self, state: PolicyState, rows: torch.Tensor, probs: torch.Tensor, **kwargs: Any
    ) -> None:
        """Feed this step's attention ``probs[b, L, Hq, S]`` (0 on invalid slots).

        Query head ``q`` belongs to KV head ``q // G``; the policy does the GQA reduction.
        Policies that ignore attention accept and drop it.
        """
        return None

    def _reduce(self, state: PolicyState, probs: torch.Tensor) -> torch.Tensor:
        """GQA-reduce ``probs`` to one distribution per KV head, by the config's rule."""
        return gqa_reduce(probs, state.num_kv_heads, self.config.gqa_reduce)

    @property
    def keeps_prompt(self) -> bool:
        """Whether prompt entries are protected: never evicted, not counted in the budget
        (``prompt`` is ``keep`` or ``compress``)."""
        return self.config.prompt != "evict"

    def prompt_kept(self, prompt_len: int) -> int:
        """Prompt entries one head holds on top of :meth:`max_resident` for a prompt of
        ``prompt_len`` tokens: all (``keep``), what a selection at ``prompt_budget`` leaves
        (``compress``: :meth:`max_selected` of it, i.e. ``prompt_budget`` for the
        every-step policies and up to ``prompt_budget + buffer - 1`` for snapkv/rkv, which
        compress only past the buffer), or none (``evict``: they count in the budget)."""
        mode = self.config.prompt
        if mode == "keep":
            return prompt_len
        if mode == "compress":
            return min(prompt_len, self.max_selected(self.config.prompt_budget))
        return 0

    def resident_bound(self, budget: int, prompt_len: int) -> int:
        """Most entries one head holds for ``budget`` and a ``prompt_len``-token prompt:
        :meth:`max_resident` plus the prompt entries kept on top (:meth:`prompt_kept`)."""
        return self.max_resident(budget) + self.prompt_kept(prompt_len)

    def counted(self, state: PolicyState, rows: torch.Tensor) -> torch.Tensor:
        """Entries ``[b, L, H, S]`` that count against the budget and may be evicted."""
        ri = row_index(rows, state.num_rows)
        valid = state.valid[ri]
        return valid & ~state.prompt[ri] if self.keeps_prompt else valid

    def select_evictions(
        self,
        state: PolicyState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        keys: KeySource | None = None,
    ) -> torch.Tensor:
        """Victims ``[b, L, H, S]`` so that each head keeps ``<= max(budget, #born now)``
        counted entries.

        Pure: the state is not modified. Only counted entries are returned, never one born
        in the current step. Protected prompt entries are hidden from the policy's own
        choice (:meth:`_select_victims`), so every policy treats the prompt the same way.
        """
        if self.keeps_prompt:
            state = replace(state, valid=state.valid & ~state.prompt)
        return self._select_victims(state, rows, budgets, keys)

    @abstractmethod
    def _select_victims(
        self,
        state: PolicyState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        keys: KeySource | None,
    ) -> torch.Tensor:
        """The policy's choice among the valid entries of ``state`` (see
        :meth:`select_evictions`)."""

    def decode_layer(
        self, state: PolicyState, step: DecodeLayer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode layer: write the new token, attend, observe, select and remove.

        The rows' step counters must already count this step (``begin_step``). This
        generic composition serves every policy and is the oracle of the fused kernels.
        Returns ``out [b, Hq, D]`` and ``evicted [b, H]`` int32, the entries each head
        dropped.
        """
        layer_state = state.layer(step.layer)
        b, h = step.slots.shape
        new = torch.zeros(b, 1, h, state.num_slots, dtype=torch.bool, device=step.slots.device)
        # A negative slot means "no slot for this head's token" (as in the kernels).
        slots = step.slots[:, None, :, None]
        new.scatter_(-1, slots.clamp_min(0), slots >= 0)
        positions = step.positions.view(b, 1, 1, 1).expand_as(new)
        self.insert(layer_state, step.rows, new, positions)
        tables = step.layer_tables
        slots = step.slots[:, :, None]
        ops.write_kv(step.kv_pool, tables, slots, step.key[:, None], step.value[:, None])
        valid = state.valid[step.rows, step.layer]
        out, probs = ops.paged_decode_attention(step.query, step.kv_pool, tables, valid, step.scale)
        budgets = step.budgets[:, None]
        self.observe(layer_state, step.rows, probs[:, None], budgets=budgets)
        keys = PagedKeys(step.kv_pool, tables, state.num_slots) if self.needs_keys else None
        evict = self.select_evictions(layer_state, step.rows, budgets, keys=keys)
        self.remove(layer_state, step.rows, evict)
        return out, evict[:, 0].sum(-1, dtype=torch.int32)

    def end_step(
        self,
        state: PolicyState,
        rows: torch.Tensor,
        budgets: torch.Tensor,
        targets: torch.Tensor,
        *,
        max_per_head: int | torch.Tensor,
        block_size: int = 1,
        capacity: torch.Tensor | None = None,
        counts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-head budgets for the next step, after every layer observed this one.

        ``budgets [b, L, H]`` is what each head of ``rows`` may hold in this step,
        ``targets`` what the policy wants it to hold (the same with uniform budgets).
        Returns the next ``(budgets, targets)`` of ``rows``, or None when neither changes;
        the next step's evictions apply the budgets. Uniform-budget policies never change
        them. ``max_per_head`` bounds one head; memory comes in blocks of ``block_size``
        entries per head, ``capacity [b]`` blocks per row (None: unbounded). ``counts``:
        the caller's per-head ``(counted, held on top)`` entries ``[b, L, H]``, if it has
        them (spares a pass over the occupancy mask).
        """
        return None

    def head_utilisation(self, state: PolicyState, rows: torch.Tensor) -> torch.Tensor:
        """``S[l, h]`` of Algorithm 2; policies without a score report their occupancy."""
        return self.counted(state, rows).sum(-1).to(torch.float32)

    @abstractmethod
    def max_selected(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """Most counted entries :meth:`select_evictions` at ``budget`` leaves a head when
        none was born in the step; elementwise on a tensor of budgets."""

    def keep_between_steps(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """The budget to select at after a step (or a prefill) so that a head holds at most
        ``budget`` entries at any time, the next step's token included: one fewer for the
        policies that evict every step (the next token takes the freed slot), never below
        one. Policies that compress on their own cadence override it."""
        if isinstance(budget, torch.Tensor):
            return (budget - 1).clamp_min(1)
        return max(budget - 1, 1)

    def max_resident(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """Most entries one head ever holds for ``budget``, the step's new token included
        (memory to reserve; protected prompt entries come on top, see
        :meth:`prompt_kept`): ``budget`` for the every-step policies (2 at budget 1)."""
        return self.max_selected(self.keep_between_steps(budget)) + 1
