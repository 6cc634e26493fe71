"""Engines (who answers). ``make_engine`` builds one from a pipeline's ``engine:`` section."""

from __future__ import annotations

from .base import Completion, Engine, EngineError, Request, Sampling

__all__ = ["Completion", "Engine", "EngineError", "Request", "Sampling", "ensure_engine", "make_engine"]


def make_engine(spec, model: str) -> Engine:
    """``spec`` is a config.EngineSpec; ``model`` the name from the pipeline (resolved here)."""
    from .. import models

    if spec.kind == "fake":
        from .fake import FakeEngine

        return FakeEngine(model=model, seed=spec.seed, max_model_len=spec.max_model_len)
    if spec.kind == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(
            models.resolve(model), model_name=model, seed=spec.seed, max_model_len=spec.max_model_len,
            gpu_memory_utilization=spec.gpu_memory_utilization, kv_cache_gib=spec.kv_cache_gib, dtype=spec.dtype, enforce_eager=spec.enforce_eager,
            enable_prefix_caching=spec.enable_prefix_caching, max_num_seqs=spec.max_num_seqs,
        )
    if spec.kind == "openai":
        import os

        from .openai import OpenAIEngine

        if not spec.base_url:
            raise EngineError("engine.kind openai needs engine.base_url (e.g. http://127.0.0.1:8000/v1)")
        api_key = None
        if spec.api_key_env:
            api_key = os.environ.get(spec.api_key_env)
            if not api_key:
                raise EngineError(f"engine.api_key_env names ${spec.api_key_env}, which is not set")
        return OpenAIEngine(
            spec.base_url, model, api_key=api_key, seed=spec.seed, max_model_len=spec.max_model_len,
            max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s, max_retries=spec.max_retries,
            seed_per_request=spec.seed_per_request,
        )
    if spec.kind == "ray":
        from .ray import RayEngine, vllm_factory

        factory = vllm_factory(
            models.resolve(model), model_name=model, seed=spec.seed, max_model_len=spec.max_model_len,
            gpu_memory_utilization=spec.gpu_memory_utilization, kv_cache_gib=spec.kv_cache_gib, dtype=spec.dtype,
            enforce_eager=spec.enforce_eager,
            enable_prefix_caching=spec.enable_prefix_caching, max_num_seqs=spec.max_num_seqs,
        )
        return RayEngine(factory, replicas=spec.replicas, num_cpus=spec.num_cpus, shard_dir=spec.shard_dir)
    raise NotImplementedError(f"engine kind '{spec.kind}' is not available in this build yet")


def ensure_engine(engine: Engine | None, spec, model: str, owned: list) -> Engine:
    """``engine`` when the caller passed one; else a new one from ``spec``, appended to ``owned`` so
    the function that built it closes it."""
    if engine is None:
        engine = make_engine(spec, model)
        owned.append(engine)
    return engine
