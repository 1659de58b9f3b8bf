"""Fixtures for tests that run a vLLM engine in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def offline_generate() -> Callable[..., dict]:
    """``offline_generate(model, additional_config, *args, plugins=None)`` runs
    ``offline_generate.py`` in a fresh process and returns its result dict. The engine
    runs inside that process, so that the cache counters can be read from it (and so that
    a loaded 2-core machine cannot starve one of vLLM's three processes)."""

    def run(model: Path, additional_config: dict, *args: str, plugins: str | None = None) -> dict:
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if plugins is not None:
            env["VLLM_PLUGINS"] = plugins
        result = subprocess.run(
            [sys.executable, HERE / "offline_generate.py", model, json.dumps(additional_config)]
            + list(args),
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        lines = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, result.stdout[-2000:]
        return json.loads(lines[-1][len("RESULT ") :])

    return run
