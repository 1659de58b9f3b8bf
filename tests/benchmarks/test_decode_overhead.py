"""benchmarks/decode_overhead.py: argument checks and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from benchmarks import decode_overhead


def test_a_budget_that_would_evict_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"crystal:40: the budget must exceed .* = 40"):
        decode_overhead.main(
            ["--model", "tiny", "--cases", "none", "crystal:40", "--prompt-len", "8",
             "--output-len", "32", "--results-dir", str(tmp_path)]
        )  # fmt: skip


@pytest.mark.slow
def test_tiny_run_times_both_cases_and_writes_results(tmp_path):
    decode_overhead.main(
        ["--model", "tiny", "--cases", "none", "crystal:64", "--num-requests", "2",
         "--prompt-len", "8", "--output-len", "6", "--rounds", "1",
         "--results-dir", str(tmp_path)]
    )  # fmt: skip
    (result,) = tmp_path.glob("*decode_overhead.json")
    record = json.loads(result.read_text())
    runs = {r["case"]: r for r in record["runs"]}
    assert set(runs) == {"none", "crystal:64"}
    assert runs["none"]["cpu_x_none"] == 1.0
    assert runs["crystal:64"]["ops"] in ("cpu", "torch")
    for run in runs.values():
        assert run["decode_steps"] >= 3 and run["step_cpu_ms"] > 0
        assert run["evictions"] == 0
    assert (tmp_path / result.name.replace(".json", ".png")).exists()


def test_at_budget_needs_one_shared_budget(tmp_path):
    with pytest.raises(SystemExit, match=r"one budget, got \[32, 64\]"):
        decode_overhead.main(
            ["--model", "tiny", "--at-budget", "--cases", "none", "crystal:64", "h2o:32",
             "--results-dir", str(tmp_path)]
        )  # fmt: skip


@pytest.mark.slow
def test_at_budget_times_the_evicting_steps_against_none_at_that_context(tmp_path):
    decode_overhead.main(
        ["--model", "tiny", "--at-budget", "--cases", "none", "crystal:8", "--num-requests",
         "2", "--prompt-len", "8", "--output-len", "5", "--rounds", "1",
         "--results-dir", str(tmp_path)]
    )  # fmt: skip
    (result,) = tmp_path.glob("*decode_overhead.json")
    record = json.loads(result.read_text())
    runs = {r["case"]: r for r in record["runs"]}
    assert runs["none"]["evictions"] == 0
    # 8 + 5 generated, the last 5 timed: the policy evicted in every timed step
    assert runs["crystal:8"]["evictions"] > 0
    assert all(run["decode_steps"] == 5 for run in runs.values())
    assert "budget 8" in record["setting"] and "16 prompt" in record["setting"]
