"""Answer-first analysis (docs/algorithm.md §10): which policy keeps the KV that the answer needs?

For each GSM8K question this script

1. runs the model with full KV (HF transformers, eager attention, greedy) on a chat prompt
   that asks for reasoning and then a line "The final answer is N", recording the attention
   probabilities of every decode step (per layer and query head, fp16);
2. splits the generation into a think stage and an answer stage: after the think-end token
   if the vocabulary has ``</think>``, else at the start of the final-answer line;
3. scores each think token by the mean attention it receives from answer-stage queries
   (over queries, layers and heads): the top 30% are CrystalKV, the bottom 30% SlipKV
   (per-(layer, KV head) labels are computed too);
4. replays every policy of :mod:`crystal_vllm.policy` over the same token sequence at several
   budgets (fractions of the think length, per KV head), feeding each step the recorded
   attention restricted to the entries the policy still holds and renormalised over them;
5. reports Crystal recall at the end of thinking and the attention mass each policy keeps.

The replay is teacher-forced: with real eviction the model's attention (and its next tokens)
would change. This is the paper's offline analysis, not an accuracy measurement.

Run: ``python -m benchmarks.answer_first --model smollm2 --limit 20`` (``--help`` for flags).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cli  # noqa: E402
from benchmarks.common import policies as pol  # noqa: E402
from benchmarks.common.datasets import Problem, add_dataset_args, load_problems  # noqa: E402
from benchmarks.common.grading import extract_answer, is_correct  # noqa: E402
from benchmarks.common.prompts import FINAL_ANSWER_PREFIX, render_prompt  # noqa: E402
from benchmarks.common.results import markdown_table  # noqa: E402
from crystal_vllm.models import MODEL_NAMES, prepare_model  # noqa: E402
from crystal_vllm.policy import POLICY_NAMES, KVPolicy, make_policy  # noqa: E402

logger = logging.getLogger("benchmarks.answer_first")

#: Largest ``--max-new-tokens``: the recorded attention grows quadratically with it.
MAX_NEW_TOKENS_CAP = 2048
THINK_END_TOKEN = "</think>"
APPROXIMATION_NOTE = (
    "Teacher-forced replay: every policy sees the token sequence and per-step attention of "
    "one full-KV run, restricted to the entries it still holds and renormalised over them. "
    "With real eviction the model's attention and its later tokens would differ."
)


# --------------------------------------------------------------------------- recording


@dataclass
class Trace:
    """One full-KV run of one problem, with everything the replay needs.

    ``decode_probs[k]`` is the attention of the query at position ``prompt_len + k`` (the
    k-th generated token) over positions ``0 .. prompt_len + k``: ``[L, Hq, prompt_len+k+1]``.
    ``prefill_probs`` holds the last ``W`` prompt queries: ``[L, Hq, W, prompt_len]``.
    ``keys`` are the cached keys ``[L, Hkv, N, D]`` (post-RoPE, as the cache holds them).
    """

    prompt_len: int
    tokens: list[int]
    text: str
    finished: bool
    decode_probs: list[torch.Tensor]
    prefill_probs: torch.Tensor
    keys: torch.Tensor


@torch.inference_mode()
def record_trace(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, prefill_rows: int
) -> Trace:
    """Greedy full-KV generation that keeps every decode step's attention probabilities."""
    from transformers import DynamicCache

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    prompt_len = ids.shape[1]
    eos = _stop_ids(model, tokenizer)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_attentions=True)
    w = min(prefill_rows, prompt_len)
    prefill_probs = torch.stack([a[0, :, prompt_len - w :, :] for a in out.attentions])
    prefill_probs = prefill_probs.to(torch.float16)
    tokens: list[int] = []
    probs: list[torch.Tensor] = []
    nxt = int(out.logits[0, -1].argmax())
    finished = False
    while True:
        if nxt in eos:
            finished = True
            break
        if len(tokens) == max_new_tokens:
            break
        tokens.append(nxt)
        # Feeding the token records its own query row; its logits give the next token.
        out = model(
            input_ids=torch.tensor([[nxt]]),
            past_key_values=cache,
            use_cache=True,
            output_attentions=True,
        )
        probs.append(torch.stack([a[0, :, -1, :] for a in out.attentions]).to(torch.float16))
        nxt = int(out.logits[0, -1].argmax())
    keys = torch.stack([layer.keys[0] for layer in cache.layers]).to(torch.float16)
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    return Trace(prompt_len, tokens, text, finished, probs, prefill_probs, keys)


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    stop = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    return stop


# --------------------------------------------------------------------------- stages


def find_answer_start(text: str, finished: bool) -> tuple[int, str] | None:
    """Character index where the answer stage starts, and how it was found.

    The line holding the first "final answer" phrase (else the first ``\\boxed{}`` or
    ``####``) starts the answer stage: from there on the model states, and possibly
    restates, its answer. A run that stopped on its own without any of them is split before
    its last non-empty line. A truncated run without a marker has no answer stage.
    """
    lowered = text.lower()
    markers = (("final answer", "final-answer-line"), ("\\boxed", "boxed"), ("####", "hashes"))
    for marker, method in markers:
        at = lowered.find(marker)
        if at >= 0:
            line_start = text.rfind("\n", 0, at) + 1
            return (line_start if line_start > 0 else at), method
    if not finished:
        return None
    line_start = text.rstrip().rfind("\n") + 1
    if line_start == 0:
        return None
    return line_start, "last-line"


def token_index_at(tokenizer: Any, tokens: Sequence[int], char_index: int) -> int:
    """Index of the first token whose decoded text reaches past ``char_index``."""
    for k in range(len(tokens)):
        if len(tokenizer.decode(tokens[: k + 1], skip_special_tokens=False)) > char_index:
            return k
    return len(tokens)


def split_stages(
    tokenizer: Any, trace: Trace, think_end_id: int | None, fallback_answer_tokens: int
) -> tuple[int, str] | None:
    """Number of think tokens (the answer stage is the rest) and the split method."""
    if think_end_id is not None and think_end_id in trace.tokens:
        return trace.tokens.index(think_end_id) + 1, "think-end-token"
    found = find_answer_start(trace.text, trace.finished)
    if found is not None:
        char_index, method = found
        return token_index_at(tokenizer, trace.tokens, char_index), method
    if 0 < fallback_answer_tokens < len(trace.tokens):
        return len(trace.tokens) - fallback_answer_tokens, f"last-{fallback_answer_tokens}-tokens"
    return None


# --------------------------------------------------------------------------- labels


@dataclass
class Labels:
    """Crystal/Slip masks over the ``a`` think tokens: global ``[a]`` and per head
    ``[L, Hkv, a]``."""

    crystal: torch.Tensor
    slip: torch.Tensor
    crystal_head: torch.Tensor
    slip_head: torch.Tensor


def answer_attention(trace: Trace, think_len: int) -> torch.Tensor:
    """Mean attention of answer-stage queries to each think token: ``[L, Hq, a]``."""
    p0 = trace.prompt_len
    rows = trace.decode_probs[think_len:]
    if not rows:
        raise ValueError("the answer stage is empty")
    total = torch.zeros(rows[0].shape[:2] + (think_len,), dtype=torch.float32)
    for row in rows:
        total += row[:, :, p0 : p0 + think_len].float()
    return total / len(rows)


def _extremes(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the ``count`` highest and ``count`` lowest scores along the last dim."""
    top = torch.zeros_like(scores, dtype=torch.bool)
    low = torch.zeros_like(scores, dtype=torch.bool)
    top.scatter_(-1, scores.topk(count, dim=-1).indices, True)
    low.scatter_(-1, scores.topk(count, dim=-1, largest=False).indices, True)
    return top, low


def label_think_tokens(
    trace: Trace, think_len: int, num_kv_heads: int, fraction: float = 0.3
) -> Labels:
    """CrystalKV = top ``fraction`` of think tokens by answer attention, SlipKV = bottom."""
    attn = answer_attention(trace, think_len)  # [L, Hq, a]
    count = max(1, round(fraction * think_len))
    scores = attn.mean((0, 1))
    crystal, slip = _extremes(scores, count)
    per_head = attn.unflatten(1, (num_kv_heads, -1)).mean(2)  # [L, Hkv, a]
    crystal_head, slip_head = _extremes(per_head, count)
    return Labels(crystal, slip, crystal_head, slip_head)


# --------------------------------------------------------------------------- replay


@dataclass
class ReplayMetrics:
    """What one policy did at one budget on one problem (means over layers and KV heads)."""

    budget: int
    crystal_recall: float
    crystal_recall_head: float
    slip_kept: float
    think_kept: float
    peak_per_head: float
    mass_kept: float
    answer_mass_kept: float
    evictions: int


def _masked_probs(row: torch.Tensor, held_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Recorded probabilities restricted to held entries and renormalised, plus the mass
    the held entries had: ``row [L, Hq, S]`` and ``held_q [R, L, Hq, S]``."""
    p = row.float().unsqueeze(0) * held_q
    mass = p.sum(-1, keepdim=True)
    return p / mass.clamp_min(torch.finfo(torch.float32).tiny), mass.squeeze(-1)


def replay_policy(
    policy: KVPolicy,
    trace: Trace,
    think_len: int,
    labels: Labels,
    budgets: Sequence[int],
) -> list[ReplayMetrics]:
    """Replay ``policy`` over the think stage once per budget (budgets are state rows).

    Slot ``i`` holds position ``i`` (no slot reuse: the replay never runs out of slots).
    After every step the policy's own end-of-step hook (the one the server runtime calls)
    may change the next step's budgets, e.g. Algorithm 2 for ``crystal`` and the move
    toward its targets, in the server's order.
    """
    num_layers, num_q_heads = trace.decode_probs[0].shape[:2]
    num_kv_heads = trace.keys.shape[1]
    group = num_q_heads // num_kv_heads
    p0 = trace.prompt_len
    slots = p0 + think_len
    r = len(budgets)
    rows = torch.arange(r)
    state = policy.init_state(r, num_layers, num_kv_heads, slots)
    budget_t = torch.tensor(budgets, dtype=torch.int64).view(r, 1, 1)
    budget_t = budget_t.expand(r, num_layers, num_kv_heads).clone()
    target_t = budget_t.clone()
    keys = None
    if policy.needs_keys:
        keys = trace.keys[:, :, :slots].float().unsqueeze(0).expand(r, -1, -1, -1, -1)
    positions = torch.arange(slots).expand(r, num_layers, num_kv_heads, slots)
    evictions = torch.zeros(r, dtype=torch.int64)

    def evict() -> None:
        keep = policy.keep_between_steps(budget_t)
        victims = policy.select_evictions(state, rows, keep, keys=keys)
        evictions.add_(victims.sum((1, 2, 3)))
        policy.remove(state, rows, victims)

    def held_q() -> torch.Tensor:
        return state.valid.repeat_interleave(group, dim=2).float()

    new = torch.zeros(r, num_layers, num_kv_heads, slots, dtype=torch.bool)
    new[..., :p0] = True
    policy.insert(state, rows, new, positions, prefill=True)
    w = min(policy.obs_window, trace.prefill_probs.shape[2])
    for i in range(trace.prefill_probs.shape[2] - w, trace.prefill_probs.shape[2]):
        policy.begin_step(state, rows)
        row = F.pad(trace.prefill_probs[:, :, i], (0, slots - p0))
        policy.observe(state, rows, _masked_probs(row, held_q())[0], budgets=budget_t)
    evict()

    def held_mean() -> torch.Tensor:
        return state.valid.sum(-1).float().mean((1, 2))

    # The most entries a head holds at once (mean over heads): after the prefill's
    # selection (the server writes only the kept entries), then each step's new token on
    # top of what the head kept.
    peak = held_mean()
    mass_sum = torch.zeros(r, dtype=torch.float64)
    for k in range(think_len):
        policy.begin_step(state, rows)
        new = positions == p0 + k
        policy.insert(state, rows, new, positions)
        peak = torch.maximum(peak, held_mean())
        row = F.pad(trace.decode_probs[k], (0, slots - (p0 + k + 1)))
        probs, mass = _masked_probs(row, held_q())
        mass_sum += mass.mean((1, 2)).double()
        policy.observe(state, rows, probs, budgets=budget_t)
        evict()
        # As the server: the step evicts at its budgets, then the policy's end-of-step
        # hook may set those of the next step.
        change = policy.end_step(state, rows, budget_t, target_t, max_per_head=slots)
        if change is not None:
            budget_t, target_t = change

    held = state.valid[..., p0:slots]  # [R, L, Hkv, a]
    crystal, slip = labels.crystal, labels.slip
    answer_mass = _answer_mass_kept(trace, think_len, state.valid, group)
    return [
        ReplayMetrics(
            budget=int(budgets[i]),
            crystal_recall=_mean_fraction(held[i], crystal),
            crystal_recall_head=_mean_fraction(held[i], labels.crystal_head),
            slip_kept=_mean_fraction(held[i], slip),
            think_kept=held[i].float().mean().item(),
            peak_per_head=peak[i].item(),
            mass_kept=(mass_sum[i] / max(think_len, 1)).item(),
            answer_mass_kept=answer_mass[i].item(),
            evictions=int(evictions[i]),
        )
        for i in range(r)
    ]


def _mean_fraction(held: torch.Tensor, label: torch.Tensor) -> float:
    """Mean over heads of the share of ``label`` entries that ``held [L, H, a]`` keeps."""
    label = label.expand_as(held)
    return ((held & label).sum(-1).float() / label.sum(-1).clamp_min(1)).mean().item()


def _answer_mass_kept(
    trace: Trace, think_len: int, valid: torch.Tensor, group: int
) -> torch.Tensor:
    """Mean attention mass that answer-stage queries put on what a policy holds once
    thinking ends (answer tokens are always held): ``[R]``."""
    p0 = trace.prompt_len
    held = valid.repeat_interleave(group, dim=2).float()  # [R, L, Hq, p0 + a]
    total = torch.zeros(valid.shape[0], dtype=torch.float64)
    rows = trace.decode_probs[think_len:]
    for row in rows:
        kept = (row[:, :, : p0 + think_len].float().unsqueeze(0) * held).sum(-1)
        kept += row[:, :, p0 + think_len :].float().sum(-1).unsqueeze(0)
        total += kept.mean((1, 2)).double()
    return total / max(len(rows), 1)


# --------------------------------------------------------------------------- driver


@dataclass
class ProblemRecord:
    id: str
    reference: str
    predicted: str | None
    correct: bool
    prompt_len: int
    generated: int
    finished: bool
    think_len: int | None = None
    split: str | None = None
    skipped: str | None = None
    seconds: float = 0.0
    text: str = ""
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _parse_fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"budgets must be comma-separated numbers: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be fractions in (0, 1], got {text!r}")
    return sorted(set(values))


#: Extra rows replayed by default: SnapKV and R-KV compress only once a head holds
#: ``budget + buffer`` entries (buffer 128), which at the small budgets of this analysis
#: lets them hold up to twice the budget. These variants (buffer 8) stay near the budget.
DEFAULT_VARIANTS = {"snapkv-buf8": ("snapkv", {"buffer": 8}), "rkv-buf8": ("rkv", {"buffer": 8})}
DEFAULT_POLICIES = (*POLICY_NAMES, *(f"{k}={v[0]}" for k, v in DEFAULT_VARIANTS.items()))


def _parse_policies(text: str) -> dict[str, str]:
    """``label=policy`` or ``policy`` entries -> ``{label: policy}``."""
    out: dict[str, str] = {}
    for label, name in map(pol.parse_policy, filter(None, map(str.strip, text.split(",")))):
        if label in out:
            raise argparse.ArgumentTypeError(f"policy label {label!r} given twice")
        out[label] = name
    if not out:
        raise argparse.ArgumentTypeError("--policies is empty")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.answer_first",
        description=(
            "Answer-first analysis (docs/algorithm.md §10): label think tokens CrystalKV/SlipKV by "
            "the attention of answer-stage queries in a full-KV run, then replay every KV "
            "policy with teacher forcing and report Crystal recall at the end of thinking "
            "and the attention mass each policy keeps."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=MODEL_NAMES, default="smollm2", help="model to run")
    add_dataset_args(parser, limit=20)
    parser.add_argument(
        "--max-new-tokens",
        type=cli.positive_int,
        default=320,
        help=f"generation cap per problem (at most {MAX_NEW_TOKENS_CAP}: the recorded "
        "attention grows quadratically with it)",
    )
    parser.add_argument(
        "--budgets",
        type=_parse_fractions,
        default=[0.25, 0.5, 0.75],
        help="comma-separated KV budgets per head, as fractions of each problem's think length",
    )
    parser.add_argument(
        "--policies",
        type=_parse_policies,
        default=",".join(DEFAULT_POLICIES),
        help="comma-separated policies to replay; `label=policy` adds a variant whose "
        "parameters --policy-config sets under `label`",
    )
    parser.add_argument(
        "--policy-config",
        type=pol.parse_policy_config,
        default="{}",
        help="JSON object of parameters per policy label (merged over the defaults of the "
        "built-in variants: " + ", ".join(f"{k} {v[1]}" for k, v in DEFAULT_VARIANTS.items()) + ")",
    )
    parser.add_argument(
        "--crystal-fraction", type=float, default=0.3, help="share labelled CrystalKV / SlipKV"
    )
    parser.add_argument(
        "--min-think-tokens", type=cli.positive_int, default=16, help="skip shorter think stages"
    )
    parser.add_argument(
        "--fallback-answer-tokens",
        type=int,
        default=0,
        help="when no answer marker is found, treat the last N tokens as the answer stage "
        "(0: skip such problems)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="float32",
        help="model dtype (float32: exact probabilities, and no slower than bfloat16 for "
        "eager attention on the CPUs measured)",
    )
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache directory")
    cli.add_output_args(parser, "answer_first_MODEL")
    return parser


def _validate(args: argparse.Namespace) -> None:
    if args.max_new_tokens > MAX_NEW_TOKENS_CAP:
        raise SystemExit(
            f"--max-new-tokens must be <= {MAX_NEW_TOKENS_CAP}, got {args.max_new_tokens}"
        )
    if not 0.0 < args.crystal_fraction <= 0.5:
        raise SystemExit(f"--crystal-fraction must be in (0, 0.5], got {args.crystal_fraction}")
    if args.offset < 0 or args.fallback_answer_tokens < 0:
        raise SystemExit("--offset and --fallback-answer-tokens must be >= 0")
    for label in args.policy_config:
        if label not in args.policies:
            raise SystemExit(f"--policy-config names {label!r}, which is not in --policies")


def policy_params(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Parameters of every policy label: built-in variant defaults, then --policy-config."""
    out = {}
    for label in args.policies:
        params = dict(DEFAULT_VARIANTS[label][1]) if label in DEFAULT_VARIANTS else {}
        params.update(args.policy_config.get(label, {}))
        out[label] = params
    return out


def analyse_problem(
    problem: Problem,
    model: Any,
    tokenizer: Any,
    policies: dict[str, KVPolicy],
    args: argparse.Namespace,
    think_end_id: int | None,
) -> ProblemRecord:
    """Record, split, label and replay one problem."""
    start = time.perf_counter()
    prompt = render_prompt(tokenizer, problem.question)
    prefill_rows = max([p.obs_window for p in policies.values()] + [1])
    trace = record_trace(model, tokenizer, prompt, args.max_new_tokens, prefill_rows)
    record = ProblemRecord(
        id=problem.id,
        reference=problem.answer,
        predicted=None,
        correct=False,
        prompt_len=trace.prompt_len,
        generated=len(trace.tokens),
        finished=trace.finished,
        text=trace.text,
    )
    split = split_stages(tokenizer, trace, think_end_id, args.fallback_answer_tokens)
    answer_text = trace.text
    if split is None:
        record.skipped = "no answer stage (truncated without a final-answer line)"
    else:
        think_len, record.split = split
        record.think_len = think_len
        answer_text = tokenizer.decode(trace.tokens[think_len:], skip_special_tokens=True)
        if think_len < args.min_think_tokens:
            record.skipped = f"think stage shorter than {args.min_think_tokens} tokens"
        elif think_len >= len(trace.tokens):
            record.skipped = "empty answer stage"
    record.predicted = extract_answer(answer_text)
    record.correct = is_correct(record.predicted, problem.answer)
    if record.skipped is None:
        num_kv_heads = trace.keys.shape[1]
        labels = label_think_tokens(trace, think_len, num_kv_heads, args.crystal_fraction)
        budgets = [max(1, round(f * think_len)) for f in args.budgets]
        for name, policy in policies.items():
            results = replay_policy(policy, trace, think_len, labels, budgets)
            record.metrics[name] = [asdict(m) for m in results]
    record.seconds = time.perf_counter() - start
    return record


METRICS = (
    ("crystal_recall", "Crystal recall"),
    ("crystal_recall_head", "Crystal recall (per-head labels)"),
    ("slip_kept", "SlipKV kept"),
    ("think_kept", "think entries kept"),
    ("peak_per_head", "peak entries per head"),
    ("mass_kept", "attention mass kept / step"),
    ("answer_mass_kept", "answer attention mass kept"),
)


def aggregate(
    records: list[ProblemRecord], policies: Sequence[str], fractions: Sequence[float]
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean of every metric over analysed problems: ``[policy][fraction][metric]``."""
    done = [r for r in records if r.metrics]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in policies:
        out[name] = {}
        for i, frac in enumerate(fractions):
            values = {key: [r.metrics[name][i][key] for r in done] for key, _ in METRICS}
            out[name][f"{frac:g}"] = {
                k: (sum(v) / len(v) if v else math.nan) for k, v in values.items()
            }
    return out


def render_markdown(
    args: argparse.Namespace,
    records: list[ProblemRecord],
    summary: dict[str, dict[str, dict[str, float]]],
    model_info: dict[str, Any],
) -> str:
    done = [r for r in records if r.metrics]
    fractions = [f"{f:g}" for f in args.budgets]
    params = policy_params(args)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    lines = [
        f"# Answer-first analysis: {args.model} on {args.dataset}",
        "",
        f"- model: {args.model} ({model_info['layers']} layers, {model_info['q_heads']} query "
        f"/ {model_info['kv_heads']} KV heads), dtype {args.dtype}, greedy, eager attention",
        f"- problems: {len(records)} run (offset {args.offset}), {len(done)} analysed, "
        f"{len(records) - len(done)} skipped; accuracy {sum(r.correct for r in records)}"
        f"/{len(records)}",
        f"- max new tokens {args.max_new_tokens}; mean prompt "
        f"{mean([r.prompt_len for r in done]):.0f}, think {mean([r.think_len for r in done]):.0f}"
        f", answer {mean([r.generated - r.think_len for r in done]):.1f} tokens (analysed)",
        f"- labels: top/bottom {args.crystal_fraction:.0%} of think tokens by mean "
        "answer-stage attention (over queries, layers, heads) = CrystalKV / SlipKV",
        "- budget: tokens per KV head = fraction x think length; prompt entries count "
        "against it only under `prompt` `evict` (the default `compress` keeps a prompt of up "
        "to 256 tokens on top of it: compare policies by peak entries per head); `crystal` "
        "reallocates across layers/heads every realloc_interval steps",
        "- policies: "
        + ", ".join(
            f"{label}" + (f" ({name}, {params[label]})" if params[label] else "")
            for label, name in args.policies.items()
        ),
        f"- split methods: {_counts(r.split for r in done)}",
        f"- {APPROXIMATION_NOTE}",
        "",
        "## Crystal recall at the end of thinking (mean over problems, layers and KV heads)",
        "",
        markdown_table(
            ["policy", *[f"B = {f} x think" for f in fractions]],
            [[p, *[summary[p][f]["crystal_recall"] for f in fractions]] for p in summary],
        ),
        "## Attention mass kept per think step (mean)",
        "",
        markdown_table(
            ["policy", *[f"B = {f} x think" for f in fractions]],
            [[p, *[summary[p][f]["mass_kept"] for f in fractions]] for p in summary],
        ),
        "## All metrics",
        "",
        "SlipKV kept: share of SlipKV still held (lower is better at equal think kept). Think "
        "entries kept: chance level of recall. Peak entries per head: the most a head held at "
        "once (the step's new token included), prompt entries included; snapkv/rkv peak at "
        "budget + buffer.",
        "",
        markdown_table(
            ["policy", "budget", *[label for _, label in METRICS]],
            [
                [p, f, *[summary[p][f][key] for key, _ in METRICS]]
                for p in summary
                for f in fractions
            ],
        ),
    ]
    skipped = [r for r in records if r.skipped]
    if skipped:
        lines += ["## Skipped", "", *[f"- {r.id}: {r.skipped}" for r in skipped], ""]
    return "\n".join(lines)


def _counts(items: Any) -> str:
    counts = sorted(Counter(map(str, items)).items())
    return ", ".join(f"{k} {v}" for k, v in counts) or "none"


def plot(args: argparse.Namespace, summary: dict[str, dict[str, dict[str, float]]]) -> Any:
    title = f"Answer-first replay, {args.model}, {args.dataset} (teacher-forced)"
    fig, axes = cli.subplots(title, 2, figsize=(10, 4))
    xs = list(args.budgets)
    for name, by_frac in summary.items():
        for ax, key in zip(axes, ("crystal_recall", "mass_kept"), strict=True):
            ax.plot(xs, [by_frac[f"{x:g}"][key] for x in xs], marker="o", label=name)
    axes[0].set_ylabel("Crystal recall at end of thinking")
    axes[1].set_ylabel("attention mass kept per step")
    for ax in axes:
        ax.set_xlabel("budget per KV head / think length")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    torch.set_num_threads(args.threads)
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, args.dtype), attn_implementation="eager"
    ).eval()
    cfg = model.config
    model_info = {
        "path": str(path),
        "layers": cfg.num_hidden_layers,
        "q_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
    }
    vocab = tokenizer.get_vocab()
    think_end_id = vocab.get(THINK_END_TOKEN)
    params = policy_params(args)
    policies = {label: make_policy(name, params[label]) for label, name in args.policies.items()}
    problems = load_problems(args)

    records: list[ProblemRecord] = []
    bar = tqdm(problems, desc=f"answer-first {args.model}", unit="problem")
    for problem in bar:
        record = analyse_problem(problem, model, tokenizer, policies, args, think_end_id)
        records.append(record)
        bar.set_postfix(analysed=sum(bool(r.metrics) for r in records))
        logger.info(
            "%s: %d prompt + %d generated tokens, think %s (%s), answer %s (ref %s)%s, %.0f s",
            record.id,
            record.prompt_len,
            record.generated,
            record.think_len,
            record.split,
            record.predicted,
            record.reference,
            f", skipped: {record.skipped}" if record.skipped else "",
            record.seconds,
        )

    summary = aggregate(records, list(policies), args.budgets)
    markdown = render_markdown(args, records, summary, model_info)
    payload = {
        "config": vars(args),  # paths are written as strings
        "model": model_info,
        "final_answer_prefix": FINAL_ANSWER_PREFIX,
        "think_end_token_id": think_end_id,
        "policies": {label: p.name for label, p in policies.items()},
        "policy_params": {label: asdict(p.config) for label, p in policies.items()},
        "approximation": APPROXIMATION_NOTE,
        "summary": summary,
        "problems": [asdict(r) for r in records],
    }
    cli.publish(args, f"answer_first_{args.model}", payload, markdown, plot(args, summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
