"""KV policy names, cases and per-policy parameters as the benchmark scripts take them,
and the notes and plot lines of results compared by policy and budget."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crystal_vllm.config import policy_names

#: ``--kv-policy`` values (``none``, first, is vanilla vLLM).
POLICIES = policy_names()

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


def add_policy_config_arg(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(
        "--policy-config",
        type=parse_policy_config,
        default={},
        help=f"{prefix}parameters per policy label as JSON (that policy's --kv-policy-config), "
        'e.g. \'{"snapkv-buf8": {"buffer": 8}}\'',
    )


@dataclass(frozen=True)
class Case:
    """A policy and the budget each request asks for. ``name`` labels a policy run with
    its own parameters (``--policy-config``)."""

    policy: str
    budget: int | None = None
    name: str | None = None

    @property
    def series(self) -> str:
        """The line this case belongs to: its name, else its policy."""
        return self.name or self.policy

    @property
    def label(self) -> str:
        return self.series if self.budget is None else f"{self.series}:{self.budget}"


def parse_case(text: str) -> Case:
    """``none``, ``[NAME=]POLICY`` or ``[NAME=]POLICY:BUDGET`` with a known policy and
    BUDGET >= 1."""
    spec, sep, budget = text.partition(":")
    name, _, policy = spec.rpartition("=")
    if policy not in POLICIES:
        raise argparse.ArgumentTypeError(
            f"case {text!r}: unknown policy {policy!r}; allowed: {', '.join(POLICIES)}"
        )
    if policy == "none" and (sep or name):
        raise argparse.ArgumentTypeError(f"case {text!r}: 'none' takes no name and no budget")
    if not sep:
        return Case(policy, name=name or None)
    if not budget.isdigit() or int(budget) < 1:
        raise argparse.ArgumentTypeError(
            f"case {text!r} must be 'none', [NAME=]POLICY or [NAME=]POLICY:BUDGET with an "
            "integer BUDGET >= 1 (e.g. crystal:256)"
        )
    return Case(policy, int(budget), name or None)


def parse_policy(text: str) -> tuple[str, str]:
    """``POLICY`` or ``LABEL=POLICY`` -> (label, policy), a policy to compare with none."""
    label, _, policy = text.rpartition("=")
    if policy not in POLICIES[1:]:
        raise argparse.ArgumentTypeError(
            f"policy {policy!r} in {text!r} is not one to compare with none; allowed: "
            f"{', '.join(POLICIES[1:])}"
        )
    return label or policy, policy


def policy_notes(
    policies: Sequence[tuple[str, str]], configs: dict[str, dict[str, Any]]
) -> list[str]:
    """Markdown lines that say which labels run with their own parameters, and how far a
    policy may exceed its budget; ``policies`` are (label, policy) pairs."""
    notes = [
        f"- {label}: `{policy}` with `--kv-policy-config '{json.dumps(configs[label])}'`"
        for label, policy in dict(policies).items()
        if configs.get(label)
    ]
    if any(policy in BURST_POLICIES for _, policy in policies):
        notes.append(BURST_NOTE)
    return notes


def plot_by_budget(
    ax: Any,
    rows: Sequence[dict[str, Any]],
    series: str,
    metric: str,
    x: str = "budget",
    xlabel: str = "KV budget (entries per layer and KV head)",
) -> None:
    """One line of ``metric`` against ``x`` (the budget, or e.g. the measured peak) for
    each ``series`` value of the rows that have a policy budget and an ``x``."""
    rows = [r for r in rows if r["budget"] is not None and r.get(x) is not None]
    for name in dict.fromkeys(r[series] for r in rows):
        points = sorted((r[x], r[metric]) for r in rows if r[series] == name)
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
