"""Engines (who answers). ``make_engine`` builds one from a pipeline's ``engine:`` section."""

from __future__ import annotations

from .base import Completion, Engine, Request, Sampling

__all__ = ["Completion", "Engine", "Request", "Sampling", "make_engine"]


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
    raise NotImplementedError(f"engine kind '{spec.kind}' is not available in this build yet")
