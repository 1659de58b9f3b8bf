"""Merge accuracy runs into one equal-memory grid: policies against measured peak KV memory.

Each ``benchmarks/accuracy.py`` run compares a few cases at one memory point. This
script reads the result JSON of several such runs (same model, dataset, problems and
generation settings; it refuses files that differ; a case in several files is taken
from the last), groups the policy cases whose measured peak KV entries per (layer, KV
head) agree within ``--peak-tolerance``, and writes one table (a row per policy, a column
per peak, the best case of each column in bold, and crystal's margin over the best
baseline) and one plot (accuracy against the measured peak, a line per policy, full KV
as a dashed line).

    python benchmarks/accuracy_grid.py benchmarks/results/*_accuracy_gsm8k300-599_*.json \\
        --name accuracy_grid_gsm8k300-599_qwen0.5b
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import plot  # noqa: E402
from benchmarks.common import cli  # noqa: E402
from benchmarks.common.results import markdown_table  # noqa: E402

# Settings that must agree for two runs' accuracies to be comparable.
SHARED_SETTINGS = (
    "dataset",
    "model",
    "problems",
    "offset",
    "max_tokens",
    "temperature",
    "system_prompt",
)
# The policy whose margin over the best baseline the table reports.
REFERENCE_POLICY = "crystal"


class GridError(ValueError):
    """Result files that cannot be merged (different settings, not accuracy results)."""


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser(__doc__)
    parser.add_argument(
        "results",
        nargs="+",
        type=Path,
        help="result JSON files written by benchmarks/accuracy.py",
    )
    parser.add_argument(
        "--peak-tolerance",
        type=float,
        default=0.03,
        help="cases whose measured peaks differ by at most this fraction share a column "
        "(default 0.03, in [0, 0.5])",
    )
    cli.add_output_args(parser, "accuracy_grid")
    return parser


def load_runs(
    paths: Sequence[Path],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """The shared settings, the cases of every file (each label once) and a line for each
    case a later file replaced.

    A label found in several files is taken from the last one that has it (a rerun, e.g.
    after a fix, is listed after the run it supersedes); when the two differ in correct
    answers the replacement is reported, so a table never mixes them silently.
    """
    settings: dict[str, Any] | None = None
    first_file: Path | None = None
    cases: dict[str, dict[str, Any]] = {}
    replaced: list[str] = []
    for path in paths:
        data = json.loads(path.read_text())
        if "settings" not in data or "cases" not in data:
            raise GridError(f"{path} is not an accuracy result (no 'settings' or 'cases')")
        mine = {key: data["settings"].get(key) for key in SHARED_SETTINGS}
        if settings is None:
            settings, first_file = mine, path
        for key in SHARED_SETTINGS:
            if mine[key] != settings[key]:
                raise GridError(
                    f"{path} has {key}={mine[key]!r} but {first_file} has "
                    f"{key}={settings[key]!r}: only runs of the same settings can share a grid"
                )
        for case in data["cases"]:
            seen = cases.get(case["case"])
            if seen is not None and seen["correct"] != case["correct"]:
                replaced.append(
                    f"{case['case']}: {case['correct']} correct from {path.name} replace "
                    f"{seen['correct']} from {seen['source']}"
                )
            cases[case["case"]] = {**case, "source": path.name}
    assert settings is not None  # argparse requires at least one file
    return settings, list(cases.values()), replaced


def peak_columns(cases: Sequence[dict[str, Any]], tolerance: float) -> list[list[dict[str, Any]]]:
    """Policy cases (not ``none``) grouped by measured peak: sorted by peak, a case joins
    the current column while its peak is within ``tolerance`` of the column's first."""
    if not 0.0 <= tolerance <= 0.5:
        raise GridError(f"--peak-tolerance must be in [0, 0.5], got {tolerance}")
    measured = [c for c in cases if c["policy"] != "none" and c.get("peak_entries") is not None]
    columns: list[list[dict[str, Any]]] = []
    for case in sorted(measured, key=lambda c: c["peak_entries"]):
        if columns and case["peak_entries"] <= columns[-1][0]["peak_entries"] * (1 + tolerance):
            columns[-1].append(case)
        else:
            columns.append([case])
    return columns


def column_peak(column: Sequence[dict[str, Any]]) -> float:
    return sum(c["peak_entries"] for c in column) / len(column)


def reference_margin(column: Sequence[dict[str, Any]]) -> float | None:
    """Best accuracy of the reference policy minus the best baseline's in one column;
    None when either side is missing."""
    ours = [c["accuracy"] for c in column if c["policy"] == REFERENCE_POLICY]
    others = [c["accuracy"] for c in column if c["policy"] != REFERENCE_POLICY]
    if not ours or not others:
        return None
    return max(ours) - max(others)


def case_settings(case: dict[str, Any]) -> str:
    """``budget 64, buffer 64``: what sets a case apart from its policy's other cases."""
    config = case.get("policy_config") or {}
    return ", ".join([f"budget {case['budget']}", *(f"{k} {v}" for k, v in config.items())])


def grid_rows(columns: Sequence[Sequence[dict[str, Any]]]) -> list[list[str]]:
    """Markdown cells: a row per policy (reference first), the column's best in bold;
    a cell holding two cases of one policy lists both with their settings."""
    policies = sorted(
        {c["policy"] for column in columns for c in column},
        key=lambda p: (p != REFERENCE_POLICY, p),
    )
    rows = []
    for policy in policies:
        row = [policy]
        for column in columns:
            best = max(c["accuracy"] for c in column)
            mine = [c for c in column if c["policy"] == policy]
            cells = []
            for case in mine:
                text = f"{case['accuracy']:.3f}"
                if len(mine) > 1 or case.get("policy_config"):
                    text += f" ({case_settings(case)})"
                cells.append(f"**{text}**" if case["accuracy"] == best else text)
            row.append(" / ".join(cells) if cells else "-")
        rows.append(row)
    margins = [reference_margin(column) for column in columns]
    rows.append(
        [f"{REFERENCE_POLICY} - best baseline"]
        + ["n/a" if m is None else f"{m:+.3f}" for m in margins]
    )
    return rows


def report(
    settings: dict[str, Any],
    cases: Sequence[dict[str, Any]],
    columns: Sequence[Sequence[dict[str, Any]]],
    sources: Sequence[Path],
    replaced: Sequence[str] = (),
) -> str:
    headers = ["policy"] + [f"peak {column_peak(col):.0f}" for col in columns]
    full = [c for c in cases if c["policy"] == "none"]
    lines = [
        f"# Accuracy at equal peak KV memory: {settings['model']} on {settings['dataset']}",
        "",
        f"- problems: {settings['problems']} (offset {settings['offset']}); max tokens "
        f"{settings['max_tokens']}; temperature {settings['temperature']}",
        "- columns: the mean measured peak KV entries per (layer, KV head) of the cases in "
        "them (prompt, generated and buffered entries); a case run with its own policy "
        "config shows its budget and config in parentheses",
        "- bold: the best accuracy of the column; last row: best crystal minus best baseline",
        *(
            f"- none (full KV): {c['accuracy']:.3f} at a peak of {c['peak_entries']:.0f}"
            for c in full
            if c.get("peak_entries") is not None
        ),
        "- merged from: " + ", ".join(p.name for p in sources),
        *(f"- rerun (the later file wins): {line}" for line in replaced),
        "",
        markdown_table(headers, grid_rows(columns)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings, cases, replaced = load_runs(args.results)
        columns = peak_columns(cases, args.peak_tolerance)
    except GridError as exc:
        sys.exit(f"accuracy_grid: {exc}")
    payload = {
        "settings": settings,
        "sources": [str(p) for p in args.results],
        "peak_tolerance": args.peak_tolerance,
        "replaced": replaced,
        "columns": [
            {
                "peak": column_peak(col),
                "cases": [c["case"] for c in col],
                "reference_margin": reference_margin(col),
            }
            for col in columns
        ],
        "cases": cases,
    }
    markdown = report(settings, cases, columns, args.results, replaced)
    cli.publish(args, "accuracy_grid", payload, markdown, plot(cases, settings, line="policy"))


if __name__ == "__main__":
    main()
