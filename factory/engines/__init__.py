"""Engines (who answers). ``make_engine`` builds one from a pipeline's ``engine:`` section.

Each engine kind (``config.EngineSpec`` is a union with one settings model per kind) has one
builder registered under its name in ``BUILDERS``; a new kind is one settings model plus one
``@builder("name")`` function. Heavy imports (vllm, ray) happen inside the builders.
"""

from __future__ import annotations

from typing import Callable

from .base import Capabilities, Completion, Engine, EngineError, Request, Sampling

__all__ = ["BUILDERS", "Capabilities", "Completion", "Engine", "EngineError", "Request", "Sampling", "builder",
           "ensure_engine", "make_engine"]

BUILDERS: dict[str, Callable[..., Engine]] = {}


def builder(kind: str):
    """Register ``fn(spec, model) -> Engine`` as the builder of engine kind ``kind``."""

    def register(fn: Callable[..., Engine]) -> Callable[..., Engine]:
        BUILDERS[kind] = fn
        return fn

    return register


def make_engine(spec, model: str) -> Engine:
    """``spec`` is one member of config.EngineSpec; ``model`` the name from the pipeline (resolved here)."""
    try:
        build = BUILDERS[spec.kind]
    except KeyError:
        raise EngineError(f"engine kind '{spec.kind}' is not available in this build; "
                          f"known kinds: {', '.join(sorted(BUILDERS))}") from None
    return build(spec, model)


def _vllm_kwargs(spec, model: str) -> dict:
    """The offline vLLM settings shared by the ``vllm`` and ``ray`` kinds."""
    from .. import models

    return dict(model_path=models.resolve(model), model_name=model, seed=spec.seed, max_model_len=spec.max_model_len,
                gpu_memory_utilization=spec.gpu_memory_utilization, kv_cache_gib=spec.kv_cache_gib, dtype=spec.dtype,
                enforce_eager=spec.enforce_eager, enable_prefix_caching=spec.enable_prefix_caching,
                max_num_seqs=spec.max_num_seqs)


@builder("fake")
def _fake(spec, model: str) -> Engine:
    from .fake import FakeEngine

    return FakeEngine(model=model, seed=spec.seed, max_model_len=spec.max_model_len, latency_s=spec.latency_s)


@builder("reward_model")
def _reward_model(spec, model: str) -> Engine:
    from .reward_model import build

    return build(spec, model)


@builder("vllm")
def _vllm(spec, model: str) -> Engine:
    from .vllm import VLLMEngine

    kw = _vllm_kwargs(spec, model)
    return VLLMEngine(kw.pop("model_path"), **kw)


@builder("ray")
def _ray(spec, model: str) -> Engine:
    from .ray import RayEngine, vllm_factory

    kw = _vllm_kwargs(spec, model)
    factory = vllm_factory(kw.pop("model_path"), **kw)
    return RayEngine(factory, replicas=spec.replicas, num_cpus=spec.num_cpus, shard_dir=spec.shard_dir)


@builder("openai")
def _openai(spec, model: str) -> Engine:
    from .openai import OpenAIEngine, api_key_from_env

    return OpenAIEngine(
        spec.base_url, model, api_key=api_key_from_env(spec.api_key_env), seed=spec.seed,
        max_model_len=spec.max_model_len, max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s,
        max_retries=spec.max_retries, seed_per_request=spec.seed_per_request, scoring=spec.scoring,
        top_logprobs=spec.top_logprobs, prefill=spec.prefill, tokenizer=spec.tokenizer, model_id=spec.model_id,
    )


def ensure_engine(engine: Engine | None, spec, model: str, owned: list) -> Engine:
    """``engine`` when the caller passed one; else a new one from ``spec``, appended to ``owned`` so
    the function that built it closes it."""
    if engine is None:
        engine = make_engine(spec, model)
        owned.append(engine)
    return engine
