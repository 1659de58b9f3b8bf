"""Every vLLM-internal symbol crystal_vllm.vllm_ext relies on, checked against the pin.

When vLLM moves one of these, this file fails first and names it.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

from crystal_vllm.vllm_ext import VLLM_VERSION

SYMBOLS = [
    ("vllm.platforms", "cpu_platform_plugin"),
    ("vllm.platforms", "cuda_platform_plugin"),
    ("vllm.platforms.cpu", "CpuPlatform.pre_register_and_update"),
    ("vllm.platforms.cpu", "CpuPlatform.check_and_update_config"),
    ("vllm.platforms.interface", "Platform.register_custom_kv_cache_specs"),
    ("vllm.platforms.interface", "Platform.get_attn_backend_cls"),
    ("vllm.utils.argparse_utils", "FlexibleArgumentParser"),
    ("vllm.config", "VllmConfig"),
    ("vllm.logger", "init_logger"),
    # The CUDA path (crystal_vllm/vllm_ext/*_cuda.py): importable with the CPU wheel too.
    ("vllm.v1.worker.gpu_worker", "Worker._make_model_runner"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._init_kv_zero_meta"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._zero_block_ids"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._on_request_state_removed"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_kv_cache_spec"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionBackend.get_name"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.forward"),
    ("vllm.config", "CompilationMode"),
    ("vllm.config", "CUDAGraphMode"),
    ("vllm.config", "VllmConfig.use_v2_model_runner"),
    ("vllm.envs", "VLLM_USE_V2_MODEL_RUNNER"),
]


def test_vllm_version_is_the_pinned_one() -> None:
    installed = importlib.import_module("vllm").__version__
    assert installed.split("+")[0] == VLLM_VERSION, (
        f"crystal_vllm.vllm_ext is written against vLLM {VLLM_VERSION}, found {installed}"
    )


@pytest.mark.parametrize(("module", "attribute"), SYMBOLS)
def test_symbol_exists(module: str, attribute: str) -> None:
    obj = importlib.import_module(module)
    for part in attribute.split("."):
        assert hasattr(obj, part), f"{module}.{attribute} is gone (vLLM moved it)"
        obj = getattr(obj, part)


def test_platform_plugin_entry_point_is_installed() -> None:
    entry_points = importlib.metadata.entry_points(group="vllm.platform_plugins")
    assert "crystal_vllm" in {ep.name for ep in entry_points}


def test_vllm_resolves_our_platform() -> None:
    from vllm.platforms import current_platform

    assert type(current_platform).__name__ == "CrystalCpuPlatform"
