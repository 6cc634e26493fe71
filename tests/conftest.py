"""Shared fixtures: one real vLLM engine per test session, small pipelines in tmp folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = Path(os.environ.get("FACTORY_HH_RLHF") or REPO.parent / "shared/data/hh-rlhf/harmless-base-test.dev.jsonl.gz")
ENGINE_KW = dict(seed=0, max_model_len=2048, kv_cache_gib=1.0)


SLOW_MARKERS = ("engine", "server", "train", "ray", "browser")
SLOW_FIXTURES = ("engine", "tiny", "vllm_server")  # start vLLM or load the embedded model's tokenizer


def pytest_collection_modifyitems(items):
    """The fast tier (`-m "not slow"`) leaves out every test that starts an engine, a server, Ray or a
    browser, loads a model or trains: marked by hand as ``slow``, by one of SLOW_MARKERS, or by using
    the session's real ``engine`` fixture."""
    for item in items:
        if any(item.get_closest_marker(m) for m in SLOW_MARKERS) or set(SLOW_FIXTURES) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def hh_rlhf() -> Path:
    """The shared human-label file (hh-rlhf). A test that needs it fails when it is missing, never
    skips: a wrong path must not give a green run full of skips. Use it as an argument, or mark a
    test or module with ``pytest.mark.usefixtures("hh_rlhf")`` and read :data:`HH_RLHF`."""
    if not HH_RLHF.is_file():
        pytest.fail(f"shared human labels not found at {HH_RLHF}; set FACTORY_HH_RLHF to the path of "
                    "harmless-base-test.dev.jsonl.gz (by default it is read from shared/data/hh-rlhf/ beside "
                    "the repository)", pytrace=False)
    return HH_RLHF


@pytest.fixture(scope="session")
def engine():
    """The real vLLM engine on the embedded model, started once (≈40 s on 2 CPU cores)."""
    from factory import models
    from factory.engines.vllm import VLLMEngine

    e = VLLMEngine(models.resolve(None), model_name="smollm2-135m", **ENGINE_KW)
    yield e
    e.close()


def write_pipeline(tmp: Path, *, prompts: list, name: str = "t", rounds: int = 1, extra: str = "",
                   engine: str = "vllm", max_tokens: int = 24, constitution: str | None = None) -> Path:
    """A small SL pipeline in ``tmp`` using the repo's templates and constitution."""
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    const = constitution or str(REPO / "constitutions/harmless.yaml")
    path = tmp / "pipeline.yaml"
    path.write_text(f"""name: {name}
prompts: {{path: {tmp / 'prompts.jsonl'}}}
constitution: {const}
templates: {{answer: {REPO}/prompts/answer.j2, critique: {REPO}/prompts/critique.j2, revise: {REPO}/prompts/revise.j2}}
model: smollm2-135m
engine: {{kind: {engine}, seed: 0, max_model_len: 2048{", kv_cache_gib: 1.0" if engine in ("vllm", "ray") else ""}}}
rounds: {rounds}
sampling:
  answer: {{max_tokens: {max_tokens}}}
  critique: {{max_tokens: {max_tokens}}}
  revise: {{max_tokens: {max_tokens}}}
db: {tmp / 'out.duckdb'}
chunk_rows: 4
{extra}""")
    return path


@pytest.fixture
def copy_constitution(tmp_path):
    def _copy(name: str = "harmless") -> Path:
        dst = tmp_path / f"{name}.yaml"
        shutil.copy(REPO / f"constitutions/{name}.yaml", dst)
        return dst
    return _copy
