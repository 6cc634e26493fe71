"""Pipeline YAML → validated config (pydantic, unknown keys are errors with file:line).

Paths inside a pipeline (prompts, constitution, templates, db) are relative to the working
directory the command runs in (the repository root in the README's examples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_serializer

from .decontam import DecontamSpec
from .dedup import DedupSpec
from .engines.base import Sampling
from .yamlconf import load_yaml_model


# Optional top-level sections that are part of a run's identity only when a pipeline uses them.
OPTIONAL_SECTIONS = ("dedup", "decontaminate")

# A run's name starts its run id and file names: letters, digits, ".", "_" and "-".
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="a short name for the run")]


class Strict(BaseModel):
    """A config model: unknown keys are errors. Keys added after files were written are listed in
    ``NEW_KEYS``: left at their default they are left out of the dump (the hashed snapshot), so a
    file that does not use them keeps its run id."""

    model_config = ConfigDict(extra="forbid")
    NEW_KEYS: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        d = handler(self)
        for k in self.NEW_KEYS:
            if k in d and getattr(self, k) == type(self).model_fields[k].default:
                del d[k]
        return d


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

    def expected_model(self, model: str) -> str | None:
        """What will answer, known without starting the engine (``Engine.model`` once started), or
        None where only the engine can say (a server's model id)."""
        return None


def _local_identity(model: str) -> str | None:
    """A local model's weights fingerprint, computed from its files (no engine started)."""
    from . import models

    try:
        return models.identity(model, models.resolve(model, pull=False))
    except (models.ModelError, OSError):
        return None


class FakeEngineSpec(EngineBase):
    kind: Literal["fake"] = "fake"
    latency_s: float = Field(0.0, ge=0, description="fake kind only: seconds each request takes (overlap benchmarks)")
    NEW_KEYS: ClassVar[tuple[str, ...]] = ("latency_s",)

    def expected_model(self, model: str) -> str | None:
        return model if model.startswith("fake:") else f"fake:{model}"
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

    def expected_model(self, model: str) -> str | None:
        return _local_identity(model)


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
    # issue 22: what the rows are keyed by when the server's id says nothing of its weights (a hosted model, a
    # folder elsewhere). Left out of the snapshot: it reaches the run id through the engine's identity.
    model_id: str | None = Field(None, exclude=True, min_length=1, max_length=200,
                                 description="the served model's identity for row keys, e.g. my-rm@2026-12-01 "
                                 "(default: the server's id, with a weights fingerprint when it is a local folder)")
    price: Price | None = price_field()


def _default_kind(value):
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": "vllm", **value}
    return value


# the reward-model kind's settings live beside its engine (imported here, after EngineBase, which it uses)
from .engines.reward_model import RewardModelEngineSpec  # noqa: E402

EngineSpec = Annotated[
    FakeEngineSpec | VLLMEngineSpec | RayEngineSpec | OpenAIEngineSpec | RewardModelEngineSpec,
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
        snap = json.loads(self.model_dump_json())
        for key in OPTIONAL_SECTIONS:  # dedup/decontaminate: part of the identity only when present
            if snap.get(key) is None:
                snap.pop(key, None)
        # few-shot settings are part of the identity only when used (0 = none: old run ids stay)
        if not snap.get("few_shot"):
            snap.pop("few_shot", None)
        if isinstance(snap.get("judge"), dict) and not snap["judge"].get("few_shot"):
            snap["judge"].pop("few_shot", None)
        return snap


class Pipeline(RunConfig):
    kind: Literal["sl"] = Field("sl", description="sl: critique→revise; prefs: AI preference labels")
    prompts: PromptSource
    templates: Templates = Templates()
    rounds: int = Field(1, ge=1, le=4, description="critique→revision rounds (1–4)")
    principles: PrincipleChoice = PrincipleChoice()
    sampling: StageSampling = StageSampling()
    few_shot: int = Field(0, ge=0, le=16, description="critique demonstrations from the constitution's `examples` "
                          "put before each critique and revision request (a seeded choice per prompt and round)")


def load_pipeline(path: str | Path) -> Pipeline:
    return load_yaml_model(path, Pipeline, what="pipeline")


# The prefs pipeline, its roles (policy, judges) and judge settings live in factory.roles; these names
# stay importable from here.
_MOVED = ("PairSource", "JudgeSpec", "JudgeOverride", "JudgeRole", "PolicyRole", "Role", "RolesMixin", "PrefsPipeline",
          "load_prefs_pipeline")


def __getattr__(name: str):
    if name in _MOVED:
        from . import roles

        return getattr(roles, name)
    raise AttributeError(f"module 'factory.config' has no attribute {name!r}")
