"""Start and stop a local ``vllm serve`` process (used by tests and benchmarks).

The server only ever binds to the loopback interface.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def vllm_executable() -> str:
    """The ``vllm`` console script of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name("vllm")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("vllm")
    if found is None:
        raise FileNotFoundError("no `vllm` executable next to the interpreter or on PATH")
    return found


@dataclass
class Server:
    """A running server: its base URL, process and log file."""

    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def serve(
    model: str | os.PathLike,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    startup_timeout: float = 300.0,
    log_path: Path | None = None,
) -> Iterator[Server]:
    """Run ``vllm serve MODEL ARGS`` on 127.0.0.1 until the block exits.

    Raises ``RuntimeError`` with the end of the server's log when it exits or does
    not become healthy within ``startup_timeout`` seconds.
    """
    port = port or free_port()
    base_url = f"http://{LOOPBACK}:{port}"
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [vllm_executable(), "serve", str(model), "--host", LOOPBACK, "--port", str(port)]
    cmd += list(args)
    logger.info("starting %s", " ".join(cmd))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = Server(base_url=base_url, process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(base_url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {process.returncode}:\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vllm serve not healthy after {startup_timeout:.0f} s:\n{server.log_tail()}"
                )
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
