"""Engine settings per kind (config.EngineSpec, a discriminated union on `kind`) through yamlconf:
a key of another kind is an error at its line; each kind is built by its registered builder."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from factory.config import (EngineSpec, FakeEngineSpec, OpenAIEngineSpec, Pipeline, RayEngineSpec, VLLMEngineSpec,
                            load_pipeline)
from factory.engines import BUILDERS, EngineError, make_engine
from factory.yamlconf import ConfigError

HEAD = """\
name: t
prompts: {path: p.jsonl}
constitution: c.yaml
db: out.duckdb
"""  # the engine section starts on line 5


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Pipeline paths are relative to the working directory; the prompts file must exist to load."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").touch()


def load(tmp_path, engine: str) -> Pipeline:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + engine)
    return load_pipeline(path)


def fail(tmp_path, engine: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, engine)
    return info.value


@pytest.mark.parametrize("section, cls", [
    ("engine: {kind: fake, seed: 3}\n", FakeEngineSpec),
    ("engine: {kind: vllm, kv_cache_gib: 1.5, max_num_seqs: 8}\n", VLLMEngineSpec),
    ("engine: {seed: 2, dtype: bfloat16}\n", VLLMEngineSpec),  # no kind: vllm, as before
    ("engine: {kind: ray, replicas: 2, kv_cache_gib: 1.0}\n", RayEngineSpec),
    ("engine: {kind: openai, base_url: 'http://h:8000/v1', scoring: top_k, top_logprobs: 5, prefill: false}\n",
     OpenAIEngineSpec),
])
def test_each_kind_loads_into_its_own_settings(tmp_path, section, cls):  # (a parameter named `engine` would mark it slow)
    spec = load(tmp_path, section).engine
    assert type(spec) is cls and spec.kind == cls.model_fields["kind"].default
    assert isinstance(spec.seed, int) and spec.max_model_len == 2048  # every kind keeps seed and max_model_len


def test_default_engine_is_vllm(tmp_path):
    assert type(load(tmp_path, "").engine) is VLLMEngineSpec


def test_openai_settings_values(tmp_path):
    spec = load(tmp_path, "engine:\n  kind: openai\n  base_url: https://api.example.com/v1\n  api_key_env: EX_KEY\n").engine
    assert (spec.scoring, spec.top_logprobs, spec.prefill, spec.api_key_env) == ("auto", 20, "auto", "EX_KEY")


def test_key_of_another_kind_is_an_error_at_its_line(tmp_path):
    e = fail(tmp_path, "engine:\n  kind: vllm\n  seed: 1\n  base_url: http://h:8000/v1\n")
    assert (e.line, e.col) == (8, 3) and len(e.issues) == 1  # one error: only the vllm member's, not all four kinds'
    assert "unknown key 'base_url' (`base_url` belongs to kind: openai, not kind: vllm)" in e.message
    assert "allowed keys: kind, seed, max_model_len, gpu_memory_utilization" in e.message and "replicas" not in e.message


def test_key_of_another_kind_without_kind_written(tmp_path):
    e = fail(tmp_path, "engine:\n  seed: 1\n  replicas: 4\n")
    assert (e.line, e.col) == (7, 3) and "`replicas` belongs to kind: ray, not kind: vllm" in e.message


def test_vllm_key_under_openai_names_both_kinds_that_have_it(tmp_path):
    e = fail(tmp_path, "engine:\n  kind: openai\n  base_url: http://h/v1\n  kv_cache_gib: 2\n")
    assert (e.line, e.col) == (8, 3)
    assert "`kv_cache_gib` belongs to kind: vllm / kind: ray, not kind: openai" in e.message
    assert "allowed keys: kind, seed, max_model_len, base_url, api_key_env" in e.message


def test_unknown_kind_missing_base_url_and_bad_values_point_at_their_lines(tmp_path):
    e = fail(tmp_path, "engine:\n  kind: vlm\n")
    assert (e.line, e.col) == (6, 9) and "`engine.kind` must be one of 'fake', 'vllm', 'ray', 'openai', 'reward_model'; got 'vlm'" in e.message
    e = fail(tmp_path, "engine:\n  kind: openai\n  seed: 1\n")
    assert (e.line, e.col) == (6, 3) and "`engine` has no `base_url`; add the endpoint's base URL" in e.message
    e = fail(tmp_path, "engine:\n  kind: openai\n  base_url: u\n  scoring: topk\n  max_concurrency: 0\n")
    assert [(i.line, i.col) for i in e.issues] == [(8, 12), (9, 20)]
    assert "`engine.scoring` must be one of 'auto', 'token_ids', 'top_k' or 'none'; got 'topk'" in e.issues[0].message
    assert "`engine.max_concurrency` must be at least 1; got 0" in e.issues[1].message
    e = fail(tmp_path, "engine: 3\n")
    assert (e.line, e.col) == (5, 9) and "must be a mapping" in e.message


def test_engine_spec_is_a_union_other_code_can_validate():
    spec = TypeAdapter(EngineSpec).validate_python({"kind": "openai", "base_url": "http://h/v1"})
    assert isinstance(spec, OpenAIEngineSpec)
    assert isinstance(TypeAdapter(EngineSpec).validate_python({}), VLLMEngineSpec)


def test_every_kind_has_one_builder():
    from factory.engines.reward_model import RewardModelEngineSpec

    kinds = {m.model_fields["kind"].default for m in (FakeEngineSpec, VLLMEngineSpec, RayEngineSpec, OpenAIEngineSpec,
                                                      RewardModelEngineSpec)}
    assert set(BUILDERS) == kinds
    eng = make_engine(FakeEngineSpec(seed=4), "alias")
    assert (eng.seed, eng.max_model_len) == (4, 2048)


def test_unregistered_kind_is_a_clear_error():
    class Odd(FakeEngineSpec):
        kind: str = "odd"

    with pytest.raises(EngineError, match="engine kind 'odd' is not available in this build; known kinds: fake, openai, ray, reward_model, vllm"):
        make_engine(Odd(), "m")
