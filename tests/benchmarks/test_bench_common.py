"""Shared benchmark helpers: data loading, prompts, answer extraction, grading, results."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest

from benchmarks.common.datasets import load_aime2025, load_gsm8k
from benchmarks.common.grading import extract_answer, format_number, is_correct, parse_number
from benchmarks.common.machine import machine_info, machine_tag
from benchmarks.common.prompts import FINAL_ANSWER_PREFIX, build_messages, render_prompt
from benchmarks.common.results import markdown_table, result_stem, write_results


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So she makes 9 * 2 = 18.\nThe final answer is 18", "18"),
        ("The final answer is $1,234.50.", "1234.5"),
        ("The final answer is: **18**", "18"),
        ("Final answer: 7 dollars", "7"),
        ("The final answer is 10 + 20 = 30.", "30"),
        ("The final answer is 12.\nOops, the final answer is 15.", "15"),
        ("The final answer is -4", "-4"),
        ("The final answer is 1,000,000 eggs", "1000000"),
        ("so the result is \\boxed{42}.", "42"),
        ("#### 18", "18"),
        ("Thus the answer is 3/4", "0.75"),
        ("She has 5 apples and buys 3 more, so 8 apples", "8"),
        ("Step one gives 18.\nThe final answer is N", "18"),
        ("18.00", "18"),
        ("no numbers at all", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_parse_and_format_number() -> None:
    assert parse_number("costs $1,250 total") == 1250.0
    assert parse_number("1/0") is None
    assert parse_number("none") is None
    assert format_number(3.0) == "3"
    assert format_number(2.5) == "2.5"
    assert format_number(1 / 3) == "0.333333"


@pytest.mark.parametrize(
    ("pred", "ref", "ok"),
    [
        ("18", "18", True),
        ("18.0", "18", True),
        ("1234.5", "1,234.50", True),
        ("17", "18", False),
        ("-18", "18", False),
        (None, "18", False),
        ("0.333333", "0.3333333", True),
        ("0", "0", True),
        ("0.01", "0", False),
    ],
)
def test_is_correct(pred: str | None, ref: str, ok: bool) -> None:
    assert is_correct(pred, ref) is ok


def test_load_gsm8k() -> None:
    first = load_gsm8k(limit=2)
    assert [p.id for p in first] == ["gsm8k-0", "gsm8k-1"]
    assert first[0].question.startswith("Janet")
    assert first[0].answer == "18"
    # References are plain numbers: no commas, no working.
    assert all(parse_number(p.answer) is not None and "," not in p.answer for p in load_gsm8k())
    assert len(load_gsm8k()) == 1319
    assert load_gsm8k(limit=1, offset=1)[0] == first[1]
    with pytest.raises(ValueError, match="limit"):
        load_gsm8k(limit=0)


def test_load_aime2025() -> None:
    problems = load_aime2025()
    assert len(problems) == 30
    assert problems[0].answer == "70"
    assert all(0 <= int(p.answer) <= 999 for p in problems)


class _FakeTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):  # noqa: ANN001, ANN201
        assert tokenize is False and add_generation_prompt is True
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_prompt_puts_instruction_after_question() -> None:
    messages = build_messages("  How many eggs?  ")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"].startswith("How many eggs?\n\n")
    assert messages[1]["content"].rstrip().endswith(f"{FINAL_ANSWER_PREFIX} N")
    text = render_prompt(_FakeTokenizer(), "How many eggs?")
    assert text.endswith("|assistant:") and "How many eggs?" in text


def test_markdown_table() -> None:
    table = markdown_table(["a", "b"], [["x|y", 0.12345], [3, math.nan]], digits=2)
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 0.12 |", "| 3 | n/a |"]
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b"], [[1]])


def test_result_stem_names_day_and_machine(tmp_path: Path) -> None:
    stem = result_stem("bench", tmp_path, day=dt.date(2026, 1, 2), machine="box-2c")
    assert stem == tmp_path / "2026-01-02_box-2c_bench"
    with pytest.raises(ValueError, match="result name"):
        result_stem("a/b", tmp_path)


def test_machine_info_and_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    info = machine_info()
    assert info["cores_usable"] >= 1
    assert isinstance(info["isa"], list)
    assert info["torch"]
    monkeypatch.setenv("CRYSTAL_VLLM_MACHINE", "My Box (R) @ lab")
    assert machine_tag() == "my-box"


def test_machine_info_records_the_commit_and_modified_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks.common import machine

    assert machine._git("rev-parse", "--is-inside-work-tree") in ("true\n", None)
    status = " M crystal_vllm/policy/base.py\nM  benchmarks/latency.py\n"
    answers = {"rev-parse": "abc1234\n", "status": status}
    monkeypatch.setattr(machine, "_git", lambda *args: answers[args[0]])
    info = machine_info()
    assert info["crystal_vllm_commit"] == "abc1234"
    assert info["crystal_vllm_modified_files"] == [
        "crystal_vllm/policy/base.py",
        "benchmarks/latency.py",
    ]
    answers["status"] = ""
    assert machine_info()["crystal_vllm_modified_files"] == []
    monkeypatch.setattr(machine, "_git", lambda *args: None)  # no git, or no checkout
    info = machine_info()
    assert info["crystal_vllm_commit"] is None and info["crystal_vllm_modified_files"] is None


def test_write_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("CRYSTAL_VLLM_MACHINE", "testbox")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    paths = write_results(
        "unit", {"value": 1.5, "where": tmp_path}, "# Title", figure=fig, results_dir=tmp_path
    )
    plt.close(fig)
    day = dt.date.today().isoformat()
    assert paths.json.name == f"{day}_testbox_unit.json"
    record = json.loads(paths.json.read_text())
    assert record["value"] == 1.5 and record["where"] == str(tmp_path)
    assert record["machine"]["tag"] == "testbox" and record["name"] == "unit"
    assert paths.markdown.read_text() == "# Title\n"
    assert paths.png is not None and paths.png.read_bytes()[:4] == b"\x89PNG"
