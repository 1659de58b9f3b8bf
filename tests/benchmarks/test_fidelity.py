"""The fidelity benchmark: divergence and KL math, the teacher-forcing processor, a smoke run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.sample.logits_processor import BatchUpdate

from benchmarks.common.policies import parse_policy, policy_notes
from benchmarks.fidelity import (
    FORCE_KEY,
    TeacherForcing,
    coarse_kl,
    divergence_summary,
    first_divergence,
    main,
    summarize_policy,
)


def test_first_divergence() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [9]) == 0
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # stopped early
    assert first_divergence([1, 2], [1, 2, 7]) == 2  # ran on
    assert first_divergence([], []) is None


def test_divergence_summary_counts_identical_at_reference_length() -> None:
    refs = [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [7, 7]]
    outs = [[1, 2, 3, 4], [1, 2, 0], [8, 7]]
    summary = divergence_summary(refs, outs)
    assert summary["identical"] == pytest.approx(1 / 3)
    assert summary["first_divergence_median"] == 2.0  # positions 4, 2, 0
    assert summary["first_divergence_mean"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="as many outputs"):
        divergence_summary(refs, outs[:2])


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum())


def test_coarse_kl_is_exact_when_top_k_covers_all_and_a_lower_bound_otherwise() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.softmax(torch.randn(50, generator=gen, dtype=torch.float64) * 2, 0)
        q = torch.softmax(torch.randn(50, generator=gen, dtype=torch.float64) * 2, 0)
        full = _kl(p, q)
        order = p.argsort(descending=True)
        everything = coarse_kl(p[order].log(), q[order].log())
        assert everything == pytest.approx(full, rel=1e-9)
        top = order[:5]
        partial = coarse_kl(p[top].log(), q[top].log())
        assert 0.0 <= partial <= full + 1e-12
        rest_p, rest_q = 1 - p[top].sum(), 1 - q[top].sum()
        expected = _kl(p[top], q[top]) + float(rest_p * (rest_p / rest_q).log())
        assert partial == pytest.approx(expected, rel=1e-9)
    same = torch.log_softmax(torch.randn(10, generator=gen), 0)
    assert coarse_kl(same[:3], same[:3]) == pytest.approx(0.0, abs=1e-7)


def test_teacher_forcing_forces_the_reference_and_records_raw_statistics() -> None:
    proc = TeacherForcing(None, torch.device("cpu"), False)
    assert not proc.is_argmax_invariant()
    vocab, key = 6, "test/forcing"
    ref_ids = [[2, 0, 1], [4, 3, 0]]
    ref_lps = [[-0.5, -1.5, -2.0], [-0.1, -3.0, -4.0]]
    spec = {"key": key, "tokens": [2, 4], "ref_ids": ref_ids, "ref_logprobs": ref_lps}
    output: list[int] = []
    plain = SimpleNamespace(extra_args=None)
    forced = SimpleNamespace(extra_args={FORCE_KEY: spec})
    TeacherForcing.validate_params(forced)
    with pytest.raises(ValueError, match="lacks"):
        TeacherForcing.validate_params(SimpleNamespace(extra_args={FORCE_KEY: {"key": key}}))
    proc.update_state(BatchUpdate(2, [], [(0, plain, [1], []), (1, forced, [1], output)], []))

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 1.0, 0.0, 2.0, 1.0, 3.0]])
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0])  # a request without teacher forcing is untouched
    assert int(out[1].argmax()) == 2 and torch.isinf(out[1]).sum() == vocab - 1
    agree, logprob, kl = TeacherForcing.records[key][0]
    raw = torch.log_softmax(logits[1], 0)
    assert not agree  # the raw argmax is token 0, not the forced 2
    assert logprob == pytest.approx(float(raw[2]))
    assert kl == pytest.approx(coarse_kl(torch.tensor(ref_lps[0]), raw[ref_ids[0]]))

    output.append(2)  # vLLM appends the sampled token; the next step is step 1
    logits = torch.tensor([[0.0] * vocab, [0.0, 0.0, 0.0, 1.0, 9.0, 0.0]])
    out = proc.apply(logits.clone())
    assert int(out[1].argmax()) == 4
    assert TeacherForcing.records[key][1][0]  # the raw argmax is the reference token

    proc.update_state(BatchUpdate(1, [1], [], []))  # the forced request finished
    assert proc.active == {}


def test_summarize_policy_pools_every_step() -> None:
    references = [
        {"tokens": [5, 6], "ref_ids": [[5, 1], [6, 2]], "ref_logprobs": [[-0.1, -3], [-0.2, -2]]},
        {"tokens": [7], "ref_ids": [[7, 1]], "ref_logprobs": [[-0.3, -4]]},
    ]
    runs = [
        {"free_tokens": [5, 6], "agree": [True, False], "logprob": [-0.1, -1.2], "kl": [0, 0.5]},
        {"free_tokens": [8], "agree": [True], "logprob": [-0.6], "kl": [0.1]},
    ]
    summary = summarize_policy(references, runs)
    assert summary["identical"] == 0.5
    assert summary["steps"] == 3
    assert summary["top1_agreement"] == pytest.approx(2 / 3)
    assert summary["logprob_gap_mean"] == pytest.approx((0.0 + 1.0 + 0.3) / 3)
    assert summary["kl_topk_mean"] == pytest.approx(0.2)


def test_policy_labels_and_notes() -> None:
    assert parse_policy("h2o") == ("h2o", "h2o")
    assert parse_policy("rkv-buf8=rkv") == ("rkv-buf8", "rkv")
    for bad in ("none", "x=none", "bogus"):
        with pytest.raises(argparse.ArgumentTypeError, match="not one to compare"):
            parse_policy(bad)
    notes = policy_notes([("h2o", "h2o"), ("rkv-buf8", "rkv")], {"rkv-buf8": {"buffer": 8}})
    assert notes[0] == "- rkv-buf8: `rkv` with `--kv-policy-config '{\"buffer\": 8}'`"
    assert "budget + `buffer`" in notes[1]
    assert policy_notes([("h2o", "h2o")], {}) == []


@pytest.mark.slow
def test_smoke_full_policy_matches_none_exactly(tmp_path: Path) -> None:
    """``full`` keeps everything, so in float32 it must reproduce ``none`` step for step."""
    main(
        [
            "--model",
            "tiny",
            "--dtype",
            "float32",
            "--num-prompts",
            "2",
            "--max-tokens",
            "6",
            "--max-model-len",
            "512",
            "--policies",
            "full",
            "--budgets",
            "512",
            "--results-dir",
            str(tmp_path),
        ]
    )
    (result,) = tmp_path.glob("*_fidelity_tiny.json")
    (row,) = json.loads(result.read_text())["cases"]
    assert row["policy"] == "full" and row["budget"] == 512
    assert row["identical"] == 1.0
    assert row["top1_agreement"] == 1.0
    assert row["steps"] >= 2
    assert abs(row["logprob_gap_mean"]) < 1e-4
    assert row["kl_topk_mean"] < 1e-5
    assert row["evictions"] == 0
    assert list(tmp_path.glob("*_fidelity_tiny.png"))
