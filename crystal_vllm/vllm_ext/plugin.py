"""vLLM plugin entry points (see ``pyproject.toml``).

vLLM resolves the platform once per process by calling every function of the
``vllm.platform_plugins`` group; one out-of-tree plugin that answers takes priority
over the built-in platform. We answer with a thin subclass of the platform vLLM would
have picked itself (CPU or CUDA), so that vanilla behaviour is unchanged unless a
``--kv-policy`` other than ``none`` is chosen.
"""

from __future__ import annotations

CPU_PLATFORM = "crystal_vllm.vllm_ext.platform.CrystalCpuPlatform"
CUDA_PLATFORM = "crystal_vllm.vllm_ext.platform_cuda.CrystalCudaPlatform"


def platform_plugin() -> str | None:
    """The platform class to use, wrapping the built-in one this machine would get."""
    from vllm import platforms

    if platforms.cuda_platform_plugin() is not None:
        return CUDA_PLATFORM
    if platforms.cpu_platform_plugin() is not None:
        return CPU_PLATFORM
    return None
