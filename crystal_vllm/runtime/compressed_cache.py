"""One worker's compressed KV cache: the step lifecycle that ties a policy to the pool.

The model runner (``crystal_vllm.vllm_ext.runner_mixin``) drives it, per model step:
:meth:`CompressedKVCache.begin_step` once the batch is settled (with the scheduled
requests and their budgets), :meth:`CompressedKVCache.attention` once per layer (from the
attention backend, which finds the cache in the step's metadata),
:meth:`CompressedKVCache.end_step` after the forward pass, and
:meth:`CompressedKVCache.release` when a request finishes, is aborted or is preempted.
Everything is keyed by request id; rows of the persistent state are assigned here and
never leak to the caller.

A decode layer is the policy's own step (:meth:`~crystal_vllm.policy.KVPolicy.decode_layer`):
write the new token's K/V into the free slot picked here, attend over all entries
including it, record the hits, evict so that the next step's token still fits in the
budget (a head never holds more than ``max_resident(budget)`` entries, the new token
included; docs/algorithm.md §2); LRFU policies
run it as one fused kernel where the ops offer one. At the end of a step the policy may
move budgets (:meth:`~crystal_vllm.policy.KVPolicy.end_step`, Algorithm 2 for
``crystal``); surplus head-blocks then go back to the request.
A prefill chunk (a whole prompt, or any part of it vLLM schedules) attends over what the
request holds and, causally, over itself; then, per layer, a scratch policy state over
both is warmed with the chunk's last ``obs_window`` queries and evicted down to what the
budget and the prompt mode keep; only the kept entries are written to the request's slots.

With ``share_prompt_blocks`` (vLLM's prefix caching, only under ``prompt: keep``) the
prompt is written in vLLM's own layout and never moved or overwritten, so its full
blocks can be shared: a request whose first blocks are prefix-cache hits starts by
borrowing them (:meth:`~crystal_vllm.cache.HeadBlockTables.borrow_blocks`) and prefills
only the rest of its prompt.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from crystal_vllm import ops
from crystal_vllm.cache import HeadBlockLayout, HeadBlockTables
from crystal_vllm.ops import DecodeLayer
from crystal_vllm.policy import KVPolicy


@dataclass(frozen=True)
class StepRequest:
    """One scheduled request of a model step, in batch order."""

    req_id: str
    num_new_tokens: int
    num_computed_tokens: int
    num_prompt_tokens: int
    block_ids: Sequence[int]
    budget: int

    @property
    def is_prefill(self) -> bool:
        """The request's first chunk: its row starts afresh."""
        return self.num_computed_tokens == 0

    @property
    def is_chunk(self) -> bool:
        """A prefill chunk (the first or a later one), not a single decode token: any step
        with prompt tokens, or with several tokens (a resumed request's recomputed outputs)."""
        return (
            self.is_prefill
            or self.num_new_tokens > 1
            or self.num_computed_tokens < self.num_prompt_tokens
        )


@dataclass
class CacheStats:
    """Counters the cache advances as it runs."""

    evictions: int = 0
    reallocations: int = 0
    prefill_evictions: int = 0
    steps: int = 0
    released_requests: int = 0  # rows given back (finished, aborted or preempted)
    peak_entries_sum: float = 0.0  # their peak entries per (layer, KV head), summed
    peak_entries_max: float = 0.0  # and the largest of them


@dataclass(frozen=True)
class CacheSummary:
    """One worker's counters and occupancy at one moment: the single public view of the
    cache, read by the stats log line, the benchmarks (``collective_rpc``) and metrics.

    ``evictions`` counts decode-time and reallocation evictions, ``prefill_evictions``
    the prompt entries dropped right after a prefill.
    """

    requests: int
    steps: int
    evictions: int
    prefill_evictions: int
    reallocations: int
    head_blocks_in_use: int
    head_blocks_capacity: int
    kept_per_layer: list[int]
    #: Entries held now, summed over the running requests, layers and KV heads (the mean
    #: per (layer, KV head) is ``kept_entries / (requests * layers * KV heads)``).
    kept_entries: int
    #: Peak KV entries per (layer, KV head) of a request over its life (prompt, generated
    #: and buffered entries, the step's new token included): the mean and the largest over
    #: the requests released so far. The memory a policy really used, for fair comparisons.
    mean_peak_entries: float
    max_peak_entries: float
    released_requests: int

    @property
    def total_evictions(self) -> int:
        return self.evictions + self.prefill_evictions


@dataclass(frozen=True)
class _Chunk:
    """One prefill chunk of a step: ``count`` tokens from batch index ``start``, at
    positions ``first ..``; positions below ``num_prompt`` are prompt tokens. ``step`` is
    the row's policy step before the chunk (every layer's selection starts from it)."""

    row: int
    start: int
    count: int
    first: int
    num_prompt: int
    step: int = 0


@dataclass
class _StepPlan:
    decode_rows: torch.Tensor  # long [b]
    decode_tokens: torch.Tensor | slice  # index of each decode row's token in the batch
    decode_slots: torch.Tensor  # long [L, b, H]: the slot each head's new token takes
    decode_positions: torch.Tensor  # long [b]
    decode_budgets: torch.Tensor  # long [L, b, H]
    prefills: list[_Chunk] = field(default_factory=list)
    evicted: list[torch.Tensor] = field(default_factory=list)  # per-layer counts, summed
    # at the end of the step (one sync per step instead of one per layer)


class CompressedKVCache:
    """Per-head paged KV entries of every running request of one worker."""

    def __init__(
        self,
        policy: KVPolicy,
        layout: HeadBlockLayout,
        kv_pool: torch.Tensor,
        *,
        max_rows: int,
        max_slots: int,
        max_blocks_per_row: int,
        scale: float,
        share_prompt_blocks: bool = False,
        debug_checks: bool = False,
    ) -> None:
        if share_prompt_blocks and policy.config.prompt != "keep":
            raise ValueError(
                f"share_prompt_blocks needs prompt mode 'keep', not {policy.config.prompt!r}: "
                "only a prompt that is never evicted or compressed can be shared"
            )
        self.policy = policy
        self.share_prompt_blocks = share_prompt_blocks
        self.layout = layout
        self.kv_pool = kv_pool
        self.scale = scale
        self.debug_checks = debug_checks
        device = kv_pool.device
        L, H, bs = layout.num_layers, layout.num_kv_heads, layout.block_size
        self.max_head_blocks = math.ceil(max_slots / bs)
        self.max_slots = self.max_head_blocks * bs
        self.state = policy.init_state(max_rows, L, H, self.max_slots, device)
        self.tables = HeadBlockTables(
            layout, max_rows, max_blocks_per_row, self.max_head_blocks, device=device
        )
        # What each head may hold in this step, and what the policy wants it to hold (the
        # same except while adaptive budgets move, see KVPolicy.end_step).
        self.budgets = torch.zeros(max_rows, L, H, dtype=torch.long, device=device)
        self.targets = torch.zeros(max_rows, L, H, dtype=torch.long, device=device)
        self.stats = CacheStats()
        # Head-blocks a request's block cap holds (adaptive budgets stay within them).
        self._capacity = torch.zeros(max_rows, dtype=torch.long, device=device)
        # Protected prompt entries each head holds (kept on top of the budget; fixed once
        # the prefill is stored, since nothing evicts them).
        self._protected = torch.zeros(max_rows, L, H, dtype=torch.long, device=device)
        self._held = torch.zeros(max_rows, dtype=torch.long, device=device)  # after a step
        self._peak = torch.zeros(max_rows, dtype=torch.long, device=device)
        self._rows: dict[str, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._blocks_seen: dict[str, int] = {}
        self._row_budgets: dict[str, int] = {}
        self._num_prompt: dict[str, int] = {}  # prompt entries of each request's prefill
        self._plan: _StepPlan | None = None
        # debug_checks: a fingerprint of each row's full prompt blocks once written (they
        # may be shared), which no later step may change.
        self._sealed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- request lifecycle -------------------------------------------------------------

    def release(self, req_id: str) -> None:
        """Forget a request (finished, aborted or preempted): its head-blocks go back."""
        row = self._rows.pop(req_id, None)
        if row is None:
            return
        rows = torch.tensor([row], device=self.budgets.device)
        peak = int(self._peak[row]) / (self.layout.num_layers * self.layout.num_kv_heads)
        self.stats.released_requests += 1
        self.stats.peak_entries_sum += peak
        self.stats.peak_entries_max = max(self.stats.peak_entries_max, peak)
        self._held[row] = self._peak[row] = self._capacity[row] = 0
        self._protected[row] = 0
        self.tables.release(rows)
        self.policy.reset(self.state, rows)
        self._blocks_seen.pop(req_id, None)
        self._row_budgets.pop(req_id, None)
        self._num_prompt.pop(req_id, None)
        self._sealed.pop(row, None)
        self._free_rows.append(row)

    def _row_for(self, request: StepRequest) -> tuple[int, bool]:
        """The request's row and whether it is new (its first chunk: a prefill from
        scratch, or after prefix-cache hits, whose blocks it borrows first)."""
        if request.is_prefill and request.req_id in self._rows:
            self.release(request.req_id)  # resumed after preemption: vLLM re-prefills
        row = self._rows.get(request.req_id)
        new = row is None
        if new:
            if not self._free_rows:
                raise RuntimeError("more running requests than rows (max_num_seqs)")
            row = self._free_rows.pop()
            self._rows[request.req_id] = row
            self._blocks_seen[request.req_id] = self._borrow_prefix(row, request)
        seen = self._blocks_seen[request.req_id]
        if len(request.block_ids) > seen:
            self.tables.add_blocks(row, list(request.block_ids[seen:]))
            self._blocks_seen[request.req_id] = len(request.block_ids)
        return row, new

    def _borrow_prefix(self, row: int, request: StepRequest) -> int:
        """A new request that starts with computed tokens has prefix-cache hits: its first
        blocks hold its first prompt tokens in vLLM's layout. Borrow them (the entries are
        recorded once the row is reset); returns how many."""
        computed = request.num_computed_tokens
        if computed == 0:
            return 0
        block_size = self.layout.block_size
        if not self.share_prompt_blocks:
            raise RuntimeError(
                f"request {request.req_id} starts with {computed} computed tokens, but prompt "
                "blocks are not shared here (prefix caching needs prompt mode 'keep')"
            )
        if computed % block_size or computed > request.num_prompt_tokens:
            raise RuntimeError(
                f"request {request.req_id}: {computed} prefix-cached tokens are not whole "
                f"{block_size}-token blocks of its {request.num_prompt_tokens}-token prompt"
            )
        count = computed // block_size
        self.tables.borrow_blocks(row, list(request.block_ids[:count]))
        return count

    # -- step lifecycle -----------------------------------------------------------------

    def begin_step(self, batch: Sequence[StepRequest]) -> None:
        """Assign rows and slots for this step's new tokens."""
        device = self.budgets.device
        L, H = self.layout.num_layers, self.layout.num_kv_heads
        decode_rows, decode_tokens, decode_positions = [], [], []
        prefills = []
        token = 0
        fresh = []
        for request in batch:
            row, new = self._row_for(request)
            if request.is_chunk or new:
                # A request resumed after preemption is prefilled with its outputs too:
                # only its first num_prompt_tokens are prompt entries.
                prefills.append(
                    _Chunk(
                        row,
                        token,
                        request.num_new_tokens,
                        request.num_computed_tokens,
                        request.num_prompt_tokens,
                    )
                )
                if new:
                    fresh.append((row, request.budget, request.num_computed_tokens))
                    self._row_budgets[request.req_id] = request.budget
                    self._num_prompt[request.req_id] = request.num_prompt_tokens
                    self._set_capacity(row, request.req_id)
            else:
                decode_rows.append(row)
                decode_tokens.append(token)
                decode_positions.append(request.num_computed_tokens)
                self._update_budget(row, request)
            token += request.num_new_tokens

        if fresh:
            rows = torch.tensor([f[0] for f in fresh], device=device)
            budgets = torch.tensor([f[1] for f in fresh], device=device)
            self.budgets[rows] = self.targets[rows] = budgets[:, None, None]
            self.policy.reset(self.state, rows)
            for row, _, borrowed in fresh:
                if borrowed:
                    self._record_borrowed(row, borrowed)
        if prefills:
            # A prefix-cache hit may be on blocks that another chunk of this very step
            # writes (vLLM caches blocks when it schedules them): chunks run in position
            # order, so that every layer writes a block before any chunk reads it.
            prefills.sort(key=lambda chunk: chunk.first)
            # Room for every head's kept entries: what it holds plus the chunk, up to the
            # bound of its budget and prompt (the selection never keeps more).
            rows = torch.tensor([c.row for c in prefills], device=device)
            bound = torch.tensor(
                [self._slots_for(int(self.budgets[c.row, 0, 0]), c.num_prompt) for c in prefills],
                device=device,
            )
            count = torch.tensor([c.count for c in prefills], device=device)
            held = self.state.valid[rows].sum(dim=-1)
            room = torch.minimum(count[:, None, None], bound[:, None, None] - held).clamp_min(0)
            self.tables.assign_prefill_slots(rows, room, self.state.valid)
            steps = self.state.step[rows].tolist()
            prefills = [
                dataclasses.replace(c, step=t) for c, t in zip(prefills, steps, strict=True)
            ]

        rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        slots = torch.zeros(len(decode_rows), L, H, dtype=torch.long, device=device)
        positions = torch.tensor(decode_positions, dtype=torch.long, device=device)
        if decode_rows:
            # During the step every head also holds its new token.
            self._peak[rows] = torch.maximum(self._peak[rows], self._held[rows] + L * H)
            self.policy.begin_step(self.state, rows)
            need = torch.ones(len(decode_rows), L, H, dtype=torch.bool, device=device)
            slots = self.tables.assign_slots(rows, self.state.valid, need)
        # The common step (decodes only, batch order = token order) needs no gather/scatter.
        tokens: torch.Tensor | slice = torch.tensor(decode_tokens, dtype=torch.long, device=device)
        if not prefills:
            tokens = slice(0, len(decode_tokens))
        self._plan = _StepPlan(
            decode_rows=rows,
            decode_tokens=tokens,
            decode_slots=slots.transpose(0, 1).contiguous(),
            decode_positions=positions,
            decode_budgets=self._keep(self.budgets[rows]).transpose(0, 1).contiguous(),
            prefills=prefills,
        )

    def _record_borrowed(self, row: int, count: int) -> None:
        """Record a new row's borrowed prompt entries (slots ``0 .. count - 1`` of every
        head, at their own positions) as a prefill would: prompt entries, kept whole."""
        device = self.budgets.device
        slots = torch.arange(self.max_slots, device=device)
        new = (slots < count).expand(1, self.layout.num_layers, self.layout.num_kv_heads, -1)
        rows = torch.tensor([row], device=device)
        self.policy.insert(self.state, rows, new, slots.expand_as(new), prefill=True)
        self._protected[row] = count

    def _keep(self, budgets: torch.Tensor) -> torch.Tensor:
        """What heads at ``budgets`` keep after a step or a prefill, so that the next
        step's token still fits in the budget (:meth:`KVPolicy.keep_between_steps`)."""
        return self.policy.keep_between_steps(budgets)

    def _update_budget(self, row: int, request: StepRequest) -> None:
        """A running request's budget changed (its think stage ended): every head starts
        again from the new uniform budget, which is what the request's grown block cap
        holds (adaptive budgets then move from there, within that cap)."""
        if request.budget != self._row_budgets[request.req_id]:
            self.budgets[row] = self.targets[row] = request.budget
            self._row_budgets[request.req_id] = request.budget
            self._set_capacity(row, request.req_id)

    def _set_capacity(self, row: int, req_id: str) -> None:
        """The head-blocks of the request's block cap (what the scheduler grants it)."""
        slots = self._slots_for(self._row_budgets[req_id], self._num_prompt[req_id])
        blocks = math.ceil(slots / self.layout.block_size)
        self._capacity[row] = blocks * self.layout.heads_per_block

    def _slots_for(self, budget: int, num_prompt: int) -> int:
        """Slots a head needs at most: the budget's bound plus the prompt entries kept."""
        return min(self.policy.resident_bound(budget, num_prompt), self.max_slots)

    def attention(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """Attention output ``[tokens, Hq, D]`` for this step's tokens at ``layer``."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("attention() called outside begin_step()/end_step()")
        if not plan.prefills and plan.decode_rows.numel():
            return self._decode_layer(layer, plan, query, key, value)
        out = torch.empty_like(query)
        if plan.decode_rows.numel():
            out[plan.decode_tokens] = self._decode_layer(layer, plan, query, key, value)
        for chunk in plan.prefills:
            tokens = slice(chunk.start, chunk.start + chunk.count)
            out[tokens] = self._prefill_layer(
                chunk, layer, query[tokens], key[tokens], value[tokens]
            )
        return out

    @property
    def in_step(self) -> bool:
        """Whether begin_step() has run and end_step() has not."""
        return self._plan is not None

    def end_step(self) -> None:
        """Step bookkeeping after the last layer: invariants (against the budgets this
        step evicted at), memory accounting, then the next step's budgets."""
        plan, self._plan = self._plan, None
        self.stats.steps += 1
        if plan is not None and plan.evicted:
            self.stats.evictions += int(torch.stack(plan.evicted).sum())
        if self.debug_checks:
            self.check_invariants()
            if self.share_prompt_blocks and plan is not None:
                self._check_sealed_prompts(plan)
        if plan is None:
            return
        held = self._count_held(plan)
        if plan.decode_rows.numel():
            self._reallocate(plan, held[: plan.decode_rows.numel()])

    def _count_held(self, plan: _StepPlan) -> torch.Tensor:
        """Entries each head of the stepped rows holds now ``[n, L, H]`` (decode rows
        first), the one reduction of the occupancy mask per step; records each row's total
        and its peak (for the memory accounting)."""
        prefill_rows = [c.row for c in plan.prefills]
        rows = plan.decode_rows
        if prefill_rows:
            rows = torch.cat([rows, torch.tensor(prefill_rows, device=rows.device)])
        held = self.state.valid[rows].sum(dim=-1)
        total = held.sum(dim=(1, 2))
        self._held[rows] = total
        self._peak[rows] = torch.maximum(self._peak[rows], total)
        return held

    # -- decode -------------------------------------------------------------------------

    def _decode_layer(self, layer, plan, query, key, value) -> torch.Tensor:
        tokens = plan.decode_tokens
        step = DecodeLayer(
            layer=layer,
            rows=plan.decode_rows,
            slots=plan.decode_slots[layer],
            positions=plan.decode_positions,
            budgets=plan.decode_budgets[layer],
            query=query[tokens],
            key=key[tokens],
            value=value[tokens],
            kv_pool=self.kv_pool,
            block_tables=self.tables.block_tables,
            scale=self.scale,
        )
        out, evicted = self.policy.decode_layer(self.state, step)
        plan.evicted.append(evicted)
        return out

    # -- prefill ------------------------------------------------------------------------

    def _prefill_layer(self, chunk: _Chunk, layer, query, key, value) -> torch.Tensor:
        """One prefill chunk at ``layer``: attention of its tokens over the entries the
        request holds and, causally, over each other; then the selection over both (a
        scratch state, warmed with the chunk's last ``obs_window`` queries) down to what
        the budget and the prompt mode keep, written to the request's slots."""
        bs = self.layout.block_size
        width = int(self.tables.num_head_blocks[chunk.row, layer].max()) * bs
        held = self.state.valid[chunk.row, layer, :, :width]  # [H, C]
        held_k = held_v = None
        if bool(held.any()):
            tables = self.tables.block_tables[chunk.row : chunk.row + 1, layer]
            held_k, held_v = (t[0] for t in ops.gather_kv(self.kv_pool, tables, width))
        out = self._chunk_attention(query, key, value, held, held_k, held_v)
        scratch, evicted = self._select_entries(chunk, layer, query, key, held, held_k)
        self.stats.prefill_evictions += evicted
        self._store_entries(chunk.row, layer, width, scratch, key, value)
        return out

    def _chunk_attention(self, query, key, value, held, held_k, held_v) -> torch.Tensor:
        """Output ``[T, Hq, D]`` of the chunk's queries over the held entries and, causally,
        over the chunk itself."""
        count, num_kv_heads, _ = key.shape
        group = query.shape[1] // num_kv_heads
        if held_k is not None:
            same = self._held_alike(held, held_k, held_v)
            if same is not None and query.device.type == "cpu":
                return self._merged_attention(query, key, value, *same)
        k = key.transpose(0, 1)  # [H, T, D]
        v = value.transpose(0, 1)
        mask = None
        if held_k is not None:
            k = torch.cat([held_k.to(k.dtype), k], dim=1)
            v = torch.cat([held_v.to(v.dtype), v], dim=1)
            causal = torch.ones(count, count, dtype=torch.bool, device=key.device).tril()
            mask = torch.cat(
                [held[:, None, :].expand(-1, count, -1), causal.expand(num_kv_heads, -1, -1)],
                dim=-1,
            ).repeat_interleave(group, dim=0)
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
        q = query.transpose(0, 1)
        # 4-d inputs: torch's fused (flash) CPU kernel; 3-d ones take the math path, which
        # materialises T x T scores and was ~30x slower on an 8k prompt.
        out = F.scaled_dot_product_attention(
            q[None],
            k[None],
            v[None],
            attn_mask=None if mask is None else mask[None],
            is_causal=mask is None,
            scale=self.scale,
        )[0]
        return out.transpose(0, 1)

    @staticmethod
    def _held_alike(held, held_k, held_v) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The held K/V ``[H, n, D]`` without holes, when every head holds the same number
        of entries (the common case: uniform budgets, or a kept prompt); else None."""
        counts = held.sum(dim=-1)
        if int(counts.min()) != int(counts.max()):
            return None
        if bool(held.all()):
            return held_k, held_v
        slots = held.nonzero()[:, 1].view(held.shape[0], -1)  # ascending per head
        index = slots[..., None].expand(-1, -1, held_k.shape[-1])
        return held_k.gather(1, index), held_v.gather(1, index)

    def _merged_attention(self, query, key, value, held_k, held_v) -> torch.Tensor:
        """The chunk's attention as two unmasked fused (flash) CPU calls, one over the
        held entries and one causal over the chunk, merged by their log-sum-exps: a mask
        over both would make torch's CPU kernel ~1.8x slower on long prompts."""
        count, num_kv_heads, dim = key.shape
        group = query.shape[1] // num_kv_heads
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        # The group's query heads as extra rows of their KV head: no K/V repeat.
        grouped = query.view(count, num_kv_heads, group, dim).permute(1, 2, 0, 3)
        grouped = grouped.reshape(1, num_kv_heads, group * count, dim)
        out_held, lse_held = flash(
            grouped, held_k.to(query.dtype)[None], held_v.to(query.dtype)[None], scale=self.scale
        )[:2]
        out_held = out_held.reshape(1, num_kv_heads * group, count, dim)
        lse_held = lse_held.reshape(1, num_kv_heads * group, count)
        own_k = key.transpose(0, 1).repeat_interleave(group, dim=0)[None]
        own_v = value.transpose(0, 1).repeat_interleave(group, dim=0)[None]
        q = query.transpose(0, 1)[None]
        out_own, lse_own = flash(q, own_k, own_v, is_causal=True, scale=self.scale)[:2]
        top = torch.maximum(lse_held, lse_own)
        w_held, w_own = (lse_held - top).exp(), (lse_own - top).exp()
        out = out_held.float() * w_held[..., None] + out_own.float() * w_own[..., None]
        out = out / (w_held + w_own)[..., None]
        return out[0].transpose(0, 1).to(query.dtype)

    def _select_entries(self, chunk: _Chunk, layer, query, key, held, held_k):
        """Warm a scratch state over the held entries and the chunk's tokens and evict it
        down to what the request keeps; returns it and the entries it dropped.

        Scratch slots ``0 .. C-1`` are the request's own slots (state copied), ``C ..``
        the chunk's tokens. Tokens below ``num_prompt`` are prompt entries: kept whole
        (``prompt`` ``keep``), first reduced to ``prompt_budget`` per head by the policy's
        own choice (``compress``), or ordinary entries (``evict``). The rest (the outputs
        of a request resumed after preemption) are ordinary entries under the budget.
        """
        policy, device = self.policy, key.device
        count, num_kv_heads, _ = key.shape
        width = held.shape[-1]
        scratch = policy.init_state(1, 1, num_kv_heads, width + count, device)
        for name in scratch.entry_fields():
            getattr(scratch, name)[0, 0, :, :width] = getattr(self.state, name)[
                chunk.row, layer, :, :width
            ]
        scratch.step[0] = chunk.step
        first = torch.zeros(1, dtype=torch.long, device=device)
        new = torch.zeros(1, 1, num_kv_heads, width + count, dtype=torch.bool, device=device)
        new[..., width:] = True
        positions = torch.zeros_like(new, dtype=torch.long)
        positions[..., width:] = torch.arange(chunk.first, chunk.first + count, device=device)
        policy.insert(scratch, first, new, positions, prefill=True)
        prompt_tokens = max(chunk.num_prompt - chunk.first, 0)  # the chunk's prompt tokens
        scratch.prompt[..., width + prompt_tokens :] = False
        window = min(policy.obs_window, count)
        probs = None
        if window:
            probs = self._window_probs(query[-window:], key, count - window, held, held_k)
        # At least one step passes, so that no chunk entry counts as born this step.
        for w in range(max(window, 1)):
            policy.begin_step(scratch, first)
            if probs is not None:
                policy.observe(scratch, first, probs[w][None, None])
        keys = None
        if policy.needs_keys:
            chunk_keys = key.transpose(0, 1).float()
            if held_k is None:
                held_k = torch.zeros(num_kv_heads, width, key.shape[-1], device=device)
            keys = torch.cat([held_k.float(), chunk_keys], dim=1)[None, None]
        evicted = 0
        prompt_held = scratch.valid & scratch.prompt
        if policy.config.prompt == "compress" and bool(
            (prompt_held.sum(-1) > policy.config.prompt_budget).any()
        ):
            # The prompt alone, as ordinary entries, down to prompt_budget per head.
            prompt_only = dataclasses.replace(
                scratch, valid=prompt_held, prompt=torch.zeros_like(scratch.prompt)
            )
            budget = torch.full((1, 1, num_kv_heads), policy.config.prompt_budget, device=device)
            evict = policy.select_evictions(prompt_only, first, budget, keys=keys)
            policy.remove(scratch, first, evict)
            evicted += int(evict.sum())
        budgets = self._keep(self.budgets[chunk.row, layer][None, None])
        evict = policy.select_evictions(scratch, first, budgets, keys=keys)
        policy.remove(scratch, first, evict)
        return scratch, evicted + int(evict.sum())

    def _window_probs(self, queries, key, first_query, held, held_k) -> torch.Tensor:
        """Attention probabilities ``[W, Hq, C + T]`` of the chunk's last queries over the
        held entries and, causally, the chunk's tokens (0 on the other slots)."""
        group = queries.shape[1] // key.shape[1]
        k = key.float()  # [T, H, D]
        width = held.shape[-1]
        if held_k is not None:
            k = torch.cat([held_k.float().transpose(0, 1), k], dim=0)  # [C + T, H, D]
        k = k.repeat_interleave(group, dim=1)
        scores = torch.einsum("whd,thd->wht", queries.float(), k) * self.scale
        query_pos = torch.arange(queries.shape[0], device=key.device) + first_query
        future = torch.arange(key.shape[0], device=key.device)[None, :] > query_pos[:, None]
        hidden = future[:, None, :].expand(-1, scores.shape[1], -1)  # [W, Hq, T]
        if held_k is not None:
            absent = ~held.repeat_interleave(group, dim=0)  # [Hq, C]
            hidden = torch.cat([absent[None].expand(queries.shape[0], -1, -1), hidden], dim=-1)
        probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        if held_k is None:  # nothing held: the request's own slots get no attention
            probs = F.pad(probs, (width, 0))
        return probs

    def _store_entries(self, row, layer, width, scratch, key, value) -> None:
        """Write the selection back: the held entries stay in their slots (evicted ones
        freed, scores updated); the kept chunk tokens take each head's lowest free slots
        within its head-blocks, in position order, K/V and state."""
        for name in scratch.entry_fields():
            getattr(self.state, name)[row, layer, :, :width] = getattr(scratch, name)[
                0, 0, :, :width
            ]
        kept = scratch.valid[0, 0, :, width:]  # [H, T]
        num_kept = kept.sum(dim=-1)
        if bool((num_kept > 0).any()):
            bs = self.layout.block_size
            attached = self.tables.num_head_blocks[row, layer].long() * bs  # [H]
            slot_ids = torch.arange(width, device=key.device)
            free = ~self.state.valid[row, layer, :, :width] & (slot_ids < attached[:, None])
            if bool((free.sum(dim=-1) < num_kept).any()):
                raise RuntimeError("a prefill chunk keeps more entries than its head-blocks hold")
            most = int(num_kept.max())
            # Kept tokens first, in position order (stable sort of the "not kept" flag);
            # free slots likewise, lowest first.
            order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[:, :most]
            holes = torch.sort((~free).to(torch.int8), dim=-1, stable=True).indices[:, :most]
            in_use = torch.arange(most, device=key.device)[None, :] < num_kept[:, None]
            dst = torch.where(in_use, holes, torch.full_like(holes, -1))
            heads = torch.arange(key.shape[1], device=key.device)[:, None]
            k_sel = key[order, heads].transpose(0, 1)  # [most, H, D]
            v_sel = value[order, heads].transpose(0, 1)
            tables = self.tables.block_tables[row : row + 1, layer]
            ops.write_kv(self.kv_pool, tables, dst[None], k_sel[None], v_sel[None])
            h_idx, j = in_use.nonzero(as_tuple=True)
            for name in scratch.entry_fields():
                source = getattr(scratch, name)[0, 0, :, width:]  # [H, T, ...]
                getattr(self.state, name)[row, layer, h_idx, holes[h_idx, j]] = source[
                    h_idx, order[h_idx, j]
                ]
        self.state.step[row] = scratch.step[0]
        # The scratch holds exactly what the layer now holds (in other slots).
        counted = self.policy.counted(scratch, torch.zeros_like(scratch.step))
        self._protected[row, layer] = (scratch.valid & ~counted)[0, 0].sum(dim=-1)

    # -- adaptive budgets (Algorithm 2) ---------------------------------------------------

    def _reallocate(self, plan: _StepPlan, held: torch.Tensor) -> None:
        """Adaptive budgets: the policy's budgets for the next step and its targets
        (Algorithm 2 and the move toward its targets: the next step's evictions carry it
        out), and the head-blocks that no head needs any more back to the row. ``held``:
        the entries each head of the decode rows holds now."""
        if not self.policy.adaptive_budgets:
            return
        rows = plan.decode_rows
        # Entries held outside the budget: the protected prompt (none under `evict`); it
        # never changes after the prefill.
        prompt_held = self._protected[rows]
        counted = held - prompt_held
        layout = self.layout
        change = self.policy.end_step(
            self.state,
            rows,
            self.budgets[rows],
            self.targets[rows],
            # Room for a head's entries (its step's new token included) next to its prompt.
            max_per_head=self.max_slots - prompt_held.flatten(1).amax(dim=1),
            block_size=layout.block_size,
            capacity=self._capacity[rows],
            counts=(counted, prompt_held),
        )
        if change is not None:
            budgets, targets = change
            changed = (targets != self.targets[rows]).flatten(1).any(1)
            self.stats.reallocations += int(changed.sum())
            self.budgets[rows], self.targets[rows] = budgets, targets
        # A head keeps the head-blocks for what it holds in the next step before it evicts
        # (its entries and the new token) and for its next bound; the rest go back to the
        # row. That is checked every step, not only when a budget shrinks: a head empties
        # its last head-block one step after its budget crossed the block boundary, and
        # the head that allocator.fit_growth let grow into that block needs it right then.
        resident = torch.maximum(counted + 1, self.policy.max_resident(self.budgets[rows]))
        keep = -torch.div(-(resident + prompt_held), layout.block_size, rounding_mode="floor")
        surplus = (self.tables.num_head_blocks[rows].long() > keep).flatten(1).any(dim=1)
        if bool(surplus.any()):
            self._compact(rows[surplus], keep[surplus])

    def _compact(self, rows: torch.Tensor, keep_blocks: torch.Tensor) -> None:
        """Move entries out of surplus head-blocks and give those back to the row's pool."""
        plan = self.tables.plan_shrink(rows, self.state.valid, keep_blocks)
        if plan.num_moves == 0:
            return
        ops.move_entries(self.kv_pool, plan.block_tables, plan.src, plan.dst)
        for name in self.state.entry_fields():
            # Stale values left in vacated slots are harmless once `valid` is False there.
            plan.apply(getattr(self.state, name), fill=False if name == "valid" else None)

    # -- checks -------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Debug switch: table consistency and budget bounds after a step."""
        self.tables.check_invariants(self.state.valid)
        if not self._rows:
            return
        req_ids = list(self._rows)
        rows = torch.tensor([self._rows[r] for r in req_ids], device=self.budgets.device)
        held = self.policy.counted(self.state, rows).sum(dim=-1)
        # The next step's token must still fit within the budget's bound.
        bound = torch.as_tensor(self.policy.max_resident(self.budgets[rows]), device=held.device)
        if bool((held + 1 > bound).any()):
            raise AssertionError("a head holds more entries than its budget allows")
        protected = (self.state.valid[rows] & ~self.policy.counted(self.state, rows)).sum(-1)
        if not torch.equal(protected, self._protected[rows]):
            raise AssertionError("the protected prompt counts disagree with the occupancy")
        prompt_held = (self.state.valid[rows] & self.state.prompt[rows]).sum(dim=-1)
        prompt_bound = torch.tensor(
            [self.policy.prompt_kept(self._num_prompt[r]) for r in req_ids], device=held.device
        )
        if self.policy.keeps_prompt and bool((prompt_held > prompt_bound[:, None, None]).any()):
            raise AssertionError("a head holds more prompt entries than its prompt mode allows")

    def _check_sealed_prompts(self, plan: _StepPlan) -> None:
        """Debug switch, with shared prompt blocks: a row's full prompt blocks sit where
        vLLM's layout puts them once its prompt is written, and no later step of any row
        writes into them (their bytes keep the fingerprint taken then)."""
        bs = self.layout.block_size
        for chunk in plan.prefills:
            if chunk.row in self._sealed or chunk.first + chunk.count < chunk.num_prompt:
                continue
            full = chunk.num_prompt // bs
            expected = self.tables.vllm_layout(self.tables.granted[chunk.row, :full].long())
            ids = self.tables.block_tables[chunk.row, :, :, :full].long()
            if not torch.equal(ids, expected):
                raise AssertionError("a full prompt block is not where vLLM's layout puts it")
            self._sealed[chunk.row] = (ids.reshape(-1), self._fingerprint(ids.reshape(-1)))
        for ids, fingerprint in self._sealed.values():
            if not torch.equal(self._fingerprint(ids), fingerprint):
                raise AssertionError("a step wrote into a full prompt block (it may be shared)")

    def _fingerprint(self, head_blocks: torch.Tensor) -> torch.Tensor:
        """Position-weighted byte sums of head-blocks (debug checks only)."""
        data = self.kv_pool[head_blocks].flatten(1).view(torch.uint8).long()
        weights = torch.arange(1, data.shape[-1] + 1, device=data.device)
        return (data * weights).sum(dim=-1)

    def summary(self, *, by_layer: bool = True) -> CacheSummary:
        """The public counters and occupancy (log line, benchmarks, metrics); without
        ``by_layer`` (every step, for the metrics) ``kept_per_layer`` is left empty, which
        keeps the call to a few small reductions."""
        rows = sorted(self._rows.values())
        kept = (
            self.state.valid[rows].sum(dim=-1).float().mean(dim=(0, 2)).round().tolist()
            if rows and by_layer
            else []
        )
        return CacheSummary(
            requests=len(rows),
            steps=self.stats.steps,
            evictions=self.stats.evictions,
            prefill_evictions=self.stats.prefill_evictions,
            reallocations=self.stats.reallocations,
            head_blocks_in_use=self.tables.head_blocks_in_use(),
            head_blocks_capacity=self.layout.num_head_blocks,
            kept_per_layer=[int(k) for k in kept],
            kept_entries=int(self._held.sum()),
            mean_peak_entries=self.stats.peak_entries_sum / max(self.stats.released_requests, 1),
            max_peak_entries=self.stats.peak_entries_max,
            released_requests=self.stats.released_requests,
        )

    def request_ids(self) -> list[str]:
        """Requests that hold rows now."""
        return list(self._rows)

    def rows_of(self, req_ids) -> list[int]:
        """Rows of those of ``req_ids`` that hold one."""
        return [self._rows[r] for r in req_ids if r in self._rows]

    def held_entries(self, req_id: str) -> torch.Tensor:
        """Entries each (layer, KV head) of a request holds now: ``[L, H]``."""
        return self.state.valid[self._rows[req_id]].sum(dim=-1)

    def kept_positions(self, req_id: str, layer: int, head: int) -> list[int]:
        """Logical positions a head holds, sorted (for tests and debugging)."""
        row = self._rows[req_id]
        valid = self.state.valid[row, layer, head]
        return sorted(self.state.position[row, layer, head][valid].tolist())
