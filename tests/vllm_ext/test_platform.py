"""The platform hooks: CLI flags, config merging and fail-closed startup checks."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

from crystal_vllm.vllm_ext import platform as crystal_platform


@pytest.fixture(autouse=True)
def _clean_cli_values():
    crystal_platform._cli_values.clear()
    yield
    crystal_platform._cli_values.clear()


def _parse(argv: list[str]):
    parser = FlexibleArgumentParser()
    crystal_platform.add_cli_args(parser)
    crystal_platform.add_cli_args(parser)  # vLLM calls the hook several times
    return parser.parse_args(argv)


def test_flags_parse_and_are_remembered() -> None:
    args = _parse(["--kv-policy", "crystal", "--kv-budget", "128"])
    assert args.kv_policy == "crystal"
    assert args.kv_budget == 128
    merged = crystal_platform.merge_cli_values({"other_plugin": 1})
    assert merged == {"other_plugin": 1, "kv_policy": "crystal", "kv_budget": 128}


def test_defaults_are_not_forced_into_additional_config() -> None:
    args = _parse([])
    assert args.kv_policy == "none"
    assert crystal_platform.merge_cli_values({"kv_policy": "full"}) == {"kv_policy": "full"}


def test_unknown_policy_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse(["--kv-policy", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_conflicting_flag_and_additional_config_is_an_error() -> None:
    _parse(["--kv-budget", "64"])
    with pytest.raises(ValueError, match="conflicts with additional_config kv_budget=32"):
        crystal_platform.merge_cli_values({"kv_budget": 32})


def test_policy_config_flag_is_parsed_as_json() -> None:
    _parse(["--kv-policy-config", '{"lam": 0.5}'])
    assert crystal_platform.merge_cli_values({}) == {"kv_policy_config": {"lam": 0.5}}


def test_policy_config_help_lists_every_accepted_key() -> None:
    """The help is generated from the policy configs, so it names exactly the keys each
    policy accepts, plus the serving keys."""
    from crystal_vllm.config import SERVING_KEYS
    from crystal_vllm.policy import POLICY_NAMES, policy_param_names

    parser = FlexibleArgumentParser()
    crystal_platform.add_cli_args(parser)
    (action,) = [a for a in parser._actions if "--kv-policy-config" in a.option_strings]
    by_policy, _, serving = action.help.partition("Keys by policy: ")[2].partition(". Any policy: ")
    assert serving.rstrip(".").split(", ") == list(SERVING_KEYS)
    listed = {}
    for entry in by_policy.split("; "):
        names, _, keys = entry.partition(": ")
        for name in names.split(", "):
            listed[name] = set() if keys == "none" else set(keys.split(", "))
    assert listed == {name: policy_param_names(name) for name in POLICY_NAMES}
    assert "hits_before_full" in listed["crystal"]
    assert "%" not in action.help  # argparse %-formats help strings
    parser.format_help()


def _engine_config(model, **additional):
    return EngineArgs(
        model=str(model), enforce_eager=True, max_model_len=512, additional_config=additional
    ).create_engine_config()


def test_vanilla_config_passes_through(tiny_model) -> None:
    config = _engine_config(tiny_model)
    assert config.additional_config in ({}, None) or "kv_policy" not in config.additional_config


@pytest.mark.parametrize(
    ("additional", "message"),
    [
        ({"kv_budget": 0, "kv_policy": "crystal"}, r"--kv-budget 0 is invalid"),
        ({"kv_policy": "crystl"}, r"'crystl' is not a known policy"),
        ({"kv_policy": "crystal", "kv_policy_config": {"top_p": 2}}, r"top_p"),
    ],
)
def test_bad_values_refuse_to_build_the_engine_config(tiny_model, additional, message) -> None:
    with pytest.raises(ValueError, match=message):
        _engine_config(tiny_model, **additional)


#: Ray on CPU: with ray installed (the `ray` extra) the plugin refuses it; without ray,
#: vLLM's own config check refuses it first (CI installs no extras).
RAY_ON_CPU = (
    r"does not support --distributed-executor-backend ray on CPU"
    if importlib.util.find_spec("ray") is not None
    else r"Failed to import Ray"
)


@pytest.mark.parametrize(
    ("engine_kwargs", "policy_config", "reason"),
    [
        ({"kv_cache_dtype": "fp8"}, {}, "quantised KV cache"),
        ({"pipeline_parallel_size": 2}, {}, r"pipeline parallelism \(--pipeline-parallel-size 2"),
        ({"data_parallel_size": 2}, {}, r"data parallelism \(--data-parallel-size 2"),
        (
            {"tensor_parallel_size": 4, "decode_context_parallel_size": 2},
            {},
            r"context parallelism \(--decode-context-parallel-size 2",
        ),
        ({"distributed_executor_backend": "ray"}, {}, RAY_ON_CPU),
        ({}, {"hits_before_full": False}, "hits_before_full=false"),
    ],
)
def test_unsupported_combinations_fail_closed(
    tiny_model, engine_kwargs, policy_config, reason
) -> None:
    args = EngineArgs(
        model=str(tiny_model),
        enforce_eager=True,
        max_model_len=512,
        additional_config={"kv_policy": "crystal", "kv_policy_config": policy_config},
        **engine_kwargs,
    )
    pattern = reason if reason == RAY_ON_CPU else f"does not support {reason}"
    with pytest.raises(ValueError, match=pattern):
        args.create_engine_config()


def test_a_policy_gets_small_blocks_unless_the_user_sets_them(tiny_model) -> None:
    assert _engine_config(tiny_model).cache_config.block_size == 128  # vLLM's CPU default
    config = _engine_config(tiny_model, kv_policy="crystal", kv_budget=64)
    assert config.cache_config.block_size == 32
    chosen = EngineArgs(
        model=str(tiny_model),
        enforce_eager=True,
        max_model_len=512,
        block_size=64,
        additional_config={"kv_policy": "crystal", "kv_budget": 64},
    ).create_engine_config()
    assert chosen.cache_config.block_size == 64


@pytest.mark.parametrize("prompt", ["keep", "compress", "evict"])
def test_prefix_caching_stays_on_only_for_a_kept_prompt(tiny_model, prompt) -> None:
    """Only a prompt that is never evicted or compressed can be shared."""
    vanilla = _engine_config(tiny_model)
    assert vanilla.cache_config.enable_prefix_caching
    config = _engine_config(
        tiny_model, kv_policy="crystal", kv_budget=64, kv_policy_config={"prompt": prompt}
    )
    assert config.cache_config.enable_prefix_caching == (prompt == "keep")


def test_compression_keeps_chunked_prefill(tiny_model) -> None:
    vanilla = _engine_config(tiny_model)
    config = _engine_config(tiny_model, kv_policy="crystal", kv_budget=64)
    assert not config.cache_config.enable_prefix_caching  # crystal compresses its prompt
    # Chunked prefill is left as vLLM configured it (each chunk is compressed on arrival).
    assert (
        config.scheduler_config.enable_chunked_prefill
        == vanilla.scheduler_config.enable_chunked_prefill
    )
    assert (
        config.scheduler_config.max_num_batched_tokens
        == vanilla.scheduler_config.max_num_batched_tokens
    )
    assert config.parallel_config.worker_cls == crystal_platform.WORKER_CLS
    assert config.scheduler_config.scheduler_cls == crystal_platform.SCHEDULER_CLS
    assert config.additional_config["kv_budget"] == 64


def _parse_with_engine_args(argv: list[str]):
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    crystal_platform.add_cli_args(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("flags_first", [True, False])
def test_flags_reach_processes_that_rebuild_the_config_from_the_arguments(
    flags_first: bool,
) -> None:
    """The API servers of --api-server-count N rebuild the config from the parsed
    arguments (EngineArgs.from_cli_args) without running our flag actions: the flags must
    be in additional_config, whatever the order of --additional-config."""
    flags = ["--kv-policy", "crystal", "--kv-budget", "64", "--kv-policy-config", '{"lam": 0.5}']
    other = ["--additional-config", '{"other_plugin": 1}']
    args = _parse_with_engine_args(flags + other if flags_first else other + flags)
    # from_cli_args copies every EngineArgs field from the namespace.
    assert "additional_config" in {f.name for f in dataclasses.fields(EngineArgs)}
    assert args.additional_config == {
        "other_plugin": 1,
        "kv_policy": "crystal",
        "kv_budget": 64,
        "kv_policy_config": {"lam": 0.5},
    }


@pytest.mark.parametrize("flags_first", [True, False])
def test_flag_and_additional_config_disagreeing_is_an_argparse_error(flags_first, capsys) -> None:
    flags = ["--kv-budget", "64"]
    other = ["--additional-config", '{"kv_budget": 32}']
    with pytest.raises(SystemExit):
        _parse_with_engine_args(flags + other if flags_first else other + flags)
    assert "--kv-budget 64 conflicts with additional_config kv_budget=32" in capsys.readouterr().err


def test_bad_policy_config_json_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse_with_engine_args(["--kv-policy-config", "{lam: 1}"])
    assert "--kv-policy-config '{lam: 1}' is not valid JSON" in capsys.readouterr().err


def _fake_vllm_config(**changes):
    """A stand-in for the VllmConfig fields ``_unsupported_reasons`` reads, vanilla values."""
    from types import SimpleNamespace

    model = SimpleNamespace(
        use_mla=False,
        get_sliding_window=lambda: None,
        is_hybrid=False,
        is_encoder_decoder=False,
    )
    config = SimpleNamespace(
        model_config=model,
        speculative_config=None,
        kv_transfer_config=None,
        cache_config=SimpleNamespace(cache_dtype="auto"),
        parallel_config=SimpleNamespace(
            pipeline_parallel_size=1,
            tensor_parallel_size=1,
            data_parallel_size=1,
            decode_context_parallel_size=1,
            prefill_context_parallel_size=1,
        ),
    )
    for path, value in changes.items():
        target = config
        *parents, name = path.split("__")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    return config


def test_a_vanilla_configuration_has_nothing_to_refuse() -> None:
    assert crystal_platform._unsupported_reasons(_fake_vllm_config()) == []
    tensor_parallel = _fake_vllm_config(parallel_config__tensor_parallel_size=4)
    assert crystal_platform._unsupported_reasons(tensor_parallel) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"speculative_config": object()}, "speculative decoding"),
        ({"model_config__use_mla": True}, "MLA attention models"),
        ({"model_config__get_sliding_window": lambda: 4096}, "sliding-window attention"),
        ({"model_config__is_hybrid": True}, "hybrid (Mamba/linear-attention) models"),
        ({"model_config__is_encoder_decoder": True}, "encoder-decoder models"),
        (
            {"cache_config__cache_dtype": "fp8_e4m3"},
            "quantised KV cache (--kv-cache-dtype fp8_e4m3)",
        ),
        ({"kv_transfer_config": object()}, "KV transfer/offloading connectors"),
        ({"parallel_config__pipeline_parallel_size": 2}, "pipeline parallelism"),
        ({"parallel_config__data_parallel_size": 2}, "data parallelism"),
        ({"parallel_config__prefill_context_parallel_size": 2}, "context parallelism"),
    ],
)
def test_each_feature_the_eviction_path_cannot_honour_is_named(change, reason) -> None:
    (found,) = crystal_platform._unsupported_reasons(_fake_vllm_config(**change))
    assert reason in found


def test_refusal_names_the_policy_and_the_way_out(tiny_model) -> None:
    args = EngineArgs(
        model=str(tiny_model),
        enforce_eager=True,
        max_model_len=512,
        kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"},
        additional_config={"kv_policy": "h2o"},
    )
    with pytest.raises(ValueError, match=r"--kv-policy 'h2o' does not support KV transfer.*"):
        args.create_engine_config()
    # The message ends with what to do instead.
    with pytest.raises(ValueError, match="use --kv-policy none for this configuration"):
        args.create_engine_config()


def test_tensor_parallelism_is_accepted_with_a_policy(tiny_model) -> None:
    config = EngineArgs(
        model=str(tiny_model),
        enforce_eager=True,
        max_model_len=512,
        tensor_parallel_size=2,
        additional_config={"kv_policy": "crystal", "kv_budget": 64},
    ).create_engine_config()
    assert config.parallel_config.tensor_parallel_size == 2
    assert config.parallel_config.worker_cls == crystal_platform.WORKER_CLS


def test_first_kv_head_splits_or_replicates_like_vllm() -> None:
    from crystal_vllm.vllm_ext.runner_mixin import first_kv_head

    assert [first_kv_head(8, 4, r) for r in range(4)] == [0, 2, 4, 6]  # 2 heads per rank
    assert [first_kv_head(2, 4, r) for r in range(4)] == [0, 0, 1, 1]  # each head on 2 ranks
    assert first_kv_head(2, 1, 0) == 0
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        first_kv_head(4, 2, 2)
    with pytest.raises(ValueError, match="6 KV heads cannot be split over 4"):
        first_kv_head(6, 4, 0)
