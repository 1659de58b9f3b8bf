"""The CUDA serving path's wiring, checked on a machine without CUDA.

The CPU wheel of vLLM cannot import ``vllm.platforms.cuda`` (its compiled extension is
CUDA-only), so nothing here runs a GPU step. What can be checked: the CUDA backend, worker
and runner subclass the vLLM classes they name, override methods that exist there with the
same parameters, share the CPU path's device-agnostic code (and its copy of the runner
logic stays identical to the CPU runner's), and the platform hooks, run against a stand-in
for ``vllm.platforms.cuda``, select them and force eager mode and the V1 runner.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types

import pytest
from test_host_contract import RUNNER_OWN
from vllm.config import CompilationMode, CUDAGraphMode, set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.platforms.interface import Platform
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

pytest.importorskip("triton")

from crystal_vllm.vllm_ext import (  # noqa: E402
    backend,
    backend_cuda,
    model_runner,
    model_runner_cuda,
    runner_mixin,
)
from crystal_vllm.vllm_ext import platform as crystal_platform  # noqa: E402

#: Methods of the runner that are crystal-vllm's own (not overrides of vLLM's): the list
#: test_host_contract.py checks every crystal-vllm subclass against.
OWN_METHODS = RUNNER_OWN


def _parameters(function) -> list[str]:
    return [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def test_backend_extends_vllm_triton_backend() -> None:
    cls = backend_cuda.CrystalCudaAttentionBackend
    assert issubclass(cls, TritonAttentionBackend)
    assert cls.get_name() == TritonAttentionBackend.get_name()  # a registered backend name
    assert cls.forward_includes_kv_cache_update is True
    impl = cls.get_impl_cls()
    assert issubclass(impl, TritonAttentionImpl)
    assert impl.forward is backend.CrystalAttentionImpl.forward  # the shared forward
    assert _parameters(impl.forward) == _parameters(TritonAttentionImpl.forward)
    assert cls.get_builder_cls() is backend.CrystalAttentionMetadataBuilder


def test_runner_overrides_exist_in_vllm_with_the_same_parameters() -> None:
    cls = model_runner_cuda.CrystalGPUModelRunner
    assert issubclass(cls, GPUModelRunner)
    overrides = {
        name
        for klass in (runner_mixin.CrystalRunnerMixin, cls)
        for name, value in vars(klass).items()
        if inspect.isfunction(value) and name not in OWN_METHODS
    }
    assert {"_update_states", "_init_kv_zero_meta", "execute_model"} <= overrides
    for name in overrides:
        assert hasattr(GPUModelRunner, name), f"GPUModelRunner.{name} is gone (vLLM moved it)"
        ours = _parameters(getattr(cls, name))
        base = _parameters(getattr(GPUModelRunner, name))
        assert base[: len(ours)] == ours, f"{name}: {ours} vs vLLM's {base}"


def test_both_runners_share_the_mixin() -> None:
    """The compressed-KV logic exists once: the CPU and the CUDA runner mix in the same
    class, ahead of vLLM's runner of their device."""
    for runner, base in (
        (model_runner.CrystalCPUModelRunner, model_runner.CPUModelRunner),
        (model_runner_cuda.CrystalGPUModelRunner, GPUModelRunner),
    ):
        mro = runner.__mro__
        assert mro.index(runner_mixin.CrystalRunnerMixin) < mro.index(base)


def test_worker_builds_the_crystal_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    assert issubclass(model_runner_cuda.CrystalGPUWorker, Worker)
    assert callable(Worker._make_model_runner)
    monkeypatch.setattr(model_runner_cuda, "CrystalGPUModelRunner", lambda c, d: ("runner", c, d))
    stub = types.SimpleNamespace(vllm_config="config", device="cuda:0")
    made = model_runner_cuda.CrystalGPUWorker._make_model_runner(stub)
    assert made == ("runner", "config", "cuda:0")


# -- the platform hooks, against a stand-in for vllm.platforms.cuda ----------------------


class _StandInCudaPlatform(Platform):
    """What the hooks need of vLLM's CudaPlatform: its worker and backend defaults."""

    device_name = "cuda"

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        if vllm_config.parallel_config.worker_cls == "auto":
            vllm_config.parallel_config.worker_cls = "vllm.v1.worker.gpu_worker.Worker"

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        return "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend"


@pytest.fixture
def platform_cuda(monkeypatch: pytest.MonkeyPatch):
    stand_in = types.ModuleType("vllm.platforms.cuda")
    stand_in.CudaPlatform = _StandInCudaPlatform
    monkeypatch.setitem(sys.modules, "vllm.platforms.cuda", stand_in)
    monkeypatch.delitem(sys.modules, "crystal_vllm.vllm_ext.platform_cuda", raising=False)
    # setenv first, so that the variable the hook sets is removed again afterwards.
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    module = importlib.import_module("crystal_vllm.vllm_ext.platform_cuda")
    yield module
    sys.modules.pop("crystal_vllm.vllm_ext.platform_cuda", None)


def _config(model, **additional):
    """A config built by the CPU platform (this machine's), as if compression were not
    set up yet: the CUDA hooks then run on it."""
    config = EngineArgs(
        model=str(model), enforce_eager=False, max_model_len=512, additional_config=additional
    ).create_engine_config()
    config.parallel_config.worker_cls = "auto"
    config.model_config.enforce_eager = False
    config.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    return config


def test_qualnames_resolve(platform_cuda) -> None:
    worker = resolve_obj_by_qualname(platform_cuda.CUDA_WORKER_CLS)
    assert worker is model_runner_cuda.CrystalGPUWorker
    attn = resolve_obj_by_qualname(platform_cuda.CUDA_BACKEND_CLS)
    assert attn is backend_cuda.CrystalCudaAttentionBackend


def test_compression_selects_the_cuda_worker_eager_and_v1(platform_cuda, tiny_model) -> None:
    cls = platform_cuda.CrystalCudaPlatform
    config = _config(tiny_model, kv_policy="crystal", kv_budget=64)
    cls._configure_for_compression(config, "compress")
    assert config.parallel_config.worker_cls == platform_cuda.CUDA_WORKER_CLS
    assert config.model_config.enforce_eager
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert config.compilation_config.mode == CompilationMode.NONE
    assert config.compilation_config.cudagraph_capture_sizes == []
    assert config.scheduler_config.scheduler_cls == crystal_platform.SCHEDULER_CLS
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    cls._configure_for_compression(config, "compress")  # idempotent: our own worker is accepted


def test_conflicting_settings_are_refused(
    platform_cuda, tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = platform_cuda.CrystalCudaPlatform
    config = _config(tiny_model, kv_policy="crystal")
    config.parallel_config.worker_cls = "my.Worker"
    with pytest.raises(ValueError, match="CrystalGPUWorker.*my.Worker"):
        cls._configure_for_compression(config, "compress")
    config = _config(tiny_model, kv_policy="crystal")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="V1 GPU model runner.*VLLM_USE_V2_MODEL_RUNNER=1"):
        cls._configure_for_compression(config, "compress")


def test_backend_selection_follows_the_policy(platform_cuda, tiny_model) -> None:
    cls = platform_cuda.CrystalCudaPlatform
    default = _StandInCudaPlatform.get_attn_backend_cls(None, None)
    with set_current_vllm_config(_config(tiny_model, kv_policy="crystal")):
        assert cls.get_attn_backend_cls(None, None) == platform_cuda.CUDA_BACKEND_CLS
    with set_current_vllm_config(_config(tiny_model)):
        assert cls.get_attn_backend_cls(None, None) == default


def test_tensor_parallel_and_ray_are_accepted_on_cuda(platform_cuda, tiny_model) -> None:
    """The CUDA platform shares the parallel checks; Ray is refused only on CPU."""
    cls = platform_cuda.CrystalCudaPlatform
    config = _config(tiny_model, kv_policy="crystal")
    config.parallel_config.tensor_parallel_size = 2
    config.parallel_config.distributed_executor_backend = "ray"
    assert cls._unsupported_on_platform(config) == []
    assert crystal_platform.CrystalCpuPlatform._unsupported_on_platform(config) != []
    assert crystal_platform._unsupported_reasons(config) == []
    config.parallel_config.pipeline_parallel_size = 2
    assert crystal_platform._unsupported_reasons(config) == [
        "pipeline parallelism (--pipeline-parallel-size 2; only 1)"
    ]
