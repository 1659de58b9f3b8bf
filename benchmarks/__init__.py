"""Benchmark scripts of crystal-vllm; shared helpers live in :mod:`benchmarks.common`."""
