"""``factory serve model``: the printed engine block, and one real vLLM server start and stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from factory.cli_serve import serve_app
from factory.config import EngineSettings
from factory.engines.serve import free_port

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_prints_an_engine_block_that_loads_and_the_working_cpu_flags():
    out = CliRunner().invoke(serve_app, ["model", "smollm2-135m", "--port", "8123", "--max-model-len", "1024",
                                         "--kv-cache-gib", "1.5", "--dry-run", "--", "--max-num-seqs", "8"])
    assert out.exit_code == 0, out.output
    data = yaml.safe_load(out.stdout)  # the whole output is YAML: the block plus comments
    engine = EngineSettings.model_validate(data).engine
    assert (engine.kind, engine.base_url, engine.max_model_len) == ("openai", "http://127.0.0.1:8123/v1", 1024)
    cmd = next(line for line in out.stdout.splitlines() if line.startswith("# command: ")).split()
    from factory.models import resolve

    assert cmd[cmd.index("--model") + 1] == resolve("smollm2-135m")
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(int(1.5 * 2**30))
    assert {"--enforce-eager", "--no-enable-chunked-prefill"} <= set(cmd)  # the CPU build's working flags
    assert cmd[-2:] == ["--max-num-seqs", "8"]  # after `--`: passed to vLLM unchanged


def test_an_unknown_model_is_an_error_that_names_it():
    out = CliRunner().invoke(serve_app, ["model", "no-such-model", "--port", "8123", "--dry-run"])
    assert out.exit_code == 2 and "no-such-model" in out.output and "Traceback" not in out.output


@pytest.mark.server
def test_serves_the_model_until_sigterm(tmp_path):
    import psutil

    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli_serve", "model", "smollm2-135m", "--port", str(port),
                             "--kv-cache-gib", "1"], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        served = None
        while time.monotonic() - start < 480 and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    served = [m["id"] for m in json.load(r)["data"]]
                    break
            except OSError:
                time.sleep(2)
        assert served is not None, (tmp_path / "serve.log").read_text()[-3000:]
        print(f"\nfactory serve model: /v1/models answered after {time.monotonic() - start:.1f} s")
        from factory.models import resolve

        assert served == [resolve("smollm2-135m")]
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "the server runs as a child process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running after SIGTERM: {alive}"
        block = yaml.safe_load(proc.stdout.read())  # stdout is the block alone: the server logs to stderr
        assert EngineSettings.model_validate(block).engine.base_url == f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
