"""The model runner of this worker process, for the attention backend to reach.

vLLM builds attention metadata builders and impls itself, with no reference to the
runner that owns the step; one runner per worker process registers itself here.
"""

from __future__ import annotations

from typing import Any

_active: Any = None


def register(runner: Any) -> None:
    global _active
    _active = runner


def active_runner() -> Any:
    if _active is None:
        raise RuntimeError("no crystal-vllm model runner in this process")
    return _active
