"""Roles in a pipeline, and how a judge judges.

A ``prefs`` pipeline can name ``policy:`` (who samples the pairs) and ``judges:`` (who labels: a
panel), each with its own ``model`` and ``engine`` of any kind; an ``audit`` pipeline can name
``judges:``. Left out, the top-level ``model``/``engine`` answers every role (one judge, called
``judge``), and the file's run id is what it always was: the new keys are left out of the hashed
snapshot when unused. ``judge:`` holds the settings every judge shares plus one settings model per
judge mode (:mod:`factory.judge_settings`); a judge entry may replace its mode settings
(``judge: {mode: vote}``). :class:`Role` is a resolved role: what the run lifecycle builds an
engine for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, Field, create_model, field_validator, model_serializer, model_validator

from .config import EngineSpec, PromptSource, RunConfig, SamplingSpec, Strict, local_source
from .judge_settings import LEGACY_FLAT, MODE_SETTINGS, flat_keys
from .yamlconf import ErrorAt, load_yaml_model


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


class _JudgeBase(Strict):
    template: str = "prompts/judge.j2"
    mode: str = Field("logprob", description="a judge mode of factory.judges.MODES: logprob (one decode step), "
                      "cot (rationale first), vote (sampled verdicts, for endpoints without log-probs), "
                      "reward_model (a reward-model engine's pairwise score)")
    per_pair: int | None = Field(None, ge=1, description="principles judged per pair (seeded sample); default all")
    seed: int = 0
    options: list[str] = Field(["A", "B"], min_length=2, max_length=2)
    tie_eps: float = Field(0.05, ge=0, lt=0.5, description="|p - 0.5| below this is marked a tie (kept, not dropped)")
    clamp: tuple[float, float] | None = Field(None, description="clamp each judgement's probability (CoT: [0.2, 0.8])")
    calibrate: bool = Field(False, description="label with batch-calibrated probabilities (each principle and order's "
                            "mean P(first) divided out); raw and calibrated labels are both stored either way")
    weights: str | None = Field(None, description="a weight set fitted to human labels (`factory audit fit`) instead "
                                "of the constitution's weights")
    max_conversation_chars: int = Field(3000, ge=100, description="keep the last turns of long conversations")
    few_shot: int = Field(0, ge=0, le=16, description="comparison demonstrations from the constitution's `examples` "
                          "put before each judge request, each in both orders (a seeded choice per pair)")

    @model_validator(mode="before")
    @classmethod
    def _nest_flat(cls, data: Any) -> Any:
        """Flat ``cot_*``/``vote_*`` keys (files written before settings were per mode) → ``cot:``/``vote:``."""
        if isinstance(data, dict):
            flat = flat_keys()
            if any(k in flat for k in data):
                data = dict(data)
                for k in [k for k in data if k in flat]:
                    mode, f = flat[k]
                    sub = data.get(mode)
                    if sub is not None and not isinstance(sub, dict):
                        continue  # let validation report the bad value
                    data[mode] = {f: data.pop(k), **(sub or {})}  # a nested value wins over a flat one
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """The hashed snapshot keeps the flat legacy keys; other modes' settings only when not default."""
        d = handler(self)
        for mode, cls in MODE_SETTINGS.items():
            sub = d.pop(mode, None)
            if mode in LEGACY_FLAT:
                d.update({LEGACY_FLAT[mode][f]: v for f, v in (sub or {}).items()})
            elif sub is not None and getattr(self, mode) != cls():
                d[mode] = sub
        return d

    def settings_for(self, mode: str) -> BaseModel:
        """Judge mode ``mode``'s own settings model."""
        return getattr(self, mode)

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


# ``judge:``: the shared settings plus one settings model per mode (``judge.cot``, ``judge.vote`` …)
JudgeSpec = create_model("JudgeSpec", __base__=_JudgeBase, __doc__="How pairs are judged (the `judge:` section).",
                         **{m: (cls, cls()) for m, cls in MODE_SETTINGS.items()})


class JudgeOverride(Strict):
    """A judge's own judge-mode settings (``judges: [{name, …, judge: {mode: vote}}]``): the run's
    ``judge:`` section with these keys replaced. What makes the label (tie band, weights, principles
    per pair) stays the run's."""

    mode: str | None = None
    template: str | None = None
    options: list[str] | None = Field(None, min_length=2, max_length=2)
    max_conversation_chars: int | None = Field(None, ge=100)
    cot: dict | None = None
    vote: dict | None = None
    reward_model: dict | None = None


JudgeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="a short name for the judge")]


class PolicyRole(Strict):
    """Who samples the pairs (``pairs.source: sample``)."""

    model: str | None = Field(None, description="the policy model (default: the top-level `model`)")
    engine: EngineSpec | None = Field(None, description="its engine (default: the top-level `engine`)")


class JudgeRole(Strict):
    """One member of the panel that labels the pairs."""

    name: JudgeName
    model: str | None = Field(None, description="the judge model (default: the top-level `model`)")
    engine: EngineSpec | None = Field(None, description="its engine (default: the top-level `engine`)")
    kind: Literal["reward_model"] | None = Field(None, description="reward_model: a sequence-classifier folder "
                                                 "scored with transformers (short for engine: {kind: reward_model})")
    weight: float = Field(1.0, gt=0, description="the judge's weight in the panel label (equal by default)")
    judge: JudgeOverride | None = Field(None, description="this judge's own judge-mode settings")

    @model_validator(mode="after")
    def _kind(self) -> "JudgeRole":
        if self.kind and self.engine is not None and self.engine.kind != self.kind:
            raise ValueError(f"judge '{self.name}': kind {self.kind} and engine kind {self.engine.kind} disagree; "
                             "give one of them")
        return self


def _unique_judges(judges: list[JudgeRole] | None) -> list[JudgeRole] | None:
    seen: dict[str, int] = {}
    for i, j in enumerate(judges or []):
        if j.name in seen:
            raise ErrorAt((i, "name"), f"duplicate judge name '{j.name}' (already judge #{seen[j.name] + 1}); "
                                       "give every judge a unique name")
        seen[j.name] = i
    return judges


class Role(BaseModel):
    """A resolved role: who answers (model + engine settings) and, for a judge, how it judges."""

    name: str
    model: str
    engine: Any
    weight: float = 1.0
    judge: Any = None  # the effective JudgeSpec of a judge

    def engine_key(self) -> str:
        """Roles with the same key share one engine."""
        return json.dumps([self.model, self.engine.model_dump(mode="json")], sort_keys=True)


class RolesMixin(BaseModel):
    """``judges:`` (and, for prefs, ``policy:``): who answers which requests. Left out, the top-level
    ``model``/``engine`` answers every role and the one judge is called ``judge``."""

    judges: Annotated[list[JudgeRole] | None, AfterValidator(_unique_judges)] = Field(
        None, description="the judges that label (a panel); [] = sample only, judge later")

    def judge_roles(self) -> list[Role]:
        if self.judges is None:
            return [Role(name="judge", model=self.model, engine=self.engine, judge=self.judge)]
        out = []
        for j in self.judges:
            engine = j.engine or (_engine_of_kind(j.kind) if j.kind else self.engine)
            spec = self.judge
            if j.judge is not None:
                over = {k: v for k, v in j.judge.model_dump(exclude_none=True).items()}
                spec = JudgeSpec.model_validate({**self.judge.model_dump(), **over})
            if engine.kind == "reward_model" and (j.judge is None or j.judge.mode is None):
                spec = JudgeSpec.model_validate({**spec.model_dump(), "mode": "reward_model"})
            out.append(Role(name=j.name, model=j.model or self.model, engine=engine, weight=j.weight, judge=spec))
        return out

    def uses_roles(self) -> bool:
        return self.judges is not None or getattr(self, "policy", None) is not None

    @model_validator(mode="after")
    def _judges_can_judge(self):
        """Each judge's own settings are valid, and its mode fits its engine kind (errors at its line)."""
        from pydantic import ValidationError

        for i, j in enumerate(self.judges or []):
            at = ("judges", i, "judge") if j.judge is not None else ("judges", i)
            try:
                role = self.judge_roles()[i]
            except ValidationError as e:
                err = e.errors()[0]
                raise ErrorAt(at, f"judge '{j.name}': {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
            rm_engine, rm_mode = role.engine.kind == "reward_model", role.judge.mode == "reward_model"
            if rm_engine and not rm_mode:
                raise ErrorAt(at, f"judge '{j.name}' is a reward model, which scores pairs and cannot "
                                  f"answer judge.mode '{role.judge.mode}'; leave its mode out (reward_model)")
            if rm_mode and not rm_engine:
                raise ErrorAt(at, f"judge '{j.name}': judge.mode reward_model needs a reward-model engine "
                                            f"(kind: reward_model); with engine kind {role.engine.kind} use judge.mode "
                                            "logprob (or cot, vote)")
        return self


def _engine_of_kind(kind: str):
    from pydantic import TypeAdapter

    return TypeAdapter(EngineSpec).validate_python({"kind": kind})


class PrefsPipeline(RolesMixin, RunConfig):
    kind: Literal["prefs"]
    pairs: PairSource
    judge: JudgeSpec = JudgeSpec()
    answer_template: str = "prompts/answer.j2"
    model: str = Field("smollm2-135m", description="policy (for sampling) and feedback model")
    policy: PolicyRole | None = Field(None, description="who samples the pairs (pairs.source: sample)")
    NEW_KEYS: ClassVar[tuple[str, ...]] = ("policy", "judges")

    @model_validator(mode="after")
    def _policy_needs_samples(self) -> "PrefsPipeline":
        if self.policy is not None and self.pairs.source != "sample":
            raise ErrorAt("policy", f"`policy:` samples the pairs, but pairs.source is '{self.pairs.source}'; "
                                    "remove `policy:` or use pairs.source: sample")
        return self

    def policy_role(self) -> Role | None:
        if self.pairs.source != "sample":
            return None
        p = self.policy or PolicyRole()
        return Role(name="policy", model=p.model or self.model, engine=p.engine or self.engine)


def load_prefs_pipeline(path: str | Path) -> PrefsPipeline:
    return load_yaml_model(path, PrefsPipeline, what="pipeline")
