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
