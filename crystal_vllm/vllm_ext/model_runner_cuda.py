"""Worker side on CUDA: a GPU worker and model runner that own the compressed KV cache.

The CUDA twin of :mod:`crystal_vllm.vllm_ext.model_runner`: both mix
:class:`~crystal_vllm.vllm_ext.runner_mixin.CrystalRunnerMixin` into vLLM's V1 runner of
their device. The CUDA-only parts: vLLM's KV-block zeroing is turned off (it assumes
per-layer views of the buffer; this cache never reads a slot it did not write), the V1
runner is required (the platform selects it), and the ops' value checks (host syncs)
follow ``debug_checks``.

Untested end to end: this project's CI has no GPU and no CUDA vLLM.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from crystal_vllm.ops import triton_ops
from crystal_vllm.vllm_ext.runner_mixin import CrystalRunnerMixin


class CrystalGPUModelRunner(CrystalRunnerMixin, GPUModelRunner):
    """vLLM's V1 GPU model runner with the compressed KV cache."""

    def __init__(self, vllm_config, device) -> None:
        super().__init__(vllm_config, device)
        # The Triton ops read device values on the host to validate inputs (a sync per
        # layer); serving trusts the runtime's bookkeeping unless debug_checks asks.
        triton_ops.set_value_checks(self.crystal_config.debug_checks)

    def _init_kv_zero_meta(self) -> None:
        """No KV-block zeroing: vLLM's zeroer needs per-layer views of the buffer (it gets
        the raw one), and the per-head cache never reads a slot it has not written."""

    def _zero_block_ids(self, block_ids: list[int]) -> None:
        """See :meth:`_init_kv_zero_meta`."""


class CrystalGPUWorker(Worker):
    """vLLM's GPU worker, running :class:`CrystalGPUModelRunner`."""

    def crystal_kv_summary(self) -> dict[str, object] | None:
        """The cache counters of this worker: ``LLM.collective_rpc("crystal_kv_summary")``."""
        return self.model_runner.crystal_kv_summary()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.use_v2_model_runner:
            raise RuntimeError(
                "--kv-policy runs on vLLM's V1 GPU model runner, but this worker was "
                "configured for V2; unset VLLM_USE_V2_MODEL_RUNNER (the crystal-vllm "
                "platform sets it to 0 when a policy is active)"
            )

    def _make_model_runner(self) -> CrystalGPUModelRunner:
        return CrystalGPUModelRunner(self.vllm_config, self.device)
