"""The CUDA platform plus crystal-vllm (imported only on machines where vLLM picks CUDA).

With a policy active it selects the CUDA worker and attention backend
(:mod:`~crystal_vllm.vllm_ext.model_runner_cuda`, :mod:`~crystal_vllm.vllm_ext.backend_cuda`)
and two settings they rely on, each logged when it changes:

* **eager mode** (no CUDA graphs, no torch.compile): every step runs Python bookkeeping
  per layer (slot assignment, budgets, request rows), which a captured graph would skip
  and whose host reads graph capture forbids;
* **vLLM's V1 GPU model runner** (``VLLM_USE_V2_MODEL_RUNNER=0``, set here for this process
  and the workers it starts): the crystal runner extends the V1 runner's hooks, which the
  V2 runner does not have.

Untested end to end: this project's CI machines have no GPU and no CUDA vLLM wheel.
"""

from __future__ import annotations

import os

from vllm.config import CompilationMode, CUDAGraphMode
from vllm.platforms.cuda import CudaPlatform

from crystal_vllm.vllm_ext import get_logger
from crystal_vllm.vllm_ext.platform import BACKEND_CLS, CrystalPlatformMixin

logger = get_logger(__name__)

CUDA_WORKER_CLS = "crystal_vllm.vllm_ext.model_runner_cuda.CrystalGPUWorker"
CUDA_BACKEND_CLS = "crystal_vllm.vllm_ext.backend_cuda.CrystalCudaAttentionBackend"
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def force_eager(vllm_config) -> None:
    """No CUDA graphs and no torch.compile: the per-layer Python of the cache path must run."""
    model_config, compilation = vllm_config.model_config, vllm_config.compilation_config
    if model_config is not None and not model_config.enforce_eager:
        logger.info("crystal-vllm: eager mode (no CUDA graphs, no torch.compile)")
        model_config.enforce_eager = True
    compilation.mode = CompilationMode.NONE
    compilation.cudagraph_mode = CUDAGraphMode.NONE
    compilation.max_cudagraph_capture_size = 0
    compilation.cudagraph_capture_sizes = []


def require_v1_model_runner() -> None:
    """Select vLLM's V1 GPU model runner, refusing an explicit request for V2."""
    value = os.environ.get(V2_RUNNER_ENV)
    if value is not None and value.strip() not in ("", "0"):
        raise ValueError(
            f"--kv-policy runs on vLLM's V1 GPU model runner, but {V2_RUNNER_ENV}={value}; "
            f"unset it or set it to 0"
        )
    if value is None:
        logger.info("crystal-vllm: vLLM's V1 GPU model runner (%s=0)", V2_RUNNER_ENV)
    os.environ[V2_RUNNER_ENV] = "0"


class CrystalCudaPlatform(CrystalPlatformMixin, CudaPlatform):
    """vLLM's CUDA platform plus crystal-vllm.

    It serves every policy, as the CPU platform does: the runtime is device-agnostic torch,
    and its ops run as Triton kernels here (the LRFU family fused; the others through the
    attention kernel)."""

    @classmethod
    def _configure_for_compression(cls, vllm_config, prompt: str) -> None:
        parallel = vllm_config.parallel_config
        if parallel.worker_cls not in ("auto", CUDA_WORKER_CLS):
            raise ValueError(
                f"--kv-policy needs worker class {CUDA_WORKER_CLS}, but --worker-cls is "
                f"{parallel.worker_cls}"
            )
        # The shared settings pick the CPU worker for an "auto" worker; ours replaces it.
        parallel.worker_cls = "auto"
        super()._configure_for_compression(vllm_config, prompt)
        parallel.worker_cls = CUDA_WORKER_CLS
        force_eager(vllm_config)
        require_v1_model_runner()

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        chosen = super().get_attn_backend_cls(
            selected_backend, attn_selector_config, *args, **kwargs
        )
        return CUDA_BACKEND_CLS if chosen == BACKEND_CLS else chosen
