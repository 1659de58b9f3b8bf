"""Build script: metadata lives in pyproject.toml; this file adds the C++ CPU kernels.

``crystal_vllm._C`` (sources in ``csrc/``) is a torch extension, so it needs the torch
that the package will run with. Install with

    pip install -e . --no-build-isolation

(pip's default build isolation hides the environment's torch). If torch cannot be
imported the package is installed without the extension and ``CRYSTAL_VLLM_OPS=auto``
falls back to the torch reference ops; set ``CRYSTAL_VLLM_BUILD_EXT=1`` to make that an
error instead (CI) or ``CRYSTAL_VLLM_BUILD_EXT=0`` to skip the extension.

The kernels are compiled for the baseline x86-64 ISA; the AVX2 and AVX-512 variants are
compiled through per-file ``#pragma GCC target`` and chosen at run time, so one build
runs on any x86-64 CPU. Compiler: g++ (GCC pragmas and ``__builtin_cpu_supports``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _extension_kwargs() -> dict:
    mode = os.environ.get("CRYSTAL_VLLM_BUILD_EXT", "auto").strip().lower()
    if mode in ("0", "false", "no"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        if mode in ("1", "true", "yes"):
            raise
        print(
            "crystal-vllm: torch is not importable here (build isolation?); installing "
            "without the C++ CPU kernels. Use `pip install --no-build-isolation` to build them.",
            file=sys.stderr,
        )
        return {}
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
    extension = CppExtension(
        name="crystal_vllm._C",
        sources=sources,
        # -fopenmp: at::parallel_for is inline OpenMP code; libgomp resolves to the copy
        # torch has already loaded. No -march: the ISA is chosen at run time.
        extra_compile_args=["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        extra_link_args=["-fopenmp"],
    )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


setup(**_extension_kwargs())
