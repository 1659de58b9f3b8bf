"""Command-line pieces the benchmark scripts share: the parser, argument types and groups,
the model a script runs, and the end of a run (result files plus the markdown printed)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from benchmarks.common.results import write_results
from crystal_vllm.models import MODEL_NAMES, prepare_model

# The models `--model`/`--serve` accept by name (built on first use by prepare_model).
BUNDLED_MODELS = ", ".join(MODEL_NAMES)


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by a script's docstring: its first paragraph, then the rest."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(
        description=head,
        epilog=rest or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be an integer >= 1")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be a number > 0")
    return value


def add_counts(parser: argparse.ArgumentParser, *counts: tuple[str, int | None, str]) -> None:
    """Integer arguments >= 1, each (flag, default, what it counts); a None default leaves
    the flag out."""
    for flag, default, what in counts:
        if default is not None:
            help = f"{what} (default {default})"
            parser.add_argument(flag, type=positive_int, default=default, help=help)


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2",
        help=f"bundled model name ({BUNDLED_MODELS}) or an HF folder (default: smollm2)",
    )


def add_output_args(parser: argparse.ArgumentParser, name: str, worker: bool = False) -> None:
    """``--name`` and ``--results-dir`` (and the hidden ``--worker`` of scripts that run
    each case in a child process of their own)."""
    parser.add_argument(
        "--name",
        default=None,
        help=f"result file name suffix: <date>_<machine>_<name>.{{json,md,png}} (default: {name})",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="where results go (benchmarks/results)"
    )
    if worker:
        parser.add_argument("--worker", default=None, metavar="SPEC", help=argparse.SUPPRESS)


def resolve_model(name: str, dtype: str = "bfloat16") -> Path:
    """A bundled model's folder (built on first use), else ``name`` as a folder."""
    return prepare_model(name, dtype=dtype) if name in MODEL_NAMES else Path(name)


def publish(
    args: argparse.Namespace, name: str, payload: dict[str, Any], markdown: str, figure: Any
) -> None:
    """Write the result files (``args.name`` or ``name``) and print the markdown and paths."""
    figure.tight_layout()
    paths = write_results(args.name or name, payload, markdown, figure, args.results_dir)
    print(markdown)
    print(f"results: {paths.json} {paths.markdown} {paths.png}")


def subplots(title: str, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """A matplotlib figure (file-only Agg backend) of ``ncols`` panels under ``title``;
    :func:`publish` lays it out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, **kwargs)
    fig.suptitle(title)
    return fig, axes
