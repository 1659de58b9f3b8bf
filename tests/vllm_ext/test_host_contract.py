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
