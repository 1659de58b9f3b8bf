"""Write a benchmark's results as JSON + markdown (+ PNG) under ``benchmarks/results/``.

Files are named ``<YYYY-MM-DD>_<machine>_<name>.{json,md,png}`` so that runs from
different machines and days sit side by side; a rerun on the same day and machine
replaces the files of the same name.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common.machine import machine_info, machine_tag

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


@dataclass(frozen=True)
class ResultPaths:
    json: Path
    markdown: Path
    png: Path | None


def result_stem(
    name: str,
    results_dir: Path | None = None,
    day: dt.date | None = None,
    machine: str | None = None,
) -> Path:
    """``<results_dir>/<day>_<machine>_<name>`` (no suffix)."""
    if not name or any(c in name for c in "/\\ "):
        raise ValueError(f"result name must be non-empty without '/', '\\' or spaces: {name!r}")
    day = day or dt.date.today()
    return (results_dir or RESULTS_DIR) / f"{day.isoformat()}_{machine or machine_tag()}_{name}"


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table; floats get ``digits`` decimals, NaN prints as ``n/a``."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs {len(headers)} cells to match the headers")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def record_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str | Callable[[dict[str, Any]], Any]]],
    digits: int = 3,
) -> str:
    """:func:`markdown_table` of dicts: ``columns`` are (header, key or function of the
    row); None prints as n/a."""
    cells = [[col(row) if callable(col) else row[col] for _, col in columns] for row in rows]
    cells = [["n/a" if value is None else value for value in row] for row in cells]
    return markdown_table([header for header, _ in columns], cells, digits)


def _jsonable(value: Any) -> Any:
    """Fallback for ``json.dumps``: paths, numpy/torch scalars and arrays."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_results(
    name: str,
    payload: dict[str, Any],
    markdown: str,
    figure: Any | None = None,
    results_dir: Path | None = None,
) -> ResultPaths:
    """Write ``payload`` (plus machine info and a timestamp) as JSON, ``markdown`` as .md and
    a matplotlib ``figure`` as .png; return the paths."""
    stem = result_stem(name, results_dir)
    stem.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        **payload,
    }
    json_path = stem.with_name(stem.name + ".json")
    json_path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    md_path = stem.with_name(stem.name + ".md")
    md_path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    png_path = None
    if figure is not None:
        png_path = stem.with_name(stem.name + ".png")
        figure.savefig(png_path, dpi=100, bbox_inches="tight")
    return ResultPaths(json=json_path, markdown=md_path, png=png_path)
