"""KV policy names and per-policy parameters as the benchmark scripts take them."""

from __future__ import annotations

import argparse
import json
from typing import Any

#: ``--kv-policy`` values (``none`` is vanilla vLLM).
POLICIES = ("none", "full", "crystal", "crystal-lite", "lru", "streaming", "h2o", "snapkv", "rkv")

BURST_POLICIES = ("snapkv", "rkv")
#: Why SnapKV and R-KV can look better than the others at the same nominal budget.
BURST_NOTE = (
    "- snapkv and rkv compress a head only once it holds budget + `buffer` entries (buffer "
    "128 unless set), so between compressions they hold up to budget + buffer entries per "
    "head; the others evict as soon as a head exceeds its budget (crystal's adaptive "
    "per-head budgets average the given one)"
)


def parse_policy_config(text: str) -> dict[str, dict[str, Any]]:
    """``--policy-config``: JSON mapping a case name to its ``--kv-policy-config``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--policy-config is not valid JSON: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(
            "--policy-config must map names to parameter objects, e.g. "
            f'{{"snapkv-buf8": {{"buffer": 8}}}}; got {text!r}'
        )
    return value
