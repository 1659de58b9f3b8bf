"""The tiny test model builds offline, loads in transformers, generates and is reused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crystal_vllm import models


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny(cache: Path) -> Path:
    return models.prepare_model("tiny", cache_dir=cache)


def test_tiny_loads_and_generates(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    assert model.dtype == torch.bfloat16
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 4, 2)
    assert cfg.head_dim == 64 and cfg.vocab_size == models.TINY_VOCAB_SIZE

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    # Special tokens are single ids, and text round-trips through the byte-level BPE.
    assert ids[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids[0]) == prompt
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)


def test_second_call_reuses_folder(cache: Path, tiny: Path) -> None:
    stamp = (tiny / "model.safetensors").stat().st_mtime_ns
    again = models.prepare_model("tiny", cache_dir=cache)
    assert again == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == stamp
    # No temporary build folders are left behind.
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-bf16"]


def test_float32_is_separate_folder_with_same_weights(cache: Path, tiny: Path) -> None:
    from safetensors.torch import load_file

    fp32 = models.prepare_model("tiny", cache_dir=cache, dtype="float32")
    assert fp32 != tiny and fp32.name == "tiny-fp32"
    w16 = load_file(tiny / "model.safetensors")
    w32 = load_file(fp32 / "model.safetensors")
    assert w16.keys() == w32.keys()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert w32[name].dtype == torch.float32
    assert torch.equal(w32[name].to(torch.bfloat16), w16[name])


def test_bad_arguments_name_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smollm2.*tiny"):
        models.prepare_model("gpt-5", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="float32"):
        models.prepare_model("tiny", cache_dir=tmp_path, dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.model_dir("smollm2") == tmp_path / "smollm2-bf16"


def test_failed_build_leaves_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(out: Path, dtype: str) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models, "_build_tiny", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        models.prepare_model("tiny", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_path_last(cache: Path, tiny: Path) -> None:
    cmd = [sys.executable, "-m", "crystal_vllm", "prepare-model", "tiny"]
    cmd += ["--cache-dir", str(cache)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == str(tiny)
