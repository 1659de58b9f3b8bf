"""Helpers shared by the benchmark scripts: data, prompts, grading, machine info, results."""

from benchmarks.common.datasets import Problem, load_aime2025, load_gsm8k
from benchmarks.common.grading import extract_answer, format_number, is_correct, parse_number
from benchmarks.common.machine import machine_info, machine_tag
from benchmarks.common.prompts import FINAL_ANSWER_PREFIX, SYSTEM_PROMPT, render_prompt
from benchmarks.common.results import (
    RESULTS_DIR,
    ResultPaths,
    markdown_table,
    result_stem,
    write_results,
)

__all__ = [
    "FINAL_ANSWER_PREFIX",
    "RESULTS_DIR",
    "SYSTEM_PROMPT",
    "Problem",
    "ResultPaths",
    "extract_answer",
    "format_number",
    "is_correct",
    "load_aime2025",
    "load_gsm8k",
    "machine_info",
    "machine_tag",
    "markdown_table",
    "parse_number",
    "render_prompt",
    "result_stem",
    "write_results",
]
