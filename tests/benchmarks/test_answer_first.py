"""Answer-first analysis: stage splitting, labelling, teacher-forced replay, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import answer_first as af
from crystal_vllm.policy import make_policy

PROMPT = 4
THINK = 20
ANSWER = 4
CRYSTAL = (1, 3, 5, 7, 9, 11)  # think indices the answer attends to


def _row(n: int, focus: list[int], focus_mass: float) -> torch.Tensor:
    """A distribution over ``n`` entries: ``focus_mass`` shared by ``focus``, the rest even."""
    p = torch.full((n,), (1.0 - focus_mass) / n if focus else 1.0 / n)
    for i in focus:
        p[i] += focus_mass / len(focus)
    return p


def synthetic_trace(layers: int = 1) -> af.Trace:
    """Two query heads sharing one KV head per layer. In layer 0 every think step and every
    answer step puts most of its attention on the CRYSTAL think tokens that exist so far;
    further layers attend uniformly."""
    decode = []
    for k in range(THINK + ANSWER):
        n = PROMPT + k + 1
        focus = [PROMPT + c for c in CRYSTAL if c <= k]
        per_layer = [_row(n, focus, 0.95 if k >= THINK else 0.9)]
        per_layer += [_row(n, [], 0.0)] * (layers - 1)
        decode.append(torch.stack([torch.stack([p, p]) for p in per_layer]).to(torch.float16))
    prefill = torch.zeros(layers, 2, PROMPT, PROMPT)
    for i in range(PROMPT):
        prefill[:, :, i, : i + 1] = 1.0 / (i + 1)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(layers, 1, PROMPT + THINK + ANSWER, 4, generator=gen)
    return af.Trace(
        prompt_len=PROMPT,
        tokens=list(range(THINK + ANSWER)),
        text="",
        finished=True,
        decode_probs=decode,
        prefill_probs=prefill.to(torch.float16),
        keys=keys.to(torch.float16),
    )


def test_labels_find_the_attended_think_tokens() -> None:
    trace = synthetic_trace()
    labels = af.label_think_tokens(trace, THINK, num_kv_heads=1, fraction=0.3)
    assert labels.crystal.nonzero().flatten().tolist() == list(CRYSTAL)
    assert labels.crystal_head[0, 0].nonzero().flatten().tolist() == list(CRYSTAL)
    assert int(labels.slip.sum()) == len(CRYSTAL)
    assert not (labels.slip & labels.crystal).any()
    with pytest.raises(ValueError, match="answer stage is empty"):
        af.answer_attention(trace, THINK + ANSWER)


def _replay(name: str, budget: int, layers: int = 1, **params: object) -> af.ReplayMetrics:
    """The replay of ``name`` with the prompt counted in the budget unless ``params`` say
    otherwise (``prompt`` ``evict``: these scenarios size budgets against prompt + think)."""
    trace = synthetic_trace(layers)
    labels = af.label_think_tokens(trace, THINK, num_kv_heads=1)
    policy = make_policy(name, {"prompt": "evict", **params})
    (metrics,) = af.replay_policy(policy, trace, THINK, labels, [budget])
    return metrics


def test_replay_full_keeps_everything() -> None:
    m = _replay("full", 8)
    assert m.crystal_recall == m.crystal_recall_head == m.think_kept == 1.0
    assert m.peak_per_head == PROMPT + THINK and m.evictions == 0
    assert m.mass_kept == pytest.approx(1.0, abs=1e-3)
    assert m.answer_mass_kept == pytest.approx(1.0, abs=1e-3)


def test_replay_lrfu_keeps_crystal_and_recency_does_not() -> None:
    lrfu = _replay("crystal-lite", 8)
    assert lrfu.peak_per_head == 8
    assert lrfu.crystal_recall == 1.0 and lrfu.slip_kept == 0.0
    # StreamingLLM keeps the 4 prompt sinks and the 4 newest think tokens: none attended.
    stream = _replay("streaming", 8)
    assert stream.peak_per_head == 8
    assert stream.crystal_recall == 0.0
    assert stream.evictions > 0 and lrfu.evictions > 0
    assert lrfu.answer_mass_kept > stream.answer_mass_kept
    assert lrfu.mass_kept > stream.mass_kept


@pytest.mark.parametrize("name", ["crystal", "lru", "h2o", "snapkv", "rkv"])
def test_replay_metrics_are_bounded(name: str) -> None:
    m = _replay(name, 10)
    for value in (m.crystal_recall, m.slip_kept, m.think_kept, m.mass_kept, m.answer_mass_kept):
        assert 0.0 <= value <= 1.0 + 1e-6
    assert m.peak_per_head <= make_policy(name).max_resident(10)


def test_replay_keeps_the_prompt_on_top_of_the_budget() -> None:
    """``prompt`` ``keep`` (the default): the prompt is held whole, the think stage gets
    the budget."""
    kept = _replay("crystal-lite", 8, prompt="keep")
    assert kept.peak_per_head == PROMPT + 8
    assert _replay("crystal-lite", 8).peak_per_head == 8


def test_replay_crystal_moves_budget_between_layers() -> None:
    """Algorithm 2 runs during the replay: the total is kept, the split becomes uneven."""
    trace = synthetic_trace(layers=2)
    labels = af.label_think_tokens(trace, THINK, num_kv_heads=1)
    params = {
        "realloc_interval": 4,
        "min_tokens": 0,
        "floor_ratio": 0.0,
        "prompt": "evict",
        "realloc_rule": "utilisation",  # the rule that moves budget between layers
    }
    (adaptive,) = af.replay_policy(make_policy("crystal", params), trace, THINK, labels, [8])
    assert adaptive.peak_per_head == 8  # mean over the two layers: the total is unchanged
    lite = make_policy("crystal-lite", {"prompt": "evict"})
    (uniform,) = af.replay_policy(lite, trace, THINK, labels, [8])
    assert adaptive.think_kept != uniform.think_kept


class _CharTokenizer:
    """Token ``i`` decodes to ``chr(i)``, so character and token indices coincide."""

    def decode(self, tokens: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(t) for t in tokens)


def _text_trace(text: str, finished: bool) -> af.Trace:
    return af.Trace(
        len(text), [ord(c) for c in text], text, finished, [], torch.empty(0), torch.empty(0)
    )


@pytest.mark.parametrize(
    ("text", "finished", "expected"),
    [
        ("a\nb\nThe final answer is 5.", False, (4, "final-answer-line")),
        ("a\nThe final answer is 5.\nso FINAL ANSWER is 6", True, (2, "final-answer-line")),
        ("work \\boxed{3}", False, (5, "boxed")),
        ("x\ny\n#### 7", False, (4, "hashes")),
        ("step 1\nstep 2\nso it is 9\n", True, (14, "last-line")),
        ("step 1\nstep 2", False, None),
        ("one line only", True, None),
    ],
)
def test_split_stages(text: str, finished: bool, expected: tuple[int, str] | None) -> None:
    assert af.split_stages(_CharTokenizer(), _text_trace(text, finished), None, 0) == expected


def test_split_prefers_think_end_token_and_falls_back() -> None:
    tok = _CharTokenizer()
    trace = _text_trace("abc#def", False)
    assert af.split_stages(tok, trace, ord("#"), 0) == (4, "think-end-token")
    assert af.split_stages(tok, trace, None, 0) is None
    assert af.split_stages(tok, trace, None, 2) == (5, "last-2-tokens")


def test_cli_rejects_bad_flags() -> None:
    parser = af.build_parser()
    for argv in (["--budgets", "0,0.5"], ["--policies", "nope"], ["--policy-config", "[1]"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    args = parser.parse_args(
        ["--policies", "full,b8=snapkv", "--policy-config", '{"b8": {"window": 4}}']
    )
    assert args.policies == {"full": "full", "b8": "snapkv"}
    assert af.policy_params(args) == {"full": {}, "b8": {"window": 4}}
    defaults = af.policy_params(parser.parse_args([]))
    assert defaults["snapkv-buf8"] == {"buffer": 8} and defaults["snapkv"] == {}


@pytest.mark.slow
def test_end_to_end_on_tiny_model(tmp_path: Path) -> None:
    """Two problems, a few tokens: every stage runs and writes its three files."""
    argv = [
        "--model", "tiny",
        "--limit", "2",
        "--max-new-tokens", "20",
        "--fallback-answer-tokens", "5",
        "--min-think-tokens", "4",
        "--budgets", "0.5,1",
        "--policies", "full,crystal,streaming,b8=snapkv",
        "--policy-config", '{"b8": {"buffer": 8}}',
        "--cache-dir", str(tmp_path / "models"),
        "--results-dir", str(tmp_path / "results"),
    ]  # fmt: skip
    assert af.main(argv) == 0
    (json_path,) = (tmp_path / "results").glob("*_answer_first_tiny.json")
    record = json.loads(json_path.read_text())
    assert record["machine"]["cores_usable"] >= 1
    assert len(record["problems"]) == 2
    analysed = [p for p in record["problems"] if p["metrics"]]
    assert analysed, [p["skipped"] for p in record["problems"]]
    summary = record["summary"]
    assert set(summary) == {"full", "crystal", "streaming", "b8"}
    assert summary["full"]["0.5"]["crystal_recall"] == 1.0
    for by_budget in summary.values():
        for metrics in by_budget.values():
            assert 0.0 <= metrics["crystal_recall"] <= 1.0
    assert json_path.with_suffix(".png").exists()
    assert "Crystal recall" in json_path.with_suffix(".md").read_text()
