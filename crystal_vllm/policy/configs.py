"""Dataclass configs of the policies: algorithm parameters only (budgets come per call).

Defaults and meanings: docs/algorithm.md §9. Every config validates itself in
``__post_init__`` and names the bad value and the allowed range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crystal_vllm.policy.select import GQA_REDUCE_MODES


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_unit(name: str, value: float, *, open_low: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (0.0 < value <= 1.0) if open_low else (0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def _check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_gqa(value: str) -> None:
    if value not in GQA_REDUCE_MODES:
        raise ValueError(f"gqa_reduce must be one of {', '.join(GQA_REDUCE_MODES)}, got {value!r}")


#: How a policy treats the prompt's entries (``prompt``, the same option for every policy):
#: ``keep``: never evicted, not counted against the budget (they come on top of it);
#: ``compress``: reduced once, at prefill, to ``prompt_budget`` entries per head by the
#: policy's own prefill scoring, then kept; ``evict``: ordinary entries under the budget.
PROMPT_MODES = ("keep", "compress", "evict")


#: How ``crystal`` sets new per-head targets (``realloc_rule``, docs/algorithm.md §5).
REALLOC_RULES = ("boundary", "utilisation")


@dataclass
class PolicyConfig:
    """Options every policy has: how the prompt's entries are treated."""

    # compress with 256: a question (GSM8K: ~100-150 tokens) is kept whole, a long prompt
    # is reduced to 256 entries per head, so every request's memory stays bounded.
    prompt: str = "compress"
    prompt_budget: int = 256  # entries per head a prompt keeps under ``compress``

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_MODES:
            raise ValueError(
                f"prompt must be one of {', '.join(PROMPT_MODES)}, got {self.prompt!r}"
            )
        _check_int("prompt_budget", self.prompt_budget, 1)


@dataclass
class FullConfig(PolicyConfig):
    """``full`` has no parameters of its own (it never evicts, whatever ``prompt`` says)."""


@dataclass
class LRFUConfig(PolicyConfig):
    """Attention-LRFU (paper Algorithm 1) with uniform budgets: ``crystal-lite``."""

    top_p: float = 0.9  # hit nucleus
    lam: float = 0.6  # decay base per step: 0 = LRU over hits, 1 = LFU over hits
    gqa_reduce: str = "mean"  # how the query heads of a group are combined
    obs_window: int = 8  # prompt queries replayed as hits after prefill
    # Record hits from the first step (True) or, as the paper's listing does, only once the
    # head holds at least its budget (False; then `observe` needs `budgets=`).
    hits_before_full: bool = True
    # Decode steps per LRFU time unit: `lam` decays once per unit (e.g. 128, the compression
    # round of R-KV's harness the paper's lam sweep comes from), lam ** (1 / time_unit) per
    # step. With 1, lam 0.6 ranks exactly like LRU (docs/algorithm.md §4).
    time_unit: int = 1
    # Entries born in the last `recent_window` decode steps are never evicted (at most a
    # head's budget of them): 1 protects only the step's own token, as the paper does; a
    # wider window keeps the newest reasoning whole while LRFU ranks the older entries.
    recent_window: int = 1
    # Decode steps between a head's evictions: a head over its budget evicts down to
    # `budget - evict_interval + 1`, then refills for `evict_interval - 1` steps, so it
    # compresses once per interval at the same peak (R-KV's cadence; 1 = every step).
    evict_interval: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit("top_p", self.top_p, open_low=True)
        _check_unit("lam", self.lam, open_low=False)
        _check_gqa(self.gqa_reduce)
        _check_int("obs_window", self.obs_window, 0)
        _check_bool("hits_before_full", self.hits_before_full)
        _check_int("time_unit", self.time_unit, 1)
        _check_int("recent_window", self.recent_window, 1)
        _check_int("evict_interval", self.evict_interval, 1)

    @property
    def step_decay(self) -> float:
        """The decay applied per decode step: ``lam ** (1 / time_unit)``."""
        return self.lam ** (1.0 / self.time_unit)


@dataclass
class LRUConfig(LRFUConfig):
    """``lru``: LRFU with ``lam = 0`` (fixed), close to RaaS."""

    lam: float = field(default=0.0, init=False)
    time_unit: int = field(default=1, init=False)


@dataclass
class CrystalConfig(LRFUConfig):
    """``crystal``: LRFU plus the periodic layer/head budget allocator (Algorithm 2)."""

    realloc_interval: int = 64  # decode steps between allocator runs
    floor_ratio: float = 0.2  # every head keeps >= floor_ratio * average budget ...
    min_tokens: int = 16  # ... and >= min_tokens
    # How new targets are set: "boundary" moves `realloc_move` of each layer's budget from
    # the heads with the weakest entries to those whose next victim scores highest;
    # "utilisation" is the paper's Algorithm 2 (shares by S / B, across layers).
    realloc_rule: str = "boundary"
    realloc_move: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("realloc_interval", self.realloc_interval, 1)
        _check_unit("floor_ratio", self.floor_ratio, open_low=False)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.realloc_rule not in REALLOC_RULES:
            raise ValueError(
                f"realloc_rule must be one of {', '.join(REALLOC_RULES)}, got {self.realloc_rule!r}"
            )
        _check_unit("realloc_move", self.realloc_move, open_low=True)


@dataclass
class StreamingConfig(PolicyConfig):
    """StreamingLLM: attention sinks + the most recent entries."""

    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("sinks", self.sinks, 0)


@dataclass
class H2OConfig(PolicyConfig):
    """H2O: cumulative attention heavy hitters (half the budget) + recent entries (half)."""

    gqa_reduce: str = "mean"
    obs_window: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_gqa(self.gqa_reduce)
        _check_int("obs_window", self.obs_window, 0)


@dataclass
class SnapKVConfig(PolicyConfig):
    """SnapKV during decode: every ``buffer`` new entries, keep the observation window plus
    the top entries by max-pooled window attention."""

    gqa_reduce: str = "mean"
    window: int = 8  # observation window (queries) and entries always kept
    kernel: int = 7  # max-pool width over neighbouring positions (odd)
    buffer: int = 128  # entries a head may grow past its budget before compressing

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_gqa(self.gqa_reduce)
        _check_int("window", self.window, 1)
        _check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (centred pooling), got {self.kernel}")
        _check_int("buffer", self.buffer, 1)


@dataclass
class RKVConfig(SnapKVConfig):
    """R-KV: SnapKV's cadence, score ``w * importance - (1 - w) * redundancy``."""

    importance_weight: float = 0.1
    similarity_threshold: float = 0.5  # cosine above which a key counts as a near-duplicate

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit("importance_weight", self.importance_weight, open_low=False)
        value = self.similarity_threshold
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not -1.0 <= value <= 1.0:
            raise ValueError(f"similarity_threshold must be a number in [-1, 1], got {value!r}")


@dataclass
class RandomConfig(PolicyConfig):
    """``random``: uniform random eviction among the evictable entries, seeded."""

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("seed", self.seed, 0)
