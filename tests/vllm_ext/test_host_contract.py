"""Every vLLM-internal symbol crystal_vllm.vllm_ext relies on, checked against the pin.

When vLLM moves, renames or re-signs one of these, this file fails first and names it.
Four kinds of contract:

- ``SYMBOLS``: modules, functions, classes and their attributes that must exist, including
  the attributes vLLM sets on its instances (``self.requests = ...``) that the plugin reads;
- ``SIGNATURES``: the parameter names of every vLLM method the plugin overrides or calls,
  pinned exactly (``*args``/``**kwargs`` written as such);
- ``test_overrides_match_vllm``: every method a crystal-vllm subclass defines overrides a
  vLLM method of the same parameters, or is listed in ``OVERRIDERS`` as the plugin's own
  (and then vLLM has no method of that name). A renamed vLLM method would otherwise turn an
  override into dead code without any error;
- the entry-point groups and the worker-method dispatch of ``collective_rpc``.

The CUDA platform class itself cannot be imported with the CPU wheel (``vllm.platforms.cuda``
needs CUDA); ``test_cuda_wiring.py`` checks its hooks against a stand-in.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import re

import pytest

from crystal_vllm.vllm_ext import VLLM_VERSION

SYMBOLS = [
    # Platform (plugin.py, platform.py, platform_cuda.py)
    ("vllm.plugins", "PLATFORM_PLUGINS_GROUP"),
    ("vllm.platforms", "cpu_platform_plugin"),
    ("vllm.platforms", "cuda_platform_plugin"),
    ("vllm.platforms", "current_platform"),
    ("vllm.platforms.cpu", "CpuPlatform.pre_register_and_update"),
    ("vllm.platforms.cpu", "CpuPlatform.check_and_update_config"),
    ("vllm.platforms.cpu", "CpuPlatform.register_custom_kv_cache_specs"),
    ("vllm.platforms.cpu", "CpuPlatform.get_attn_backend_cls"),
    ("vllm.platforms.interface", "Platform.device_name"),
    ("vllm.utils.argparse_utils", "FlexibleArgumentParser"),
    ("vllm.logger", "init_logger"),
    ("vllm.config", "get_current_vllm_config"),
    ("vllm.config", "CompilationMode.NONE"),
    ("vllm.config", "CUDAGraphMode.NONE"),
    ("vllm.config", "VllmConfig.use_v2_model_runner"),
    ("vllm.envs", "VLLM_USE_V2_MODEL_RUNNER"),
    # The VllmConfig fields the platform reads and sets.
    ("vllm.config", "VllmConfig.additional_config"),
    ("vllm.config", "VllmConfig.model_config"),
    ("vllm.config", "VllmConfig.cache_config"),
    ("vllm.config", "VllmConfig.scheduler_config"),
    ("vllm.config", "VllmConfig.parallel_config"),
    ("vllm.config", "VllmConfig.compilation_config"),
    ("vllm.config", "VllmConfig.speculative_config"),
    ("vllm.config", "ModelConfig.use_mla"),
    ("vllm.config", "ModelConfig.get_sliding_window"),
    ("vllm.config", "ModelConfig.is_hybrid"),
    ("vllm.config", "ModelConfig.is_encoder_decoder"),
    ("vllm.config", "ModelConfig.max_model_len"),
    ("vllm.config", "ModelConfig.enforce_eager"),
    ("vllm.config", "ModelConfig.tokenizer"),
    ("vllm.config", "ModelConfig.tokenizer_revision"),
    ("vllm.config", "ModelConfig.trust_remote_code"),
    ("vllm.config", "CacheConfig.cache_dtype"),
    ("vllm.config", "CacheConfig.enable_prefix_caching"),
    ("vllm.config", "CacheConfig.block_size"),
    ("vllm.config", "CacheConfig.user_specified_block_size"),
    ("vllm.config", "SchedulerConfig.max_num_seqs"),
    ("vllm.config", "SchedulerConfig.scheduler_cls"),
    ("vllm.config", "ParallelConfig.worker_cls"),
    ("vllm.config", "ParallelConfig.pipeline_parallel_size"),
    ("vllm.config", "ParallelConfig.tensor_parallel_size"),
    ("vllm.config", "ParallelConfig.data_parallel_size"),
    ("vllm.config", "ParallelConfig.decode_context_parallel_size"),
    ("vllm.config", "ParallelConfig.prefill_context_parallel_size"),
    ("vllm.config", "ParallelConfig.use_ray"),
    # Tensor parallelism: the runner's rank and the model-wide KV heads.
    ("vllm.distributed", "get_tensor_model_parallel_rank"),
    ("vllm.distributed", "get_tensor_model_parallel_world_size"),
    ("vllm.config", "ModelConfig.get_total_num_kv_heads"),
    ("vllm.config", "CompilationConfig.mode"),
    ("vllm.config", "CompilationConfig.cudagraph_mode"),
    ("vllm.config", "CompilationConfig.max_cudagraph_capture_size"),
    ("vllm.config", "CompilationConfig.cudagraph_capture_sizes"),
    # KV-cache spec and manager (kv_spec.py, platform.py)
    ("vllm.utils.math_utils", "cdiv"),
    ("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.merge"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.max_memory_usage_bytes"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.page_size_bytes"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.has_layer_views"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.prefix_cacheable"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.block_size"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.num_kv_heads"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.head_size"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.dtype"),
    ("vllm.v1.kv_cache_interface", "KVCacheConfig.num_blocks"),
    ("vllm.v1.kv_cache_interface", "KVCacheConfig.kv_cache_groups"),
    ("vllm.v1.kv_cache_interface", "KVCacheGroupSpec.kv_cache_spec"),
    ("vllm.v1.kv_cache_interface", "KVCacheGroupSpec.layer_names"),
    (
        "vllm.v1.core.single_type_kv_cache_manager",
        "FullAttentionManager.get_num_blocks_to_allocate",
    ),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.allocate_new_blocks"),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.cache_blocks"),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.block_size"),
    # Scheduler (scheduler.py): the chain scheduler.kv_cache_manager.coordinator
    # .single_type_managers, the hooks it overrides and the Request fields it reads.
    ("vllm.v1.core.sched.scheduler", "Scheduler.vllm_config"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.cache_config"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.kv_cache_manager"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.coordinator"),
    ("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator.single_type_managers"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._update_request_with_output"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_blocks"),
    ("vllm.v1.request", "Request.request_id"),
    ("vllm.v1.request", "Request.sampling_params"),
    ("vllm.sampling_params", "SamplingParams.extra_args"),
    # Attention backend (backend.py, backend_cuda.py)
    ("vllm.v1.attention.backend", "AttentionBackend.forward_includes_kv_cache_update"),
    ("vllm.v1.attention.backend", "AttentionMetadataBuilder.build"),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata.num_reqs"),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata.num_actual_tokens"),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata.query_start_loc_cpu"),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata.seq_lens"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend.get_impl_cls"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend.get_builder_cls"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.num_heads"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.num_kv_heads"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.head_size"),
    ("vllm.model_executor.layers.attention.attention", "Attention.layer_name"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionBackend.get_name"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.forward"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.num_heads"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.num_kv_heads"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.head_size"),
    # Model runner and worker (runner_mixin.py, model_runner.py, model_runner_cuda.py)
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.init_device"),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.model_runner"),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.vllm_config"),
    ("vllm.v1.worker.gpu_worker", "Worker._make_model_runner"),
    ("vllm.v1.worker.gpu_worker", "Worker.use_v2_model_runner"),
    ("vllm.v1.worker.gpu_worker", "Worker.model_runner"),
    ("vllm.v1.worker.gpu_worker", "Worker.device"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._on_request_state_removed"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_kv_cache_spec"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._init_kv_zero_meta"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._zero_block_ids"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.cache_config"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.model_config"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.scheduler_config"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.kv_caches"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.input_batch"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.requests"),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids"),
    ("vllm.v1.worker.gpu_input_batch", "CachedRequestState.block_ids"),
    ("vllm.v1.worker.gpu_input_batch", "CachedRequestState.sampling_params"),
    ("vllm.v1.worker.gpu_input_batch", "CachedRequestState.output_token_ids"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.attn_groups"),
    ("vllm.v1.worker.utils", "AttentionGroup.metadata_builders"),
    ("vllm.v1.worker.gpu_input_batch", "InputBatch.num_computed_tokens_cpu"),
    ("vllm.v1.core.sched.output", "SchedulerOutput.preempted_req_ids"),
    ("vllm.v1.core.sched.output", "SchedulerOutput.num_scheduled_tokens"),
    ("vllm.v1.core.sched.output", "SchedulerOutput.total_num_scheduled_tokens"),
    # Per-request validation (request_params.py) and the counters' collective_rpc.
    ("vllm.v1.sample.logits_processor", "LOGITSPROCS_GROUP"),
    ("vllm.v1.sample.logits_processor", "LogitsProcessor.validate_params"),
    ("vllm.entrypoints.llm", "LLM.collective_rpc"),
    ("vllm.v1.serial_utils", "run_method"),
    ("vllm.v1.worker.worker_base", "WorkerWrapperBase.__getattr__"),
    # Flags reaching the API-server processes (platform.py): the namespace field they
    # rebuild the config from, and the --additional-config action that replaces it.
    ("vllm.engine.arg_utils", "EngineArgs.additional_config"),
    ("vllm.engine.arg_utils", "EngineArgs.from_cli_args"),
    # Metrics (metrics.py, runner_mixin.py, scheduler.py): worker output -> scheduler ->
    # SchedulerStats -> front-end stat logger plugin.
    ("vllm.v1.outputs", "ModelRunnerOutput"),
    ("vllm.v1.outputs", "EMPTY_MODEL_RUNNER_OUTPUT"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output"),
    ("vllm.v1.engine", "EngineCoreOutputs.scheduler_stats"),
    ("vllm.v1.metrics.stats", "SchedulerStats.num_kv_fetch_reqs_by_stage"),
    ("vllm.v1.metrics.loggers", "AggregateStatLoggerBase"),
    ("vllm.v1.metrics.loggers", "StatLoggerManager"),
    ("vllm.v1.serial_utils", "MsgpackEncoder"),
    ("vllm.v1.serial_utils", "MsgpackDecoder"),
    ("vllm.plugins", "STAT_LOGGER_PLUGINS_GROUP"),
    ("vllm.config", "ModelConfig.served_model_name"),
    ("vllm.config", "ModelConfig.get_num_layers"),
    ("vllm.config", "ModelConfig.get_total_num_kv_heads"),
    ("vllm.config", "CacheConfig.num_gpu_blocks"),
]

#: Parameter names (``self``/``cls`` left out) of the vLLM functions the plugin overrides
#: or calls, as in the pinned release. The plugin passes several of them positionally or
#: by name, and its overrides repeat them.
SIGNATURES = {
    ("vllm.platforms.interface", "Platform.pre_register_and_update"): ("parser",),
    ("vllm.platforms.cpu", "CpuPlatform.check_and_update_config"): ("vllm_config",),
    ("vllm.platforms.interface", "Platform.register_custom_kv_cache_specs"): ("vllm_config",),
    ("vllm.platforms.cpu", "CpuPlatform.get_attn_backend_cls"): (
        "selected_backend",
        "attn_selector_config",
        "num_heads",
    ),
    ("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register"): (
        "kvcache_spec_cls",
        "manager_class",
        "uniform_type_base_spec",
    ),
    ("vllm.config", "get_current_vllm_config"): (),
    ("vllm.logger", "init_logger"): ("name",),
    ("vllm.utils.math_utils", "cdiv"): ("a", "b"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.max_memory_usage_bytes"): ("vllm_config",),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec.merge"): ("specs",),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.__init__"): (
        "kv_cache_spec",
        "block_pool",
        "enable_caching",
        "kv_cache_group_id",
        "scheduler_block_size",
        "dcp_world_size",
        "pcp_world_size",
        "needs_kv_cache_zeroing",
        "max_admission_blocks_per_request",
    ),
    (
        "vllm.v1.core.single_type_kv_cache_manager",
        "FullAttentionManager.get_num_blocks_to_allocate",
    ): (
        "request_id",
        "num_tokens",
        "new_computed_blocks",
        "total_computed_tokens",
        "num_local_computed_tokens",
        "num_tokens_main_model",
        "apply_admission_cap",
        "prefill_end",
    ),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.allocate_new_blocks"): (
        "request_id",
        "num_tokens",
        "num_tokens_main_model",
    ),
    # Prefix caching under prompt `keep`: the override narrows num_tokens to the prompt's
    # full blocks and forwards the rest.
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.cache_blocks"): (
        "request",
        "num_tokens",
        "retention_interval",
        "replay_boundaries",
    ),
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request"): ("request",),
    ("vllm.v1.core.sched.scheduler", "Scheduler._update_request_with_output"): (
        "request",
        "new_token_ids",
        "is_stale",
    ),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_blocks"): ("request",),
    ("vllm.v1.attention.backend", "AttentionMetadataBuilder.__init__"): (
        "kv_cache_spec",
        "layer_names",
        "vllm_config",
        "device",
    ),
    ("vllm.v1.attention.backend", "AttentionMetadataBuilder.build"): (
        "common_prefix_len",
        "common_attn_metadata",
        "fast_build",
    ),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward"): (
        "layer",
        "query",
        "key",
        "value",
        "kv_cache",
        "attn_metadata",
        "output",
        "output_scale",
        "output_block_scale",
    ),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend.get_impl_cls"): (),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend.get_builder_cls"): (),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl.forward"): (
        "layer",
        "query",
        "key",
        "value",
        "kv_cache",
        "attn_metadata",
        "output",
        "output_scale",
        "output_block_scale",
    ),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.__init__"): ("vllm_config", "device"),
    ("vllm.v1.worker.cpu_worker", "CPUWorker.init_device"): (),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.__init__"): ("vllm_config", "device"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_kv_cache_spec"): (),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache"): (
        "kv_cache_config",
        "is_profiling",
        "kv_cache_allocation_context",
    ),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.initialize_kv_cache"): (
        "kv_cache_config",
        "is_profiling",
        "kv_cache_allocation_context",
    ),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model"): (
        "scheduler_output",
        "intermediate_tensors",
    ),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states"): ("scheduler_output",),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._on_request_state_removed"): (
        "req_id",
        "req_state",
    ),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._init_kv_zero_meta"): (),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._zero_block_ids"): ("block_ids",),
    ("vllm.v1.worker.gpu_worker", "Worker.__init__"): (
        "vllm_config",
        "local_rank",
        "rank",
        "distributed_init_method",
        "is_driver_worker",
    ),
    ("vllm.v1.worker.gpu_worker", "Worker._make_model_runner"): (),
    ("vllm.v1.sample.logits_processor", "LogitsProcessor.validate_params"): ("sampling_params",),
    ("vllm.v1.sample.logits_processor", "LogitsProcessor.__init__"): (
        "vllm_config",
        "device",
        "is_pin_memory",
    ),
    ("vllm.v1.sample.logits_processor", "LogitsProcessor.apply"): ("logits",),
    ("vllm.v1.sample.logits_processor", "LogitsProcessor.is_argmax_invariant"): (),
    ("vllm.v1.sample.logits_processor", "LogitsProcessor.update_state"): ("batch_update",),
    ("vllm.entrypoints.llm", "LLM.collective_rpc"): ("method", "timeout", "args", "kwargs"),
    ("vllm.v1.serial_utils", "run_method"): ("obj", "method", "args", "kwargs"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens"): ("grammar_output",),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output"): (
        "scheduler_output",
        "model_runner_output",
    ),
    ("vllm.v1.metrics.loggers", "AggregateStatLoggerBase.__init__"): (
        "vllm_config",
        "engine_indexes",
    ),
    ("vllm.v1.metrics.loggers", "StatLoggerBase.record"): (
        "scheduler_stats",
        "iteration_stats",
        "mm_cache_stats",
        "engine_idx",
    ),
    ("vllm.v1.metrics.loggers", "StatLoggerBase.log_engine_initialized"): (),
    ("vllm.config", "ModelConfig.get_num_layers"): ("parallel_config",),
    ("vllm.config", "ModelConfig.get_total_num_kv_heads"): (),
}

#: Methods of the shared runner mixin that are crystal-vllm's own, not overrides.
RUNNER_OWN = {
    "crystal_kv_summary",
    "_crystal_builders",
    "_maybe_log_stats",
    "_request_budget",
    "_scheduled_requests",
    "_with_metrics",
}

#: Each crystal-vllm subclass of a vLLM class (module, name), and the methods it may
#: define that are its own rather than overrides (a name listed here that the class does
#: not define is allowed: lists may run ahead of a refactoring).
OVERRIDERS = [
    (
        "crystal_vllm.vllm_ext.platform",
        "CrystalCpuPlatform",
        {"_configure_for_compression", "_pick_block_size", "_unsupported_on_platform"},
    ),
    ("crystal_vllm.vllm_ext.kv_spec", "CrystalAttentionSpec", set()),
    (
        "crystal_vllm.vllm_ext.kv_spec",
        "CrystalKVCacheManager",
        {"set_request_cap", "forget", "resident_tokens"},
    ),
    ("crystal_vllm.vllm_ext.scheduler", "CrystalScheduler", {"_set_cap"}),
    ("crystal_vllm.vllm_ext.backend", "CrystalAttentionMetadataBuilder", {"bind"}),
    ("crystal_vllm.vllm_ext.backend", "CrystalAttentionImpl", set()),
    ("crystal_vllm.vllm_ext.backend", "CrystalAttentionBackend", set()),
    ("crystal_vllm.vllm_ext.model_runner", "CrystalCPUWorker", {"crystal_kv_summary"}),
    ("crystal_vllm.vllm_ext.model_runner", "CrystalCPUModelRunner", RUNNER_OWN),
    ("crystal_vllm.vllm_ext.request_params", "KVRequestValidator", set()),
    ("crystal_vllm.vllm_ext.metrics", "CrystalKVStatLogger", set()),
    ("crystal_vllm.vllm_ext.backend_cuda", "CrystalCudaAttentionImpl", set()),
    ("crystal_vllm.vllm_ext.backend_cuda", "CrystalCudaAttentionBackend", set()),
    ("crystal_vllm.vllm_ext.model_runner_cuda", "CrystalGPUWorker", {"crystal_kv_summary"}),
    ("crystal_vllm.vllm_ext.model_runner_cuda", "CrystalGPUModelRunner", RUNNER_OWN),
]


def _resolve(module: str, attribute: str):
    """The object at ``module.attribute``; an attribute vLLM only sets on instances (a
    dataclass field without default, ``self.name = ...`` in a method) resolves to its
    class. Fails naming the symbol."""
    obj = importlib.import_module(module)
    parts = attribute.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif i == len(parts) - 1 and inspect.isclass(obj) and _set_on_instances(obj, part):
            return obj
        else:
            pytest.fail(f"{module}.{attribute} is gone (vLLM moved or renamed it)")
    return obj


def _set_on_instances(cls: type, name: str) -> bool:
    """Whether instances of vLLM class ``cls`` get attribute ``name``: a declared field
    (dataclass, msgspec or pydantic annotation) or an assignment ``self.name = ...`` in the
    source of ``cls`` or one of its bases."""
    assignment = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]+)?=(?!=)")
    for klass in cls.__mro__:
        if klass is object:
            continue
        if name in getattr(klass, "__annotations__", {}):
            return True
        if dataclasses.is_dataclass(klass) and name in {f.name for f in dataclasses.fields(klass)}:
            return True
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if assignment.search(source):
            return True
    return False


def _parameters(function) -> tuple[str, ...]:
    """Parameter names without ``self``/``cls`` (bound), ``*args`` and ``**kwargs`` marked."""
    names = []
    for i, p in enumerate(inspect.signature(function).parameters.values()):
        if i == 0 and p.name in ("self", "cls"):
            continue
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        names.append(prefix + p.name)
    return tuple(names)


def test_vllm_version_is_the_pinned_one() -> None:
    installed = importlib.import_module("vllm").__version__
    assert installed.split("+")[0] == VLLM_VERSION, (
        f"crystal_vllm.vllm_ext is written against vLLM {VLLM_VERSION}, found {installed}"
    )


@pytest.mark.parametrize(("module", "attribute"), SYMBOLS)
def test_symbol_exists(module: str, attribute: str) -> None:
    _resolve(module, attribute)


@pytest.mark.parametrize(("module", "attribute"), sorted(SIGNATURES))
def test_signature_is_the_pinned_one(module: str, attribute: str) -> None:
    found = _parameters(_resolve(module, attribute))
    expected = SIGNATURES[(module, attribute)]
    assert found == expected, (
        f"{module}.{attribute} changed its parameters: vLLM has {found}, crystal-vllm was "
        f"written against {expected}"
    )


def test_update_request_with_output_returns_tokens_and_stopped() -> None:
    """CrystalScheduler unpacks the result of the method it overrides."""
    from vllm.v1.core.sched.scheduler import Scheduler

    returns = inspect.signature(Scheduler._update_request_with_output).return_annotation
    assert str(returns).replace(" ", "") == "tuple[list[int],bool]", (
        f"Scheduler._update_request_with_output now returns {returns}, not (new_token_ids, stopped)"
    )


def _vllm_base(cls: type) -> type:
    """The first vLLM class in the MRO of crystal-vllm class ``cls``."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("vllm."):
            return klass
    raise AssertionError(f"{cls.__name__} subclasses no vLLM class")


def _own_members(cls: type) -> dict[str, object]:
    """Methods and properties defined by the crystal-vllm classes in the MRO of ``cls``."""
    members: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("crystal_vllm."):
            continue
        for name, value in vars(klass).items():
            if isinstance(value, (staticmethod, classmethod, property)) or inspect.isfunction(
                value
            ):
                if name.startswith("__") and name != "__init__":
                    continue
                if name == "__init__" and dataclasses.is_dataclass(klass):
                    continue  # generated from the fields
                members[name] = value
    return members


def _callable(member: object):
    return member.__func__ if isinstance(member, (staticmethod, classmethod)) else member


@pytest.mark.parametrize(
    ("module", "name", "own"), OVERRIDERS, ids=[name for _, name, _ in OVERRIDERS]
)
def test_overrides_match_vllm(module: str, name: str, own: set[str]) -> None:
    if module.endswith("_cuda"):
        pytest.importorskip("triton")
    cls = getattr(importlib.import_module(module), name)
    base = _vllm_base(cls)
    members = _own_members(cls)
    for attr, member in members.items():
        where = f"{name}.{attr}"
        if attr in own:
            assert not hasattr(base, attr), (
                f"{where} is crystal-vllm's own, but vLLM's {base.__name__} now has a "
                f"{attr} too, which it would override"
            )
            continue
        assert hasattr(base, attr), (
            f"{where} overrides vLLM's {base.__name__}.{attr}, which is gone (renamed?): "
            "the override is dead code now"
        )
        theirs = inspect.getattr_static(base, attr)
        if isinstance(member, property):
            assert isinstance(theirs, property), f"{where}: vLLM's is no longer a property"
            continue
        assert type(member) is type(theirs), (
            f"{where} is a {type(member).__name__}, vLLM's is a {type(theirs).__name__}"
        )
        ours = _parameters(_callable(member))
        vllm = _parameters(_callable(theirs))
        if any(p.startswith("*") for p in ours):  # forwards the rest
            named = tuple(p for p in ours if not p.startswith("*"))
            ok = vllm[: len(named)] == named
        else:
            ok = ours == vllm
        assert ok, f"{where} takes {ours}, vLLM's {base.__name__}.{attr} takes {vllm}"


def test_platform_plugin_entry_point_is_installed() -> None:
    from vllm.plugins import PLATFORM_PLUGINS_GROUP

    entry_points = importlib.metadata.entry_points(group=PLATFORM_PLUGINS_GROUP)
    assert "crystal_vllm" in {ep.name for ep in entry_points}


def test_logits_processor_entry_point_is_installed() -> None:
    from vllm.v1.sample.logits_processor import LOGITSPROCS_GROUP

    entry_points = importlib.metadata.entry_points(group=LOGITSPROCS_GROUP)
    assert "crystal_vllm" in {ep.name for ep in entry_points}


def test_stat_logger_entry_point_is_installed() -> None:
    """The metrics' front-end half (needs `make install` after pyproject.toml changed)."""
    from vllm.plugins import STAT_LOGGER_PLUGINS_GROUP

    entry_points = importlib.metadata.entry_points(group=STAT_LOGGER_PLUGINS_GROUP)
    assert "crystal_vllm" in {ep.name for ep in entry_points}


def test_scheduler_stats_carry_a_dict_of_ints() -> None:
    """metrics.py sends its numbers as extra ``str -> int`` entries of this field, the
    only free-form one that crosses vLLM's typed msgpack decoding of SchedulerStats."""
    from vllm.v1.metrics.stats import SchedulerStats

    field = {f.name: f for f in dataclasses.fields(SchedulerStats)}["num_kv_fetch_reqs_by_stage"]
    assert str(field.type).replace(" ", "") == "dict[str,int]", field.type


def test_collective_rpc_reaches_worker_methods() -> None:
    """``LLM.collective_rpc("crystal_kv_summary")`` runs ``run_method(wrapper, name, ...)``
    in each worker process, and the wrapper forwards unknown attributes to its worker."""
    from vllm.v1.serial_utils import run_method
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    class Worker:
        def crystal_kv_summary(self) -> str:
            return "summary"

    wrapper = object.__new__(WorkerWrapperBase)
    wrapper.worker = Worker()
    assert run_method(wrapper, "crystal_kv_summary", (), {}) == "summary"


def test_vllm_resolves_our_platform() -> None:
    from vllm.platforms import current_platform

    assert type(current_platform).__name__ == "CrystalCpuPlatform"


def test_every_rank_must_report_the_same_spec() -> None:
    """Tensor parallelism relies on vLLM refusing workers whose KV-cache specs differ, so
    every rank's ``CrystalAttentionSpec`` carries the same block cap."""
    import inspect

    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    source = inspect.getsource(get_kv_cache_configs)
    assert "merged_kv_cache_specs[layer_name] == layer_spec" in source
