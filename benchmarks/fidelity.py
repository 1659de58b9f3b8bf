"""Fidelity of KV policies to full KV: where greedy output diverges, and how far the
next-token distribution moves when the reference tokens are forced.

Meant for models too weak to score on GSM8K (SmolLM2-135M): instead of accuracy it
compares each policy with the same engine running ``--kv-policy none``. The reference is
the ``none`` greedy output for each GSM8K question (chat template, shared system prompt).
For every policy and budget:

(a) free-running greedy generation: the index of the first token that differs from the
    reference (a sequence that stops early or runs on diverges at the shorter length;
    identical outputs count at the reference length), and the fraction identical;
(b) teacher forcing during decode: a logits processor forces the reference token at
    every step, so the policy's cache holds exactly the reference context, and measures
    the model's raw next-token distribution (float32 logits before any processor) there:
    top-1 agreement (argmax == reference token), the log-prob gap
    ``log p_none(ref) - log p_policy(ref)``, and the KL divergence ``KL(none || policy)``
    over the reference's top-k tokens plus one bucket for all other tokens. That KL is
    computed on the policy side over its full vocabulary, but the ``none`` side is known
    only through its top-k raw logprobs (returned by vLLM with
    ``logprobs_mode="raw_logprobs"``), so the KL is of the two distributions coarse-grained
    onto those k+1 outcomes: a lower bound of the full KL.

Each engine (the reference and one per policy, serving all its budgets at the largest
through per-request ``kv_budget``) runs in-process in a fresh subprocess with the same
settings: eager, one dtype, one max-model-len, no prefix caching, no chunked prefill.
A policy may run under a label with its own parameters: ``--policies snapkv-buf8=snapkv
--policy-config '{"snapkv-buf8": {"buffer": 8}}'`` (SnapKV and R-KV compress only once a
head holds ``budget + buffer`` entries, buffer 128 by default).

Example:
    python benchmarks/fidelity.py --model smollm2 --num-prompts 20 --max-tokens 192 \\
        --policies crystal crystal-lite streaming h2o snapkv rkv --budgets 32 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor  # noqa: E402
from vllm.v1.sample.logits_processor.builtin import process_dict_updates  # noqa: E402

from benchmarks.common import cli  # noqa: E402
from benchmarks.common import engine_runs as er  # noqa: E402
from benchmarks.common import policies as pol  # noqa: E402
from benchmarks.common.datasets import load_gsm8k  # noqa: E402
from benchmarks.common.prompts import render_prompt  # noqa: E402
from benchmarks.common.results import record_table  # noqa: E402

#: ``SamplingParams.extra_args`` key that turns teacher forcing on for a request.
FORCE_KEY = "teacher_forcing"


# -- the metrics --------------------------------------------------------------------------


def first_divergence(reference: Sequence[int], output: Sequence[int]) -> int | None:
    """Index of the first token where ``output`` leaves ``reference``; None if identical.

    When one is a prefix of the other, they diverge at the shorter length.
    """
    for i, (a, b) in enumerate(zip(reference, output, strict=False)):
        if a != b:
            return i
    if len(reference) == len(output):
        return None
    return min(len(reference), len(output))


def divergence_summary(
    references: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Fraction identical and median/mean first-divergence index; an identical output
    counts at its reference's length (the divergence, if any, lies beyond it)."""
    if len(references) != len(outputs) or not references:
        raise ValueError(
            f"need as many outputs as references, got {len(outputs)} and "
            f"{len(references)} (at least one)"
        )
    positions, identical = [], 0
    for ref, out in zip(references, outputs, strict=True):
        pos = first_divergence(ref, out)
        identical += pos is None
        positions.append(len(ref) if pos is None else pos)
    return {
        "identical": identical / len(references),
        "first_divergence_median": float(statistics.median(positions)),
        "first_divergence_mean": statistics.fmean(positions),
    }


def coarse_kl(ref_logprobs: torch.Tensor, policy_logprobs: torch.Tensor) -> float:
    """``KL(p || q)`` over k tokens plus one bucket for the rest of the vocabulary.

    Both arguments hold the log-probabilities of the same k tokens (the reference's
    top-k); the rest bucket gets ``1 - sum`` on each side. By the data-processing
    inequality this is at most the KL of the full distributions.
    """
    p = ref_logprobs.double().exp()
    q = policy_logprobs.double().exp()
    p_rest = (1.0 - p.sum()).clamp_min(0.0)
    q_rest = (1.0 - q.sum()).clamp_min(1e-300)
    kl = (p * (ref_logprobs.double() - policy_logprobs.double())).sum()
    if p_rest > 0:
        kl = kl + p_rest * (p_rest.log() - q_rest.log())
    return max(float(kl), 0.0)


# -- teacher forcing inside the engine ----------------------------------------------------


@dataclass
class _Forced:
    key: str
    tokens: list[int]
    ref_ids: torch.Tensor  # [steps, k] the reference's top-k token ids
    ref_logprobs: torch.Tensor  # [steps, k] their reference logprobs
    output: list[int]  # vLLM's running list of this request's output tokens
    steps: dict[int, tuple[bool, float, float]] = field(default_factory=dict)


class TeacherForcing(LogitsProcessor):
    """Forces each request's reference token at every step and records, from the raw
    logits, (argmax == reference, log p(reference), coarse KL to the reference).

    A request opts in with ``extra_args[FORCE_KEY] = {"key", "tokens", "ref_ids",
    "ref_logprobs"}``. Records land in the class attribute :attr:`records` under ``key``,
    which the caller reads after ``generate``: the engine must run in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). It is not argmax-invariant, so vLLM applies it
    to greedy requests too, before penalties and temperature: the logits it sees are the
    raw ones. The step is the number of tokens already generated, so a preempted and
    re-prefilled request resumes where it was.
    """

    records: ClassVar[dict[str, dict[int, tuple[bool, float, float]]]] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(FORCE_KEY)
        if spec is None:
            return
        missing = {"key", "tokens", "ref_ids", "ref_logprobs"} - set(spec)
        if missing:
            raise ValueError(f"{FORCE_KEY} lacks {sorted(missing)}")
        if not len(spec["tokens"]) == len(spec["ref_ids"]) == len(spec["ref_logprobs"]):
            raise ValueError(f"{FORCE_KEY}: tokens, ref_ids and ref_logprobs differ in length")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.active: dict[int, _Forced] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    @classmethod
    def _new_state(cls, params, prompt_ids: list[int] | None, output: list[int]):
        spec = (params.extra_args or {}).get(FORCE_KEY)
        if spec is None:
            return None
        state = _Forced(
            key=spec["key"],
            tokens=list(spec["tokens"]),
            ref_ids=torch.tensor(spec["ref_ids"], dtype=torch.long),
            ref_logprobs=torch.tensor(spec["ref_logprobs"], dtype=torch.float64),
            output=output,
            steps=cls.records.setdefault(spec["key"], {}),
        )
        return state

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.active, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, state in self.active.items():
            step = len(state.output)
            if step >= len(state.tokens):
                continue
            target = state.tokens[step]
            logprobs = torch.log_softmax(logits[index].float(), dim=-1)
            state.steps[step] = (
                int(logprobs.argmax()) == target,
                float(logprobs[target]),
                coarse_kl(state.ref_logprobs[step], logprobs[state.ref_ids[step]]),
            )
            logits[index] = float("-inf")
            logits[index, target] = 0.0
        return logits


# -- one engine, inside a fresh process ---------------------------------------------------


def _engine(spec: dict[str, Any]) -> er.Engine:
    return er.Engine(
        spec,
        logprobs_mode="raw_logprobs",
        max_logprobs=spec["top_k"],
        logits_processors=[TeacherForcing],
    )


def _top_k(step_logprobs: dict[int, Any], k: int) -> tuple[list[int], list[float]]:
    ranked = sorted(
        ((lp.rank, tok, lp.logprob) for tok, lp in step_logprobs.items() if lp.rank <= k)
    )
    return [tok for _, tok, _ in ranked], [lp for _, _, lp in ranked]


def run_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """``none`` greedy outputs with the top-k raw logprobs of every step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _engine(spec).llm
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=spec["top_k"])
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False
    )
    result = []
    for out in outs:
        completion = out.outputs[0]
        tops = [_top_k(step, spec["top_k"]) for step in completion.logprobs]
        result.append(
            {
                "tokens": list(completion.token_ids),
                "ref_ids": [ids for ids, _ in tops],
                "ref_logprobs": [lps for _, lps in tops],
            }
        )
    return {"references": result}


def run_policy(spec: dict[str, Any]) -> dict[str, Any]:
    """Free-running greedy and teacher-forced requests for every prompt and budget."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    references = json.loads(Path(spec["reference_path"]).read_text())
    engine = _engine(spec)
    prompts, params, keys = [], [], []
    for budget in spec["budgets"]:
        for i, (prompt, ref) in enumerate(zip(spec["prompts"], references, strict=True)):
            extra = {"kv_budget": budget}
            prompts += [TokensPrompt(prompt_token_ids=prompt)] * 2
            params.append(
                SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], extra_args=extra)
            )
            key = f"{budget}/{i}"
            force = {"key": key, **{k: ref[k] for k in ("tokens", "ref_ids", "ref_logprobs")}}
            params.append(
                SamplingParams(
                    temperature=0.0,
                    max_tokens=len(ref["tokens"]),
                    logprobs=0,
                    extra_args={**extra, FORCE_KEY: force},
                )
            )
            keys.append(key)
    outs = engine.llm.generate(prompts, params, use_tqdm=False)
    results: dict[str, Any] = {}
    for n, key in enumerate(keys):
        budget, i = key.split("/")
        ref = references[int(i)]
        free, forced = outs[2 * n].outputs[0], outs[2 * n + 1].outputs[0]
        if list(forced.token_ids) != ref["tokens"]:
            raise RuntimeError(f"{key}: teacher forcing did not reproduce the reference tokens")
        steps = TeacherForcing.records[key]
        if sorted(steps) != list(range(len(ref["tokens"]))):
            raise RuntimeError(f"{key}: recorded steps {sorted(steps)} are not 0..T-1")
        # vLLM's own raw logprob of the forced token must match what the processor saw.
        api = [step[tok].logprob for step, tok in zip(forced.logprobs, ref["tokens"], strict=True)]
        seen = [steps[t][1] for t in range(len(ref["tokens"]))]
        worst = max((abs(a - b) for a, b in zip(api, seen, strict=True)), default=0.0)
        if worst > 1e-3:
            raise RuntimeError(f"{key}: processor and raw logprobs differ by {worst:.2e}")
        results.setdefault(budget, []).append(
            {
                "free_tokens": list(free.token_ids),
                "agree": [steps[t][0] for t in range(len(ref["tokens"]))],
                "logprob": seen,
                "kl": [steps[t][2] for t in range(len(ref["tokens"]))],
            }
        )
    return {"per_budget": results, "evictions": engine.evictions()}


# -- the driver ---------------------------------------------------------------------------


def summarize_policy(
    references: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """Divergence of the free runs and the teacher-forced step statistics, pooled over
    every step of every prompt."""
    ref_tokens = [r["tokens"] for r in references]
    summary = divergence_summary(ref_tokens, [run["free_tokens"] for run in runs])
    agree = [a for run in runs for a in run["agree"]]
    gaps = [
        lps[ids.index(tok)] - policy_lp
        for ref, run in zip(references, runs, strict=True)
        for tok, ids, lps, policy_lp in zip(
            ref["tokens"], ref["ref_ids"], ref["ref_logprobs"], run["logprob"], strict=True
        )
    ]
    kls = [kl for run in runs for kl in run["kl"]]
    return {
        **summary,
        "steps": len(agree),
        "top1_agreement": sum(agree) / len(agree),
        "logprob_gap_mean": statistics.fmean(gaps),
        "kl_topk_mean": statistics.fmean(kls),
    }


def run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    return (run_reference if spec["policy"] == "none" else run_policy)(spec)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser(__doc__)
    cli.add_model_arg(parser)
    parser.add_argument(
        "--policies",
        nargs="+",
        type=pol.parse_policy,
        default=[(p, p) for p in ("crystal", "crystal-lite", "streaming", "h2o", "snapkv", "rkv")],
        metavar="[LABEL=]POLICY",
        help=f"policies compared with none, each POLICY or LABEL=POLICY (policies: "
        f"{', '.join(pol.POLICIES[1:])}; default: crystal crystal-lite streaming h2o snapkv rkv)",
    )
    pol.add_policy_config_arg(parser)
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=cli.positive_int,
        default=[32, 64],
        help="KV entries kept per layer and KV head; eviction needs budgets below "
        "prompt + output length (default: 32 64)",
    )
    cli.add_counts(
        parser,
        ("--num-prompts", 20, "GSM8K questions"),
        ("--max-tokens", 192, "new tokens at most"),
        ("--top-k", 20, "reference logprobs per step for the KL"),
    )
    parser.add_argument("--offset", type=int, default=0, help="first question's index (0)")
    parser.add_argument("--dtype", default="float32", help="every engine's dtype (float32: exact)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="every engine's context")
    cli.add_output_args(parser, "fidelity_MODEL", worker=True)
    return parser


def check_labels(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    labels = [label for label, _ in args.policies]
    if len(set(labels)) != len(labels):
        parser.error(f"--policies: a label appears twice in {labels}")
    unknown = sorted(set(args.policy_config) - set(labels))
    if unknown:
        parser.error(f"--policy-config names {unknown}, which --policies lacks ({labels})")


def plot(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> Any:
    panels = (
        ("first_divergence_median", "median first divergent token"),
        ("top1_agreement", "teacher-forced top-1 agreement"),
        ("kl_topk_mean", "mean KL(none || policy), top-k + rest"),
    )
    title = (
        f"{settings['model']} ({settings['dtype']}), {settings['prompts']} GSM8K prompts, "
        f"max {settings['max_tokens']} new tokens: fidelity to none"
    )
    fig, axes = cli.subplots(title, 3, figsize=(14, 4))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        pol.plot_by_budget(ax, rows, "policy", metric)
        ax.set_title(label, fontsize=9)
    axes[1].axhline(1.0, color="black", linestyle="--", label="none")
    axes[0].legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = er.parse_or_work(parser, argv, run_engine)
    check_labels(parser, args)

    from tqdm import tqdm
    from transformers import AutoTokenizer

    fp32 = args.dtype in ("float32", "fp32")
    model = cli.resolve_model(args.model, dtype="float32" if fp32 else "bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = load_gsm8k(limit=args.num_prompts, offset=args.offset)
    prompts = [
        tokenizer(render_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"]
        for p in problems
    ]
    budgets = sorted(set(args.budgets))
    base = {
        "model": str(model),
        "engine": er.engine_settings(args.max_model_len, dtype=args.dtype),
        "max_tokens": args.max_tokens,
        "top_k": args.top_k,
        "prompts": prompts,
        "budgets": budgets,
    }
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB; vLLM's CPU memory check needs it
    script = Path(__file__).resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        ref_path = Path(tmp) / "reference.json"
        bar = tqdm(total=len(args.policies) + 1, desc="engines", unit="engine")
        spec = {**base, "policy": "none", "budget": None}
        references = er.run_worker(script, spec, "none", 1, env)["references"]
        ref_path.write_text(json.dumps(references))
        bar.update()
        for label, policy in args.policies:
            config = args.policy_config.get(label, {})
            spec = {
                **base,
                "policy": policy,
                "budget": budgets[-1],
                "policy_config": config,
                "reference_path": str(ref_path),
            }
            result = er.run_worker(script, spec, label, 1, env)
            for budget, runs in sorted(result["per_budget"].items(), key=lambda kv: int(kv[0])):
                rows.append(
                    {
                        "policy": label,
                        "kv_policy": policy,
                        "policy_config": config,
                        "budget": int(budget),
                        **summarize_policy(references, runs),
                        "evictions": result["evictions"],
                    }
                )
            bar.update()
        bar.close()

    prompt_lens = [len(p) for p in prompts]
    ref_lens = [len(r["tokens"]) for r in references]
    slug = Path(args.model).name  # a bundled name as it is
    settings = {
        "model": slug,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "offset": args.offset,
        "max_tokens": args.max_tokens,
        "top_k": args.top_k,
        "budgets": budgets,
        "prompt_tokens_mean": statistics.fmean(prompt_lens),
        "reference_tokens_mean": statistics.fmean(ref_lens),
        "engine": "in-process LLM, enforce_eager, no prefix caching, no chunked prefill, "
        f"max_model_len {args.max_model_len}, logprobs_mode raw_logprobs, seed 0",
    }
    columns = [
        ("policy", "policy"),
        ("budget", "budget"),
        ("identical", "identical"),
        ("first divergence median", "first_divergence_median"),
        ("first divergence mean", "first_divergence_mean"),
        ("forced steps", "steps"),
        ("top-1 agreement", "top1_agreement"),
        ("log-prob gap", "logprob_gap_mean"),
        (f"KL top-{args.top_k}+rest", "kl_topk_mean"),
        ("evictions", "evictions"),
    ]
    table = record_table(rows, columns)
    markdown = "\n".join(
        [
            f"# Fidelity to full KV: {slug} on GSM8K",
            "",
            f"- model: {slug} ({args.dtype}); {len(prompts)} GSM8K questions (offset "
            f"{args.offset}), chat template; max new tokens {args.max_tokens}; prompt "
            f"{statistics.fmean(prompt_lens):.0f} tokens mean (min {min(prompt_lens)}, max "
            f"{max(prompt_lens)}); reference output {statistics.fmean(ref_lens):.0f} tokens "
            "mean",
            "- reference: the same engine with `--kv-policy none`, greedy; budget = KV "
            "entries kept per (layer, KV head), asked per request",
            "- free run: greedy; first divergence = index of the first token unlike the "
            "reference (identical outputs count at the reference length)",
            "- teacher forcing (during decode, by a logits processor): at every reference "
            "step, top-1 agreement = policy argmax is the reference token; log-prob gap = "
            "mean of log p_none(ref) - log p_policy(ref); KL = mean KL(none || policy) over "
            f"the none side's top-{args.top_k} tokens plus one bucket for the rest (a lower "
            "bound of the full KL), from raw float32 logits",
            "- evictions: the engine's count over all its requests (both budgets, both modes)",
            *pol.policy_notes(args.policies, args.policy_config),
            "",
            table,
        ]
    )
    payload = {"settings": settings, "cases": rows}
    cli.publish(args, f"fidelity_{slug}", payload, markdown, plot(rows, settings))


if __name__ == "__main__":
    main()
