"""Pipeline YAML → validated config (pydantic, unknown keys are errors with file:line).

Paths inside a pipeline (prompts, constitution, templates, db) are relative to the working
directory the command runs in (the repository root in the README's examples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .decontam import DecontamSpec
from .dedup import DedupSpec
from .engines.base import Sampling
from .yamlconf import load_yaml_model


# Optional top-level sections that are part of a run's identity only when a pipeline uses them.
OPTIONAL_SECTIONS = ("dedup", "decontaminate")

# A run's name starts its run id and file names: letters, digits, ".", "_" and "-".
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="a short name for the run")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def local_source(what: str) -> AfterValidator:
    """A source path that names a local file must exist when the pipeline is loaded (an error at its
    line, before any engine starts); a Hugging Face dataset name is checked when it is opened."""
    def check(v: str | None) -> str | None:
        if v is not None:
            from .readers import SourceError, check_local  # pyarrow: only once a source is named

            try:
                check_local(v, what)
            except SourceError as e:
                raise ValueError(str(e)) from None
        return v
    return AfterValidator(check)


class PromptSource(Strict):
    path: Annotated[str, local_source("prompts")] = Field(description="a JSONL file (`prompt` or `messages` per line), a saved dataset folder, or a HF dataset name")
    field: str | None = Field(None, description="the record field holding the prompt, if not `prompt`/`messages`")
    split: str = "train"
    data_dir: str | None = None
    limit: int | None = Field(None, ge=1, description="use only the first N valid prompts")


# --- engine settings: one model per engine kind (a discriminated union on `kind`) ----------------
# A key that belongs to another kind (``base_url`` under ``kind: vllm``) is an error at its line;
# ``kind`` may be left out and then means ``vllm``. ``factory.engines.make_engine`` builds each kind
# with the builder registered under its name.

class Price(Strict):
    """What an engine's tokens cost, in $ per 1M tokens (issue 25: cost in summaries, status and cards)."""

    prompt: float = Field(ge=0, description="$ per 1M prompt tokens")
    completion: float = Field(ge=0, description="$ per 1M completion tokens")


def price_field():
    """``price:`` of every engine kind (declared last in each kind, so error messages list the kind's own
    keys first): left out of every dump, so never part of the run id or the stored engine settings."""
    return Field(None, exclude=True, description="$ per 1M tokens {prompt, completion}, for cost reports "
                 "(not part of the run id)")


class EngineBase(Strict):
    """What every engine kind has."""

    kind: str  # each kind narrows it to its own name (declared here so it is listed first)
    seed: int = Field(0, description="engine seed; applied by the engine and part of every content key")
    max_model_len: int = Field(2048, ge=64, description="context length (a server's own figure wins)")


class FakeEngineSpec(EngineBase):
    kind: Literal["fake"] = "fake"
    price: Price | None = price_field()


class VLLMEngineSpec(EngineBase):
    kind: Literal["vllm"] = "vllm"
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="on CPU: the share of RAM for the KV cache (0.3–0.4)")
    kv_cache_gib: float | None = Field(None, gt=0, description="explicit KV-cache size in GiB (CPU default: 2)")
    dtype: str = "auto"
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = Field(None, ge=1)
    price: Price | None = price_field()


class RayEngineSpec(VLLMEngineSpec):
    kind: Literal["ray"] = "ray"  # type: ignore[assignment]
    replicas: int = Field(1, ge=1)
    num_cpus: int | None = None
    shard_dir: str | None = Field(None, description="Ray workers write Parquet shards here (shared filesystem on a cluster)")


class OpenAIEngineSpec(EngineBase):
    """Any OpenAI-compatible endpoint: ``vllm serve``, SGLang, llama.cpp's server, a hosted API."""

    kind: Literal["openai"] = "openai"
    base_url: str = Field(description="the endpoint's base URL, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1")
    api_key_env: str | None = Field(None, description="the environment variable holding the API key (never the key itself)")
    max_concurrency: int = Field(32, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    seed_per_request: bool = Field(True, description="send engine.seed with each request (the server needs --no-enable-chunked-prefill on CPU)")
    scoring: Literal["auto", "token_ids", "top_k", "none"] = Field(
        "auto", description="how option log-probs are read: detected at start-up (auto), vLLM's logprob_token_ids "
        "(token_ids), the standard top_logprobs (top_k), or not at all (none: sampled verdicts only)")
    top_logprobs: int = Field(20, ge=1, description="k of the standard top_logprobs (20 is OpenAI's and vLLM's maximum)")
    prefill: Literal["auto", True, False] = Field(
        "auto", description="whether the endpoint continues a final assistant message (auto: detected at start-up)")
    tokenizer: str | None = Field(None, description="a local tokenizer folder for the served model (token ids without /tokenize)")
    price: Price | None = price_field()


def _default_kind(value):
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": "vllm", **value}
    return value


EngineSpec = Annotated[
    FakeEngineSpec | VLLMEngineSpec | RayEngineSpec | OpenAIEngineSpec,
    Field(discriminator="kind"),
    BeforeValidator(_default_kind),
]


class EngineSettings(Strict):
    """Engine settings on their own (a command's ``--engine`` option)."""

    engine: EngineSpec = VLLMEngineSpec()


class SamplingSpec(Strict):
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = []

    def to_sampling(self, n: int = 1) -> Sampling:
        return Sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, n=n, stop=tuple(self.stop))


class StageSampling(Strict):
    answer: SamplingSpec = SamplingSpec(max_tokens=192)
    critique: SamplingSpec = SamplingSpec(max_tokens=128)
    revise: SamplingSpec = SamplingSpec(max_tokens=192)


class Templates(Strict):
    answer: str = "prompts/answer.j2"
    critique: str = "prompts/critique.j2"
    revise: str = "prompts/revise.j2"


class PrincipleChoice(Strict):
    strategy: Literal["random", "round_robin", "all"] = Field(
        "random", description="how principles are picked per round: seeded random, round-robin, or all of them"
    )
    per_round: int = Field(1, ge=1, description="principles critiqued per round (ignored for `all`)")
    seed: int = 0
    only: list[str] | None = Field(None, description="restrict to these principle ids")


class RunConfig(Strict):
    """What every pipeline kind shares: its name, constitution, model, engine, database and chunking."""

    name: RunName
    constitution: str = Field(description="path to a constitution YAML (or a name in constitutions/)")
    model: str = Field("smollm2-135m", description="the embedded alias, a local folder or a hub id")
    engine: EngineSpec = VLLMEngineSpec()
    db: str = Field(description="the DuckDB file results go to")
    chunk_rows: int = Field(1024, ge=1, description="rows per write transaction (not part of the run id)")
    chunk_inputs: int = Field(1024, ge=1, description="input records per chunk: the unit of planning and of the "
                              "completion records that let a restart skip finished work (not part of the run id)")
    # issue 25: input screening (factory.dedup); left out of the snapshot when absent (run ids unchanged)
    dedup: DedupSpec | None = Field(None, description="skip duplicate and near-duplicate input rows (factory.dedup)")
    decontaminate: DecontamSpec | None = Field(None, description="skip input rows that overlap held-out sets")

    def snapshot(self) -> dict:
        d = json.loads(self.model_dump_json())
        for key in OPTIONAL_SECTIONS:
            if d.get(key) is None:
                d.pop(key, None)
        return d


class Pipeline(RunConfig):
    kind: Literal["sl"] = Field("sl", description="sl: critique→revise; prefs: AI preference labels")
    prompts: PromptSource
    templates: Templates = Templates()
    rounds: int = Field(1, ge=1, le=4, description="critique→revision rounds (1–4)")
    principles: PrincipleChoice = PrincipleChoice()
    sampling: StageSampling = StageSampling()


def load_pipeline(path: str | Path) -> Pipeline:
    return load_yaml_model(path, Pipeline, what="pipeline")


class PairSource(Strict):
    source: Literal["sample", "sl", "file"] = Field(
        description="sample: the policy samples n responses per prompt; sl: initial answer vs final revision of an "
        "SL run in the same db; file: pairs from JSONL / hh-rlhf")
    prompts: PromptSource | None = Field(None, description="prompts to sample responses for (source: sample)")
    n: int = Field(2, ge=2, le=8, description="responses sampled per prompt; every unordered pair is judged")
    sampling: SamplingSpec = SamplingSpec(max_tokens=128, temperature=1.0)
    run: str | None = Field(None, description="the SL run id to pair from (source: sl; default: every SL run in the db)")
    path: Annotated[str | None, local_source("pairs")] = Field(None, description="a pairs file or HF dataset (source: file)")
    format: Literal["auto", "hh-rlhf", "jsonl"] = "auto"
    split: str = "test"
    data_dir: str | None = None
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> "PairSource":
        if self.source == "sample" and self.prompts is None:
            raise ValueError("source 'sample' needs `prompts: {path: ...}`")
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs `path:` (a JSONL/hh-rlhf file or dataset name)")
        return self


class JudgeSpec(Strict):
    template: str = "prompts/judge.j2"
    mode: str = Field("logprob", description="a judge mode of factory.judges.MODES: logprob (one decode step), "
                      "cot (rationale first), vote (sampled verdicts, for endpoints without log-probs)")
    per_pair: int | None = Field(None, ge=1, description="principles judged per pair (seeded sample); default all")
    seed: int = 0
    options: list[str] = Field(["A", "B"], min_length=2, max_length=2)
    tie_eps: float = Field(0.05, ge=0, lt=0.5, description="|p - 0.5| below this is marked a tie (kept, not dropped)")
    clamp: tuple[float, float] | None = Field(None, description="clamp each judgement's probability (CoT: [0.2, 0.8])")
    calibrate: bool = Field(False, description="label with batch-calibrated probabilities (each principle and order's "
                            "mean P(first) divided out); raw and calibrated labels are both stored either way")
    weights: str | None = Field(None, description="a weight set fitted to human labels (`factory audit fit`) instead "
                                "of the constitution's weights")
    cot_max_tokens: int = Field(96, ge=8)
    cot_temperature: float = Field(0.0, ge=0)
    votes: int = Field(5, ge=1, le=64, description="vote mode: sampled verdicts per order")
    vote_temperature: float = Field(1.0, ge=0, description="vote mode: sampling temperature")
    vote_max_tokens: int = Field(3, ge=1, le=16, description="vote mode: tokens per sampled verdict")
    max_conversation_chars: int = Field(3000, ge=100, description="keep the last turns of long conversations")

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        from .judges import MODES

        if v not in MODES:
            raise ValueError(f"unknown judge mode '{v}'; use one of {', '.join(MODES)}")
        return v

    @field_validator("clamp")
    @classmethod
    def _clamp(cls, v):
        if v is not None and not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"clamp must satisfy 0 <= lo <= hi <= 1; got {list(v)}")
        return v


class PrefsPipeline(RunConfig):
    kind: Literal["prefs"]
    pairs: PairSource
    judge: JudgeSpec = JudgeSpec()
    answer_template: str = "prompts/answer.j2"
    model: str = Field("smollm2-135m", description="policy (for sampling) and feedback model")


def load_prefs_pipeline(path: str | Path) -> PrefsPipeline:
    return load_yaml_model(path, PrefsPipeline, what="pipeline")
