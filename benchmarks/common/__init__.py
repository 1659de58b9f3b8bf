"""Helpers shared by the benchmark scripts: data, prompts, grading, machine info, results,
command lines, engines and servers."""
