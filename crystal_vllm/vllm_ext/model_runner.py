"""Worker side on CPU: vLLM's CPU worker and model runner with the compressed KV cache
(the behaviour is :class:`~crystal_vllm.vllm_ext.runner_mixin.CrystalRunnerMixin`)."""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from crystal_vllm.vllm_ext.runner_mixin import CrystalRunnerMixin


class CrystalCPUModelRunner(CrystalRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with the compressed KV cache."""


class CrystalCPUWorker(CPUWorker):
    """vLLM's CPU worker, running :class:`CrystalCPUModelRunner`."""

    def crystal_kv_summary(self) -> dict[str, object] | None:
        """The cache counters of this worker: ``LLM.collective_rpc("crystal_kv_summary")``."""
        return self.model_runner.crystal_kv_summary()

    def init_device(self) -> None:
        super().init_device()
        self.model_runner = CrystalCPUModelRunner(self.vllm_config, torch.device("cpu"))
