"""benchmarks/kernel_gpu.py: the prepared GPU check runs end to end in ``--smoke`` mode
(Triton's interpreter on the CPU, toy sizes) and reports every check and timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    # The script sets TRITON_INTERPRET itself for --smoke; start from an environment
    # without it, as a user would.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=SCRIPT.parents[1],
    )


def test_help() -> None:
    result = _run("--help")
    assert result.returncode == 0
    assert "--smoke" in result.stdout and "bandwidth" in result.stdout


@pytest.mark.slow
def test_smoke_run_checks_every_op_and_reports_timings() -> None:
    result = _run("--smoke")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, result.stdout[-2000:]
    report = json.loads(lines[0][len("RESULT ") :])
    assert report["smoke"] and report["checks_ok"] and not report["vllm_imported"]
    names = " ".join(c["check"] for c in report["checks"])
    for op in ("write_kv", "attention", "lrfu"):
        assert op in names
    assert all(c["ok"] and c["error"] <= 1 for c in report["checks"])
    assert all(c["evictions"] > 0 for c in report["checks"] if c["check"].startswith("lrfu"))
    for key in ("copy_bandwidth_gbs", "attention_ms", "fused_ms", "attention_fraction_of_copy"):
        assert report[key] > 0, key
    assert "| fused LRFU step" in result.stdout and "| attention," in result.stdout
