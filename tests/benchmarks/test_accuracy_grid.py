"""The equal-memory grid that merges accuracy runs: settings checks, peak columns, margins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.accuracy_grid import (
    GridError,
    grid_rows,
    load_runs,
    main,
    peak_columns,
    reference_margin,
)

SETTINGS = {
    "dataset": "gsm8k",
    "model": "m",
    "problems": 300,
    "offset": 300,
    "max_tokens": 512,
    "temperature": 0.0,
    "system_prompt": "s",
    "concurrency": 64,
}


def _case(label: str, policy: str, accuracy: float, peak: float | None, **config) -> dict:
    budget = None if policy == "none" else int(label.rsplit(":", 1)[-1])
    return {
        "case": label,
        "series": label.split(":")[0],
        "policy": policy,
        "policy_config": config or None,
        "budget": budget,
        "problems": 300,
        "correct": round(accuracy * 300),
        "accuracy": accuracy,
        "peak_entries": peak,
    }


def _write(path: Path, cases: list[dict], **settings) -> Path:
    path.write_text(json.dumps({"settings": {**SETTINGS, **settings}, "cases": cases}))
    return path


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    first = _write(
        tmp_path / "a.json",
        [
            _case("none", "none", 0.28, 379.2),
            _case("crystal:128", "crystal", 0.24, 227.0),
            _case("streaming:128", "streaming", 0.25, 227.1),
            _case("rkv-b64:64", "rkv", 0.23, 226.0, buffer=64),
        ],
    )
    second = _write(
        tmp_path / "b.json",
        [
            _case("none", "none", 0.28, 379.2),
            _case("crystal:64", "crystal", 0.18, 163.1),
            _case("streaming:64", "streaming", 0.1766, 163.0),
            _case("h2o:64", "h2o", 0.0966, 164.0),
        ],
        concurrency=32,  # not a shared setting: may differ
    )
    return [first, second]


def test_load_runs_merges_each_case_once(two_runs: list[Path]) -> None:
    settings, cases, replaced = load_runs(two_runs)
    assert settings["offset"] == 300
    assert replaced == []  # "none" is in both files with the same records
    labels = [c["case"] for c in cases]
    assert labels.count("none") == 1
    assert set(labels) == {
        "none",
        "crystal:128",
        "streaming:128",
        "rkv-b64:64",
        "crystal:64",
        "streaming:64",
        "h2o:64",
    }


@pytest.mark.parametrize("key, value", [("offset", 0), ("model", "other"), ("max_tokens", 256)])
def test_load_runs_refuses_different_settings(
    two_runs: list[Path], tmp_path: Path, key: str, value: object
) -> None:
    odd = _write(
        tmp_path / "odd.json", [_case("crystal:32", "crystal", 0.1, 130.0)], **{key: value}
    )
    with pytest.raises(GridError, match=f"odd.json has {key}="):
        load_runs([*two_runs, odd])


def test_a_later_run_replaces_a_case_and_says_so(two_runs: list[Path], tmp_path: Path) -> None:
    rerun = _write(tmp_path / "c.json", [_case("crystal:128", "crystal", 0.3, 227.0)])
    _, cases, replaced = load_runs([*two_runs, rerun])
    (crystal,) = [c for c in cases if c["case"] == "crystal:128"]
    assert crystal["accuracy"] == 0.3 and crystal["source"] == "c.json"
    assert replaced == ["crystal:128: 90 correct from c.json replace 72 from a.json"]
    # The same records again replace nothing worth reporting.
    _, _, replaced = load_runs([*two_runs, two_runs[0]])
    assert replaced == []


def test_load_runs_refuses_other_json(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(GridError, match="not an accuracy result"):
        load_runs([path])


def test_peak_columns_group_within_tolerance(two_runs: list[Path]) -> None:
    _, cases, _ = load_runs(two_runs)
    columns = peak_columns(cases, 0.03)
    assert [sorted(c["case"] for c in col) for col in columns] == [
        ["crystal:64", "h2o:64", "streaming:64"],
        ["crystal:128", "rkv-b64:64", "streaming:128"],
    ]
    # A tolerance of zero splits every distinct peak into its own column.
    assert len(peak_columns(cases, 0.0)) == 6


@pytest.mark.parametrize("tolerance", [-0.1, 0.6])
def test_peak_columns_refuse_bad_tolerance(two_runs: list[Path], tolerance: float) -> None:
    _, cases, _ = load_runs(two_runs)
    with pytest.raises(GridError, match=r"must be in \[0, 0.5\]"):
        peak_columns(cases, tolerance)


def test_grid_marks_best_and_reports_margin(two_runs: list[Path]) -> None:
    _, cases, _ = load_runs(two_runs)
    columns = peak_columns(cases, 0.03)
    assert reference_margin(columns[0]) == pytest.approx(0.18 - 0.1766)
    assert reference_margin(columns[1]) == pytest.approx(0.24 - 0.25)
    rows = {row[0]: row[1:] for row in grid_rows(columns)}
    assert rows["crystal"] == ["**0.180**", "0.240"]
    assert rows["streaming"] == ["0.177", "**0.250**"]
    assert rows["rkv"] == ["-", "0.230 (budget 64, buffer 64)"]
    assert rows["crystal - best baseline"] == ["+0.003", "-0.010"]
    assert list(rows)[0] == "crystal"


def test_margin_is_missing_without_both_sides(two_runs: list[Path]) -> None:
    _, cases, _ = load_runs(two_runs)
    only_crystal = [c for c in cases if c["policy"] == "crystal"]
    assert reference_margin(only_crystal) is None
    assert grid_rows(peak_columns(only_crystal, 0.03))[-1][1:] == ["n/a", "n/a"]


def test_main_writes_grid(two_runs: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    main([*map(str, two_runs), "--results-dir", str(out), "--name", "grid"])
    (json_path,) = out.glob("*_grid.json")
    payload = json.loads(json_path.read_text())
    assert [col["cases"][0] for col in payload["columns"]] == ["streaming:64", "rkv-b64:64"]
    assert payload["columns"][1]["reference_margin"] == pytest.approx(-0.01)
    assert payload["replaced"] == []
    assert len(list(out.glob("*_grid.png"))) == 1
    assert "| crystal | **0.180** | 0.240 |" in capsys.readouterr().out


def test_main_exits_with_message_on_mismatch(two_runs: list[Path], tmp_path: Path) -> None:
    odd = _write(tmp_path / "odd.json", [], dataset="aime2025")
    with pytest.raises(SystemExit, match="accuracy_grid: .*dataset='aime2025'"):
        main([*map(str, two_runs), str(odd), "--results-dir", str(tmp_path / "out")])
