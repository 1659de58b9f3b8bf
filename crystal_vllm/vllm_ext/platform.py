"""Platform subclasses: the hooks through which crystal-vllm enters vLLM.

vLLM calls a platform's ``pre_register_and_update(parser)`` while it builds the CLI
(where we add ``--kv-policy`` & co.) and ``check_and_update_config(vllm_config)`` in
every process that builds a ``VllmConfig`` (where the flags land in
``additional_config`` and are validated, and where unsupported combinations fail
closed before any model is loaded).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar

from vllm.platforms.cpu import CpuPlatform

from crystal_vllm.config import (
    DEFAULT_BUDGET,
    NO_POLICY,
    NO_THINK_TOKEN,
    SERVING_KEYS,
    CrystalKVConfig,
    parse_policy_config,
    policy_names,
)
from crystal_vllm.vllm_ext import get_logger

logger = get_logger(__name__)

WORKER_CLS = "crystal_vllm.vllm_ext.model_runner.CrystalCPUWorker"
SCHEDULER_CLS = "crystal_vllm.vllm_ext.scheduler.CrystalScheduler"
BACKEND_CLS = "crystal_vllm.vllm_ext.backend.CrystalAttentionBackend"

#: Values given on this process's command line, merged into ``additional_config``
#: by ``check_and_update_config`` (the CLI parser runs in the front-end process,
#: which is also where the ``VllmConfig`` that every other process receives is built).
_cli_values: dict[str, Any] = {}

#: This process's validated configuration, once check_and_update_config has run here.
_server_config: CrystalKVConfig | None = None

#: Why this server refuses ``prompt_logprobs`` (None: it serves them exactly).
_prompt_logprobs_refusal: str | None = None

ARG_GROUP = "CrystalKV"

THINK_END_TEXT = "</think>"


def server_config() -> CrystalKVConfig | None:
    """The configuration validated in this process (None before the config is built)."""
    return _server_config


def prompt_logprobs_refusal() -> str | None:
    """Why ``prompt_logprobs`` (and ``echo`` with logprobs) are refused here, or None."""
    return _prompt_logprobs_refusal


def _refuse_prompt_logprobs(policy: str, prompt: str | None, vllm_config) -> str | None:
    """A chunk after the first attends over what the earlier chunks kept: exact under
    prompt ``keep`` (nothing of the prompt is dropped), not under ``compress``/``evict``,
    whose later prompt positions would get the compressed model's log-probs. ``prompt``
    is the policy's prompt mode (None without a policy)."""
    if prompt in (None, "keep") or not vllm_config.scheduler_config.enable_chunked_prefill:
        return None
    return (
        f"prompt_logprobs are not exact under --kv-policy {policy} with prompt mode "
        f"{prompt!r} and chunked prefill (a later prompt chunk attends over the compressed "
        'prompt); start the server with --kv-policy-config \'{"prompt": "keep"}\' or '
        "--no-enable-chunked-prefill to get them"
    )


#: Namespace attribute holding the crystal-vllm flags given so far (dest -> value).
_GIVEN_FLAGS_ATTR = "_crystal_kv_flags"


def _additional_config_key(dest: str) -> str:
    return dest if dest.startswith("kv_") else f"kv_{dest}"


def _fold_flags(namespace: argparse.Namespace) -> None:
    """Put the flags given so far into ``namespace.additional_config``.

    Every process that rebuilds the engine config from the parsed arguments reads that
    field (``AsyncEngineArgs.from_cli_args``), among them the API-server processes of
    ``--api-server-count N``, which never run this parser. A flag and an
    ``--additional-config`` entry that disagree are an error.
    """
    given = getattr(namespace, _GIVEN_FLAGS_ATTR, None)
    if not given:
        return
    current = getattr(namespace, "additional_config", None)
    if isinstance(current, str):
        current = parse_policy_config(current)  # a JSON object, like the flag
    namespace.additional_config = _merge_flags(current or {}, given)


def _merge_flags(additional_config: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """``additional_config`` with ``flags`` (argparse dest -> value) folded in; a flag and
    an entry that disagree are an error rather than a silent precedence rule."""
    merged = dict(additional_config)
    for dest, value in flags.items():
        key = _additional_config_key(dest)
        if key == "kv_policy_config":
            value = parse_policy_config(value)
        if key in merged and merged[key] != value:
            raise ValueError(
                f"--{key.replace('_', '-')} {value!r} conflicts with additional_config "
                f"{key}={merged[key]!r}; give it once"
            )
        merged[key] = value
    return merged


class _StoreForAdditionalConfig(argparse.Action):
    """Store the flag normally, remember that the user gave it explicitly and fold it into
    ``additional_config`` (see :func:`_fold_flags`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _cli_values[self.dest] = values
        given = dict(getattr(namespace, _GIVEN_FLAGS_ATTR, None) or {})
        given[self.dest] = values
        setattr(namespace, _GIVEN_FLAGS_ATTR, given)
        try:
            _fold_flags(namespace)
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None


class _KeepsKVFlags(argparse.Action):
    """Mixed into vLLM's ``--additional-config`` action: a later ``--additional-config``
    replaces the whole dict, so the crystal-vllm flags given before it are folded in again."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        try:
            _fold_flags(namespace)
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None


def _keep_flags_across_additional_config(parser: argparse.ArgumentParser) -> None:
    action = parser._option_string_actions.get("--additional-config")
    if action is not None and not isinstance(action, _KeepsKVFlags):
        action.__class__ = type("AdditionalConfigKeepsKVFlags", (_KeepsKVFlags, type(action)), {})


def policy_config_keys_help() -> str:
    """The keys ``--kv-policy-config`` accepts, by policy, read from the policy configs (so
    the help cannot fall behind them); policies with the same keys share one entry."""
    from crystal_vllm.policy import POLICY_NAMES, policy_param_names

    by_keys: dict[tuple[str, ...], list[str]] = {}
    for name in POLICY_NAMES:
        by_keys.setdefault(tuple(sorted(policy_param_names(name))), []).append(name)
    entries = [
        f"{', '.join(names)}: {', '.join(keys) if keys else 'none'}"
        for keys, names in by_keys.items()
    ]
    return f"Keys by policy: {'; '.join(entries)}. Any policy: {', '.join(SERVING_KEYS)}."


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the crystal-vllm flags to ``vllm serve`` (idempotent: vLLM calls it repeatedly)."""
    _keep_flags_across_additional_config(parser)
    if any("--kv-policy" in action.option_strings for action in parser._actions):
        return
    group = parser.add_argument_group(
        ARG_GROUP,
        description="Crystal-KV answer-first KV-cache eviction (crystal-vllm plugin). "
        "See `--help=CrystalKV`.",
    )
    group.add_argument(
        "--kv-policy",
        action=_StoreForAdditionalConfig,
        default=NO_POLICY,
        choices=policy_names(),
        help="KV-cache eviction policy. 'none' (default) is vanilla vLLM; 'full' runs the "
        "crystal-vllm cache path without evicting; 'crystal' is Crystal-KV (attention-LRFU "
        "with top-p hits and adaptive layer/head budgets); 'crystal-lite' is Crystal-KV with "
        "uniform budgets; 'lru', 'streaming', 'h2o', 'snapkv', 'rkv' and 'random' are the "
        "baselines.",
    )
    group.add_argument(
        "--kv-budget",
        action=_StoreForAdditionalConfig,
        type=int,
        default=DEFAULT_BUDGET,
        help="Average number of KV entries kept per layer and KV head of each request "
        f"(an integer >= 1, default {DEFAULT_BUDGET}). Requests may ask for less with "
        "the per-request `kv_budget` extra argument.",
    )
    group.add_argument(
        "--kv-policy-config",
        action=_StoreForAdditionalConfig,
        type=str,
        default=None,
        help="JSON object with the policy's other parameters, e.g. "
        '\'{"top_p": 0.9, "lam": 0.6, "realloc_interval": 64}\'. Unknown keys are '
        f"rejected. {policy_config_keys_help()}",
    )


def merge_cli_values(additional_config: dict[str, Any]) -> dict[str, Any]:
    """``additional_config`` with this process's explicit flags folded in (see
    :func:`_merge_flags`)."""
    return _merge_flags(additional_config, _cli_values)


def _unsupported_reasons(vllm_config) -> list[str]:
    """Combinations the per-head cache path does not handle (yet)."""
    reasons = []
    model_config = vllm_config.model_config
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding")
    if model_config is not None:
        if getattr(model_config, "use_mla", False):
            reasons.append("MLA attention models")
        if model_config.get_sliding_window() is not None:
            reasons.append("sliding-window attention models")
        if model_config.is_hybrid:
            reasons.append("hybrid (Mamba/linear-attention) models")
        if model_config.is_encoder_decoder:
            reasons.append("encoder-decoder models")
    if vllm_config.cache_config.cache_dtype != "auto":
        reasons.append(
            f"quantised KV cache (--kv-cache-dtype {vllm_config.cache_config.cache_dtype})"
        )
    # A KV connector (disaggregated prefill, KV offloading, LMCache) moves vLLM's blocks in
    # vLLM's own layout; ours are per-(layer, KV head) head-blocks with evicted holes.
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        reasons.append("KV transfer/offloading connectors (--kv-transfer-config)")
    return reasons + _unsupported_parallelism(vllm_config.parallel_config)


def _unsupported_parallelism(parallel) -> list[str]:
    """Parallel layouts the per-head cache path does not handle.

    Tensor parallelism works: each rank holds, attends over and evicts its own KV heads
    (docs/serving.md, "Tensor parallelism"). Pipeline stages, context parallelism (a
    request's KV split by token across ranks, so one head's entries would live on several
    ranks) and data parallelism (several schedulers, never run with a policy) do not.
    """
    reasons = []
    if parallel.pipeline_parallel_size > 1:
        size = parallel.pipeline_parallel_size
        reasons.append(f"pipeline parallelism (--pipeline-parallel-size {size}; only 1)")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        size = getattr(parallel, name)
        if size > 1:
            flag = "--" + name.replace("_", "-")
            reasons.append(f"context parallelism ({flag} {size}; only 1)")
    if parallel.data_parallel_size > 1:
        reasons.append(
            f"data parallelism (--data-parallel-size {parallel.data_parallel_size}; only 1, "
            "tensor parallelism is supported)"
        )
    return reasons


def resolve_think_end_token(model_config) -> int:
    """The tokenizer's ``</think>`` id, or -1: resolved once so every process agrees."""
    if model_config is None:
        return NO_THINK_TOKEN
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer,
        revision=model_config.tokenizer_revision,
        trust_remote_code=model_config.trust_remote_code,
    )
    token = tokenizer.get_vocab().get(THINK_END_TEXT)
    if token is None:
        logger.info("crystal-vllm: no %s token: the whole generation is compressed", THINK_END_TEXT)
        return NO_THINK_TOKEN
    logger.info("crystal-vllm: think stage ends at %s (token %d)", THINK_END_TEXT, token)
    return token


def _unsupported_policy_options(config: CrystalKVConfig) -> list[str]:
    """Policy options the serving path cannot honour yet."""
    policy_config = config.make_policy().config
    reasons = []
    # The prefill replay observes the prompt before any head is full: hits recorded only
    # once full (the paper's listing) would need budgets there too.
    if not getattr(policy_config, "hits_before_full", True):
        reasons.append("hits_before_full=false")
    return reasons


class CrystalPlatformMixin:
    """Adds crystal-vllm to whichever built-in platform class it is mixed into."""

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        super().pre_register_and_update(parser)
        if parser is not None:
            add_cli_args(parser)

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        merged = merge_cli_values(dict(vllm_config.additional_config or {}))
        config = CrystalKVConfig.from_additional_config(merged)
        prompt = config.make_policy().config.prompt if config.enabled else None
        if config.enabled:
            reasons = (
                _unsupported_reasons(vllm_config)
                + cls._unsupported_on_platform(vllm_config)
                + _unsupported_policy_options(config)
            )
            if reasons:
                raise ValueError(
                    f"--kv-policy {config.policy!r} does not support {', '.join(reasons)}; "
                    "use --kv-policy none for this configuration"
                )
            if config.think_end_token is None:
                token = resolve_think_end_token(vllm_config.model_config)
                config = dataclasses.replace(config, think_end_token=token)
            vllm_config.additional_config = {**merged, **config.to_additional_config()}
            cls._configure_for_compression(vllm_config, prompt)
        global _server_config, _prompt_logprobs_refusal
        _server_config = config
        super().check_and_update_config(vllm_config)
        _prompt_logprobs_refusal = _refuse_prompt_logprobs(config.policy, prompt, vllm_config)
        if config.enabled:
            cls._pick_block_size(vllm_config.cache_config)

    @classmethod
    def _unsupported_on_platform(cls, vllm_config) -> list[str]:
        """Combinations this platform cannot serve with a policy (none in general)."""
        return []

    #: The block size a policy gets unless ``--block-size`` says otherwise (None: vLLM's).
    policy_block_size: ClassVar[int | None] = None

    @classmethod
    def _pick_block_size(cls, cache_config) -> None:
        """A request's cap is a whole number of blocks, so large blocks waste much of a
        small budget (budget 128 at vLLM's CPU default of 128 reserves 3 blocks = 384
        slots); the smallest block the backend takes wastes the least."""
        size = cls.policy_block_size
        if size is None or cache_config.user_specified_block_size:
            return
        if cache_config.block_size != size:
            logger.info(
                "crystal-vllm: block size %d instead of %d (a request's cap is whole blocks; "
                "--block-size overrides)",
                size,
                cache_config.block_size,
            )
            cache_config.block_size = size

    @classmethod
    def _configure_for_compression(cls, vllm_config, prompt: str) -> None:
        """Settings the per-head cache path relies on, each logged when it changes;
        ``prompt`` is the policy's prompt mode."""
        cache_config, scheduler_config = vllm_config.cache_config, vllm_config.scheduler_config
        if cache_config.enable_prefix_caching:
            if prompt == "keep":
                logger.info(
                    "crystal-vllm: prefix caching on: full prompt blocks are shared (prompt "
                    "mode 'keep' never evicts or moves them); generated entries stay private"
                )
            else:
                logger.info(
                    "crystal-vllm: prefix caching is off: prompt mode %r evicts prompt "
                    "entries, so prompt blocks are private (prompt mode 'keep' shares them)",
                    prompt,
                )
                cache_config.enable_prefix_caching = False
        # Chunked prefill stays as vLLM configured it: each chunk attends over what the
        # request holds and is compressed with it (docs/serving.md).
        if scheduler_config.scheduler_cls in (None, SCHEDULER_CLS):
            scheduler_config.scheduler_cls = SCHEDULER_CLS
        else:
            raise ValueError(
                f"--kv-policy needs scheduler class {SCHEDULER_CLS}, but --scheduler-cls is "
                f"{scheduler_config.scheduler_cls}"
            )
        if vllm_config.parallel_config.worker_cls in ("auto", WORKER_CLS):
            vllm_config.parallel_config.worker_cls = WORKER_CLS
        else:
            raise ValueError(
                f"--kv-policy needs worker class {WORKER_CLS}, but --worker-cls is "
                f"{vllm_config.parallel_config.worker_cls}"
            )

    @classmethod
    def register_custom_kv_cache_specs(cls, vllm_config) -> None:
        super().register_custom_kv_cache_specs(vllm_config)
        from vllm.v1.kv_cache_interface import FullAttentionSpec
        from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

        from crystal_vllm.vllm_ext.kv_spec import CrystalAttentionSpec, CrystalKVCacheManager

        KVCacheSpecRegistry.register(
            CrystalAttentionSpec, CrystalKVCacheManager, uniform_type_base_spec=FullAttentionSpec
        )

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        default = super().get_attn_backend_cls(
            selected_backend, attn_selector_config, *args, **kwargs
        )
        # Worker processes receive the VllmConfig pickled, without check_and_update_config
        # having run there: read the policy from the config being built.
        from vllm.config import get_current_vllm_config

        additional = get_current_vllm_config().additional_config or {}
        if additional.get("kv_policy", NO_POLICY) != NO_POLICY:
            return BACKEND_CLS
        return default


class CrystalCpuPlatform(CrystalPlatformMixin, CpuPlatform):
    """vLLM's CPU platform plus crystal-vllm."""

    # vLLM's CPU attention backend (which ours extends) takes multiples of 32.
    policy_block_size = 32

    @classmethod
    def _unsupported_on_platform(cls, vllm_config) -> list[str]:
        # vLLM 0.32's CPU platform has no Ray device key and its Ray executor schedules
        # workers by accelerator ids, so Ray fails later anyway: say so before loading.
        if vllm_config.parallel_config.use_ray:
            return [
                "--distributed-executor-backend ray on CPU (vLLM 0.32's CPU platform has no "
                "Ray support; use mp, the default, or a CUDA machine)"
            ]
        return []
