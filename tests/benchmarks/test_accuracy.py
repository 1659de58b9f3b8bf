"""The accuracy benchmark: cases, grading, the resumable run log, summaries, a smoke run."""

from __future__ import annotations

import argparse
import json
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.accuracy import (
    Case,
    full_kv_peak,
    group_by_policy,
    main,
    paired_comparison,
    parse_case,
    plot,
    relative_accuracy,
    report,
    run_case,
    run_log_path,
    run_totals,
    server_args,
    summarize,
)
from benchmarks.common.datasets import Problem
from benchmarks.common.grading import grade, is_integer_match
from benchmarks.common.policies import parse_policy_config
from benchmarks.common.runlog import RunLog


def test_parse_case() -> None:
    assert parse_case("none") == Case("none")
    assert parse_case("crystal:128") == Case("crystal", 128)
    assert parse_case("h2o") == Case("h2o")
    assert parse_case("crystal-lite:8").label == "crystal-lite:8"
    named = parse_case("snapkv-buf8=snapkv:64")
    assert named == Case("snapkv", 64, "snapkv-buf8")
    assert (named.series, named.label) == ("snapkv-buf8", "snapkv-buf8:64")
    for bad in ("crystal:0", "crystal:-3", "crystal:x", "none:64", "bogus:64", "x=none", "a=b:4"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad.split(":")[0]):
            parse_case(bad)


def test_parse_policy_config() -> None:
    assert parse_policy_config('{"snapkv-buf8": {"buffer": 8}}') == {"snapkv-buf8": {"buffer": 8}}
    for bad in ("{", '{"snapkv": 8}', "[1]"):
        with pytest.raises(argparse.ArgumentTypeError, match="--policy-config"):
            parse_policy_config(bad)


def test_server_flags_differ_only_in_policy_budget_and_parameters() -> None:
    args = argparse.Namespace(
        max_model_len=None, max_tokens=512, dtype="bfloat16", concurrency=16, server_arg=["-x"]
    )
    none = server_args("none", None, args)
    named = server_args("snapkv", 128, args, {"buffer": 8})
    assert none[: none.index("--kv-policy")] == named[: named.index("--kv-policy")]
    assert "--no-enable-prefix-caching" in none and "--enforce-eager" in none
    assert none[none.index("--max-model-len") + 1] == "1536"
    assert named[named.index("--kv-policy") :] == [
        "--kv-policy",
        "snapkv",
        "--kv-budget",
        "128",
        "--kv-policy-config",
        '{"buffer": 8}',
        "-x",
    ]


@pytest.mark.parametrize(
    ("text", "reference", "integer", "expected"),
    [
        ("The final answer is 336", "336", True, ("336", True)),
        ("The final answer is $336^\\circ$", "336", True, ("336", True)),
        ("\\boxed{070}", "70", True, ("70", True)),
        ("The final answer is 12.5", "12", True, ("12.5", False)),
        ("The final answer is 12.5", "12.5", False, ("12.5", True)),
        ("The final answer is 1,000.", "1000", False, ("1000", True)),
        ("no idea", "5", True, (None, False)),
    ],
)
def test_grade(text: str, reference: str, integer: bool, expected) -> None:
    assert grade(text, reference, integer=integer) == expected


def test_integer_match_rejects_non_integers() -> None:
    assert is_integer_match("18", "18")
    assert not is_integer_match("18.000001", "18")
    assert not is_integer_match(None, "18")
    assert not is_integer_match("17", "18")


def test_run_log_resumes_and_survives_a_cut_line(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "log.jsonl"
    settings = {"max_tokens": 8, "case": "crystal:64"}
    log = RunLog(path, settings)
    log.add({"id": "a", "correct": True})
    log.add({"id": "b", "correct": False})
    with open(path, "a") as f:
        f.write('{"id": "c", "corr')  # a crash mid-write
    again = RunLog(path, settings)
    assert sorted(again.records) == ["a", "b"]
    assert again.done("a") and not again.done("c")
    again.add({"id": "c", "correct": True})
    again.add_run({"wall_s": 2.0, "evictions": 5})
    third = RunLog(path, settings)
    assert sorted(third.records) == ["a", "b", "c"]
    assert third.runs == [{"wall_s": 2.0, "evictions": 5}]
    with pytest.raises(ValueError, match="max_tokens"):
        RunLog(path, {**settings, "max_tokens": 16})
    with pytest.raises(ValueError, match="needs an 'id'"):
        again.add({"correct": True})


def test_summary_and_relative_accuracy() -> None:
    records = [
        {"correct": True, "completion_tokens": 10, "finish_reason": "stop"},
        {"correct": False, "completion_tokens": 30, "finish_reason": "length"},
        {"correct": True, "completion_tokens": 20, "finish_reason": "stop"},
        {"correct": False, "completion_tokens": 40, "finish_reason": "length"},
    ]
    summary = summarize(records)
    assert summary == {
        "problems": 4,
        "correct": 2,
        "accuracy": 0.5,
        "avg_completion_tokens": 25.0,
        "truncated": 2,
    }
    assert math.isnan(summarize([])["accuracy"])
    assert relative_accuracy(0.2, 0.25) == pytest.approx(0.8)
    assert math.isnan(relative_accuracy(0.2, 0.0))
    assert math.isnan(relative_accuracy(0.2, None))
    assert math.isnan(relative_accuracy(math.nan, 0.5))


def test_run_totals_add_up_resumed_invocations() -> None:
    runs = [
        {"problems": 30, "wall_s": 100.0, "evictions": None},
        {"problems": 70, "wall_s": 250.0, "evictions": 4000, "peak_entries": 200.0},
        {"problems": 5, "wall_s": 10.0, "evictions": 200, "peak_entries": 340.0},
    ]
    # The peak is the mean over the case's requests: weighted by each run's problems.
    assert run_totals(runs) == {
        "wall_s": 360.0,
        "evictions": 4200,
        "peak_entries": pytest.approx((70 * 200.0 + 5 * 340.0) / 75),
    }
    assert run_totals(runs[:1]) == {"wall_s": 100.0, "evictions": None, "peak_entries": None}
    empty = run_totals([])
    assert math.isnan(empty["wall_s"]) and empty["evictions"] is None


def test_cases_group_by_policy_and_name_their_logs(tmp_path: Path) -> None:
    cases = [
        Case("none"),
        Case("h2o", 64),
        Case("crystal", 64),
        Case("h2o", 128),
        Case("h2o", 64, "h2o-b"),
    ]
    assert group_by_policy(cases) == {
        "none": [Case("none")],
        "h2o": [Case("h2o", 64), Case("h2o", 128)],
        "crystal": [Case("crystal", 64)],
        "h2o-b": [Case("h2o", 64, "h2o-b")],
    }
    paths = {run_log_path(tmp_path, "gsm8k", "m", c, 512) for c in cases}
    assert len(paths) == len(cases)
    assert run_log_path(tmp_path, "gsm8k", "m", Case("none"), 512) != run_log_path(
        tmp_path, "gsm8k", "m", Case("none"), 256
    )


class _FakeClient:
    """Answers "The final answer is <problem number>" and records what it was sent."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **kwargs):
        with self.lock:
            self.calls.append(kwargs)
        number = kwargs["messages"][1]["content"].split()[1]
        message = SimpleNamespace(content=f"The final answer is {number}")
        return SimpleNamespace(
            choices=[SimpleNamespace(message=message, finish_reason="stop")],
            usage=SimpleNamespace(completion_tokens=5, prompt_tokens=7),
        )


def test_run_case_sends_the_budget_and_skips_finished_problems(tmp_path: Path) -> None:
    problems = [Problem(f"p{i}", f"Problem {i} asks.", str(i if i % 2 else -1)) for i in range(6)]
    args = argparse.Namespace(
        max_tokens=16, temperature=0.0, concurrency=3, dataset="gsm8k", offset=0
    )
    log = RunLog(tmp_path / "log.jsonl", {"case": "h2o:32"})
    client = _FakeClient()
    assert run_case(client, "m", problems[:4], Case("h2o", 32), log, args) == 4
    assert all(c["extra_body"] == {"vllm_xargs": {"kv_budget": 32}} for c in client.calls)
    assert all(c["temperature"] == 0.0 and c["max_tokens"] == 16 for c in client.calls)
    resumed = RunLog(tmp_path / "log.jsonl", {"case": "h2o:32"})
    assert run_case(client, "m", problems, Case("h2o", 32), resumed, args) == 2
    assert len(client.calls) == 6
    rows = [resumed.records[p.id] for p in problems]
    assert [r["correct"] for r in rows] == [i % 2 == 1 for i in range(6)]
    assert summarize(rows)["accuracy"] == 0.5


def test_run_case_stops_on_a_failed_request(tmp_path: Path) -> None:
    class Failing(_FakeClient):
        def _create(self, **kwargs):
            raise ConnectionError("server went away")

    args = argparse.Namespace(
        max_tokens=16, temperature=0.0, concurrency=2, dataset="gsm8k", offset=0
    )
    log = RunLog(tmp_path / "log.jsonl", {})
    with pytest.raises(RuntimeError, match="case none: a request failed"):
        run_case(Failing(), "m", [Problem("p", "Problem 1 x", "1")], Case("none"), log, args)
    assert log.records == {}


@pytest.mark.slow
def test_smoke_serves_tiny_model_and_resumes(tmp_path: Path, capsys) -> None:
    """One server (the largest budget) serves both crystal budgets; a rerun starts none."""
    argv = [
        "--serve",
        "tiny",
        "--limit",
        "2",
        "--max-tokens",
        "6",
        "--concurrency",
        "2",
        "--max-model-len",
        "512",
        "--cases",
        "crystal:16",
        "crystal:8",
        # The prompt counts in the budget, so these tiny budgets must evict.
        "--policy-config",
        '{"crystal": {"prompt": "evict"}}',
        "--run-dir",
        str(tmp_path / "runs"),
        "--log-dir",
        str(tmp_path / "logs"),
        "--results-dir",
        str(tmp_path / "results"),
    ]
    main(argv)
    (result,) = (tmp_path / "results").glob("*_accuracy_gsm8k_tiny.json")
    data = json.loads(result.read_text())
    assert [c["case"] for c in data["cases"]] == ["crystal:16", "crystal:8"]
    for case in data["cases"]:
        assert case["problems"] == 2
        assert case["avg_completion_tokens"] <= 6
        assert math.isnan(case["relative_to_none"])
        assert case["wall_s"] > 0
        assert case["evictions"] > 0  # the prompts outgrow both budgets while decoding
        lines = Path(case["run_log"]).read_text().splitlines()
        assert len([line for line in lines if '"id"' in line]) == 2
    assert data["machine"]["cores_usable"] >= 1
    assert len(list((tmp_path / "logs").glob("server_*.log"))) == 1
    assert list((tmp_path / "results").glob("*_accuracy_gsm8k_tiny.png"))
    capsys.readouterr()
    (tmp_path / "logs" / "server_tiny_crystal.log").unlink()
    main(argv)  # everything is in the run logs: no server starts
    assert "starting vllm serve" not in capsys.readouterr().out
    assert not (tmp_path / "logs" / "server_tiny_crystal.log").exists()


def test_full_kv_peak_is_the_mean_of_prompt_plus_generated_tokens() -> None:
    records = [
        {"prompt_tokens": 60, "completion_tokens": 200},
        {"prompt_tokens": 100, "completion_tokens": 40},
    ]
    assert full_kv_peak(records) == pytest.approx(200.0)
    assert full_kv_peak([{"completion_tokens": 5}]) is None  # older records: no prompt size


def _sign_test_oracle(a: int, b: int) -> float:
    """Two-sided binomial test at 1/2 by its definition: the probability of every split of
    the a + b discordant problems no more likely than the one observed."""
    n = a + b
    pmf = [math.comb(n, k) / 2**n for k in range(n + 1)]
    return min(1.0, sum(q for q in pmf if q <= pmf[a] * (1 + 1e-12)))


@pytest.mark.parametrize("seed", range(6))
def test_paired_comparison_counts_the_discordant_problems_and_matches_the_sign_test(seed):
    import random

    rng = random.Random(seed)
    n = rng.randint(1, 80)
    reference = [rng.random() < 0.4 for _ in range(n)]
    other = [rng.random() < 0.25 for _ in range(n)]
    got = paired_comparison(reference, other)
    a = sum(r and not o for r, o in zip(reference, other, strict=True))
    b = sum(o and not r for r, o in zip(reference, other, strict=True))
    assert (got["only_reference"], got["only_case"]) == (a, b)
    assert got["sign_test_p"] == pytest.approx(_sign_test_oracle(a, b), rel=1e-9)


def test_paired_comparison_edge_cases() -> None:
    assert paired_comparison([True, False], [True, False])["sign_test_p"] == 1.0
    # 49 problems only the reference solved against 6: far from chance
    lopsided = paired_comparison([True] * 49 + [False] * 6, [False] * 49 + [True] * 6)
    assert lopsided["sign_test_p"] < 1e-8
    with pytest.raises(ValueError, match="differ in length"):
        paired_comparison([True], [True, False])


def test_report_shows_the_paired_split_against_the_reference() -> None:
    base = {"problems": 300, "avg_completion_tokens": 270.0, "truncated": 4, "wall_s": 1.0,
            "evictions": None, "peak_entries": 227.0, "relative_to_none": math.nan}  # fmt: skip
    rows = [
        {**base, "case": "crystal:128", "series": "crystal", "policy": "crystal",
         "accuracy": 0.24},
        {**base, "case": "random:128", "series": "random", "policy": "random",
         "accuracy": 0.097, "only_reference": 49, "only_case": 6, "sign_test_p": 1.8e-9},
    ]  # fmt: skip
    settings = {"model": "m", "dataset": "gsm8k", "problems": 300, "servers": "s",
                "paired_with": "crystal:128"}  # fmt: skip
    args = SimpleNamespace(offset=300, max_tokens=512, temperature=0.0, concurrency=64,
                           policy_config={})  # fmt: skip
    markdown = report(rows, settings, args)
    assert "paired with crystal:128" in markdown
    assert "| random:128 | 300 | 0.097 |" in markdown and "| 49 / 6 | 1.8e-09 |" in markdown
    assert markdown.splitlines()[-2].endswith("| n/a | n/a |")  # the reference's own row


def test_an_unknown_paired_case_fails_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--paired-with 'h2o:64' is not a case: none, crystal:64"):
        main(["--base-url", "http://127.0.0.1:9", "--cases", "none", "crystal:64",
              "--paired-with", "h2o:64", "--run-dir", str(tmp_path)])  # fmt: skip


def test_plot_puts_policies_at_their_measured_peak_and_falls_back_to_the_budget() -> None:
    rows = [
        {"policy": "none", "series": "none", "budget": None, "accuracy": 0.28,
         "peak_entries": 379.0},
        {"policy": "snapkv", "series": "snapkv-b64", "budget": 64, "accuracy": 0.2,
         "peak_entries": 227.0},
        {"policy": "crystal", "series": "crystal", "budget": 128, "accuracy": 0.24,
         "peak_entries": 227.0},
    ]  # fmt: skip
    settings = {"model": "m", "dataset": "gsm8k", "problems": 3, "max_tokens": 8,
                "temperature": 0.0}  # fmt: skip
    ax = plot(rows, settings).axes[0]
    assert "peak" in ax.get_xlabel()
    xs = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert xs["snapkv-b64"] == [227.0] and xs["crystal"] == [227.0]
    rows[1]["peak_entries"] = None  # one case without a measured peak: budgets for all
    ax = plot(rows, settings).axes[0]
    assert "budget" in ax.get_xlabel()
    xs = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert xs["snapkv-b64"] == [64] and xs["crystal"] == [128]
