"""The CUDA platform plus crystal-vllm (imported only on machines where vLLM picks CUDA).

Untested end to end: this project's CI machines have no GPU and no CUDA vLLM wheel.
"""

from __future__ import annotations

from vllm.platforms.cuda import CudaPlatform

from crystal_vllm.vllm_ext.platform import CrystalPlatformMixin


class CrystalCudaPlatform(CrystalPlatformMixin, CudaPlatform):
    """vLLM's CUDA platform plus crystal-vllm."""
