"""Recipe YAML → validated steps and their graph (errors at ``file:line``).

A recipe names steps; a step names the steps it reads by id, never by a run id or a folder::

    kind: recipe
    name: cai
    db: data/cai.duckdb          # every run, step state and trained model is recorded here
    rounds: 2
    policy: {first: sft, next: dpo}   # round 1 samples with step sft's model; round k with round k-1's dpo
    steps:
      - {id: sl, once: true, run: pipelines/demo.yaml, set: {prompts.limit: 8}}
      - {id: sft_data, once: true, export: sft, from: sl}
      - {id: sft, once: true, train: sft, data: sft_data, args: {max_steps: 4}}
      - {id: prompts, prompts: data/demo_prompts.jsonl, n: 8, seed: 0, fresh: true}
      - {id: pairs, run: pipelines/demo-prefs.yaml, set: {model: {step: policy}, pairs.prompts.path: {step: prompts}}}
      - {id: prefs, export: prefs, from: pairs}
      - {id: dpo, train: dpo, data: prefs, model: {step: policy}}

A step's action key says its kind (``run``, ``prompts``, ``export``, ``train``, ``eval``). Steps marked
``once`` run a single time, before round 1; the others run in every round. ``{step: ID}`` is the output
of step ID in the same round (or of a ``once`` step); ``{step: policy}`` is round 1's ``policy.first``
(a ``once`` step or a model name) and, in round k > 1, round k−1's ``policy.next``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..yamlconf import ConfigError, Issue, Marks, error_at, load_yaml_data, validate_data

StepId = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="the step's id, used by the steps that read it")
POLICY = "policy"  # the pseudo-step: this round's policy model
ACTIONS = ("run", "prompts", "export", "train", "eval")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Ref(Strict):
    step: str = Field(description="the id of the step whose output goes here (or `policy`)")


ModelRef = str | Ref


class StepBase(Strict):
    id: str = StepId
    once: bool = Field(False, description="run one time before round 1 (setup); its output serves every round")


class RunStep(StepBase):
    """Run a pipeline (any kind: sl, prefs, audit), with keys overridden by dotted path."""

    run: str = Field(description="the pipeline YAML")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides: `dotted.key: value` or `{step: id}`")


class PromptsStep(StepBase):
    """A seeded slice of a prompt file: ``fresh`` → a new disjoint slice every round, else the same one."""

    prompts: str = Field(description="a prompts JSONL (`prompt` or `messages` per line)")
    n: int = Field(ge=1, description="prompts per round")
    seed: int = 0
    fresh: bool = Field(True, description="a fresh, disjoint slice each round (false: the same set every round)")


class ExportStep(StepBase):
    export: Literal["sft", "prefs", "human"]
    from_: str | None = Field(None, alias="from", description="the run step to export (sft, prefs)")
    human: str | None = Field(None, description="export: human — an hh-rlhf/pairs file")
    limit: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    rounds: list[int] | None = None
    principles: list[str] | None = None
    min_confidence: float = Field(0.0, ge=0, le=1)
    position_consistent_only: bool = False
    soft: Literal["none", "bernoulli"] = "none"
    seed: int = 0


class TrainStep(StepBase):
    train: Literal["sft", "rm", "dpo"]
    data: str = Field(description="the export step whose rows it trains on")
    model: ModelRef = Field("smollm2-135m", description="the base: a model name, or {step: id} / {step: policy}")
    trainer: str = Field("trl", description="a trainer of factory.recipes.steps.TRAINERS (trl; tests add stubs)")
    args: dict[str, Any] = Field(default_factory=dict, description="fields of the TRL config class")
    peft: dict[str, Any] | None = None


class HumanSet(Strict):
    path: str = Field(description="held-out human pairs (hh-rlhf or pairs JSONL)")
    limit: int | None = Field(50, ge=1)
    offset: int = Field(0, ge=0)


class EvalStep(StepBase):
    eval: Literal["rm", "dpo", "behaviour"]
    model: ModelRef = Field(description="the model evaluated: {step: id}, {step: policy} or a name")
    ref: ModelRef | None = Field(None, description="dpo: the reference policy (default: smollm2-135m); usually {step: policy}")
    human: HumanSet | None = None
    beta: float = 0.1
    against: list[ModelRef] = Field(default_factory=list, description="behaviour: models compared with")
    judge: str = Field("smollm2-135m", description="behaviour: the refusal judge")
    engine: dict[str, Any] = Field(default_factory=lambda: {"kind": "vllm"}, description="behaviour: engine settings")
    limit: int | None = Field(None, ge=1, description="behaviour: items per suite")
    max_tokens: int = Field(96, ge=1)


STEP_MODELS: dict[str, type[StepBase]] = {"run": RunStep, "prompts": PromptsStep, "export": ExportStep,
                                          "train": TrainStep, "eval": EvalStep}


class PolicySpec(Strict):
    first: str = Field("smollm2-135m", description="round 1's policy: a `once` step id or a model name")
    next: str | None = Field(None, description="the per-round train step whose model is the next round's policy")


class RecipeConfig(Strict):
    kind: Literal["recipe"]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="a short name for the recipe")
    db: str = Field(description="the DuckDB file every step records into")
    state_dir: str | None = Field(None, description="where exports, models and materialised pipelines go "
                                  "(default data/recipes/<name>)")
    rounds: int = Field(1, ge=1, le=16)
    policy: PolicySpec = PolicySpec()
    human: HumanSet | None = Field(None, description="a held-out human set named for the report (agreement)")
    steps: list[dict[str, Any]] = Field(min_length=1, description="the steps (each with one of run/prompts/export/train/eval)")


# ------------------------------------------------------------------------------------ the graph


@dataclass
class Edge:
    """Step ``src`` reads ``dst`` at ``loc`` (its place in the recipe file, for errors)."""

    dst: str
    loc: tuple


@dataclass
class Step:
    id: str
    action: str
    spec: StepBase
    index: int
    deps: list[Edge] = field(default_factory=list)

    @property
    def once(self) -> bool:
        return self.spec.once


@dataclass
class Recipe:
    path: str
    cfg: RecipeConfig
    marks: Marks
    steps: dict[str, Step]
    order: list[str]  # a topological order of the step ids (declaration order where free)

    @property
    def state_dir(self) -> Path:
        return Path(self.cfg.state_dir or f"data/recipes/{self.cfg.name}")

    def nodes(self) -> list[tuple[str, int]]:
        """(step, round) in execution order: the once steps (round 0), then each round's steps."""
        once = [(s, 0) for s in self.order if self.steps[s].once]
        per = [s for s in self.order if not self.steps[s].once]
        return once + [(s, k) for k in range(1, self.cfg.rounds + 1) for s in per]


def _refs(value: Any, loc: tuple) -> list[Edge]:
    """Every ``{step: id}`` inside ``value``."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        if set(value) == {"step"} and isinstance(value["step"], str):
            return [Edge(value["step"], loc)]
        return [e for k, v in value.items() for e in _refs(v, loc + (k,))]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _refs(v, loc + (i,))]
    return []


def _deps(step: StepBase, loc: tuple) -> list[Edge]:
    if isinstance(step, ExportStep) and step.from_:
        return [Edge(step.from_, loc + ("from",))]
    if isinstance(step, TrainStep):
        return [Edge(step.data, loc + ("data",)), *_refs(step.model, loc + ("model",))]
    if isinstance(step, RunStep):
        return _refs(step.set, loc + ("set",))
    if isinstance(step, EvalStep):
        return [*_refs(step.model, loc + ("model",)), *_refs(step.ref, loc + ("ref",)),
                *_refs(step.against, loc + ("against",))]
    return []


def load_recipe(path: str | Path) -> Recipe:
    """Load and check a recipe: each step's keys, unknown step ids, cycles, once/round rules and
    the keys each run step overrides (against its pipeline's own model)."""
    from .overrides import check_overrides

    data, marks = load_yaml_data(path)
    cfg = validate_data(data, marks, RecipeConfig, path, what="recipe")
    steps: dict[str, Step] = {}
    issues: list[Issue] = []

    def issue(loc: tuple, msg: str, key: bool = False) -> None:
        line, col = marks.find(loc, key=key)
        issues.append(Issue(str(path), line, col, msg))

    for i, raw in enumerate(cfg.steps):
        loc = ("steps", i)
        if not isinstance(raw, dict):
            issue(loc, f"step #{i + 1} must be a mapping with an `id` and one of {', '.join(ACTIONS)}")
            continue
        actions = [a for a in ACTIONS if a in raw]
        if len(actions) != 1:
            what = "none" if not actions else " and ".join(actions)
            issue(loc, f"step #{i + 1} ({raw.get('id', '?')}) has {what} of {', '.join(ACTIONS)}; give exactly one")
            continue
        sub = Marks({k[2:]: v for k, v in marks.items() if k[:2] == loc})
        sub.setdefault((), marks.get(loc))
        try:
            spec = validate_data(raw, sub, STEP_MODELS[actions[0]], path, what=f"{actions[0]} step")
        except ConfigError as e:
            issues.extend(e.issues)
            continue
        if spec.id in steps or spec.id == POLICY:
            issue(loc + ("id",), f"step id '{spec.id}' is " + ("reserved (the round's policy)" if spec.id == POLICY
                                                               else "used twice; give each step its own id"))
            continue
        steps[spec.id] = Step(spec.id, actions[0], spec, i, _deps(spec, loc))
    if issues:
        raise ConfigError.many(issues)
    for ref, loc, what in ((cfg.policy.first, ("policy", "first"), "first"), (cfg.policy.next, ("policy", "next"), "next")):
        if ref is None or (what == "first" and ref not in steps):
            continue  # a model name
        if ref not in steps:
            issue(loc, f"policy.next names no step '{ref}'; steps: {', '.join(steps)}")
        elif steps[ref].action != "train" and what == "next":
            issue(loc, f"policy.next must name a train step; '{ref}' is a {steps[ref].action} step")
        elif what == "first" and not steps[ref].once:
            issue(loc, f"policy.first names '{ref}', which runs every round; mark it `once: true` or name a model")
        elif what == "next" and steps[ref].once:
            issue(loc, f"policy.next names '{ref}', which runs once; the next round's policy must be trained each round")
    if cfg.rounds > 1 and cfg.policy.next is None:
        issue(("rounds",), "rounds > 1 needs `policy: {first: …, next: <train step>}`: round k samples with round "
                           "k-1's trained model", key=True)
    for s in steps.values():
        for e in s.deps:
            if e.dst == POLICY:
                if s.once:
                    issue(e.loc, f"step '{s.id}' runs once, before any round: it cannot use the round's policy")
            elif e.dst not in steps:
                close = ", ".join(steps)
                issue(e.loc, f"step '{s.id}' reads unknown step '{e.dst}'; steps: {close}")
            elif s.once and not steps[e.dst].once:
                issue(e.loc, f"step '{s.id}' runs once but reads '{e.dst}', which runs every round; mark both `once`")
    if issues:
        raise ConfigError.many(issues)
    order = _toposort(path, marks, steps)
    check_overrides(path, marks, steps)
    return Recipe(str(path), cfg, marks, steps, order)


def _toposort(path, marks: Marks, steps: dict[str, Step]) -> list[str]:
    """Declaration order, moved only as the edges require; a cycle is an error at one of its edges."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(sid: str, trail: list[str]) -> None:
        if state.get(sid) == 2:
            return
        state[sid] = 1
        for e in steps[sid].deps:
            if e.dst == POLICY:
                continue
            if state.get(e.dst) == 1:
                cycle = trail[trail.index(e.dst):] + [sid, e.dst] if e.dst in trail else [sid, e.dst]
                raise error_at(path, marks, e.loc, f"steps form a cycle: {' → '.join(dict.fromkeys(cycle))} → {e.dst}; "
                                                   "a step can only read steps that do not read it")
            visit(e.dst, trail + [sid])
        state[sid] = 2
        order.append(sid)

    for sid in sorted(steps, key=lambda s: steps[s].index):
        visit(sid, [])
    return order
