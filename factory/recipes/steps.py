"""The step kinds of a recipe, registered by their action key.

Each kind has ``plan(node) -> identity`` (a hash of the step's configuration and of the identities
of the steps it reads: never of their data, so planning is instant) and ``run(node) -> output``
(a JSON-able dict whose ``value`` is what ``{step: id}`` stands for: a run id, a prompts file, an
export folder, a model folder). Outputs are named by identity, so a changed step writes beside
the old one and everything reading it gets a new identity too.
"""

from __future__ import annotations

import heapq
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from ..store import content_key
from .spec import POLICY, Recipe, Step


class StepStopped(Exception):
    """The recipe stops here, with this reason (a stopped run, a training step with no data)."""


@dataclass
class Node:
    """One step in one round, with the outputs of the steps it reads (by id, incl. ``policy``)."""

    recipe: Recipe
    step: Step
    round: int
    inputs: dict[str, dict] = field(default_factory=dict)
    quiet: bool = False
    retry_failed: bool = False

    @property
    def spec(self):
        return self.step.spec

    @property
    def tag(self) -> str:
        return self.step.id if self.round == 0 else f"{self.step.id}-r{self.round}"

    def path(self, folder: str, identity: str, suffix: str = "") -> Path:
        return self.recipe.state_dir / folder / f"{self.tag}-{identity[:10]}{suffix}"

    def value(self, x: Any) -> Any:
        """``x`` with every ``{step: id}`` replaced by that step's output value."""
        x = x.model_dump() if isinstance(x, BaseModel) else x
        if isinstance(x, dict):
            if set(x) == {"step"}:
                return self.inputs[x["step"]]["value"]
            return {k: self.value(v) for k, v in x.items()}
        if isinstance(x, list):
            return [self.value(v) for v in x]
        return x

    def ident(self, x: Any) -> Any:
        """``x`` with every ``{step: id}`` replaced by that step's identity (what identities hash)."""
        x = x.model_dump() if isinstance(x, BaseModel) else x
        if isinstance(x, dict):
            if set(x) == {"step"}:
                return {"step": self.inputs[x["step"]]["identity"]}
            return {k: self.ident(v) for k, v in x.items()}
        if isinstance(x, list):
            return [self.ident(v) for v in x]
        return x

    def config(self) -> dict:
        body = self.spec.model_dump(by_alias=True, exclude={"id", "once"})
        return self.ident(body)

    def input_identities(self) -> dict[str, str]:
        return {k: v["identity"] for k, v in sorted(self.inputs.items())}

    def ref(self, name: str) -> dict:
        """The output of step ``name`` (an id given as a plain string: ``from``, ``data``)."""
        return self.inputs[name]


class StepKind:
    def plan(self, node: Node) -> str:
        return content_key(node.step.action, node.config(), node.input_identities())

    def run(self, node: Node, identity: str) -> dict:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ prompts


class PromptsKind(StepKind):
    """A seeded slice of a JSONL prompt file: rows ranked by hash(seed, line); round k takes ranks
    [(k-1)·n, k·n) when ``fresh`` (disjoint slices), ranks [0, n) otherwise. Memory: k·n lines."""

    def plan(self, node: Node) -> str:
        import hashlib

        spec = node.spec
        rnd = max(node.round, 1) if spec.fresh else 1
        h = hashlib.sha256()  # the file's content (a touched but unchanged file keeps its slices)
        with open(spec.prompts, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        return content_key("prompts", node.config(), h.hexdigest(), rnd)

    def run(self, node: Node, identity: str) -> dict:
        spec = node.spec
        rnd = max(node.round, 1) if spec.fresh else 1
        with open(spec.prompts, encoding="utf-8") as f:
            ranked = heapq.nsmallest(rnd * spec.n, ((content_key(spec.seed, line), line) for line in
                                                    (ln.rstrip("\n") for ln in f) if line.strip()))
        chosen = [line for _, line in ranked[(rnd - 1) * spec.n:]]
        out = node.path("prompts", identity, ".jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(line + "\n" for line in chosen), encoding="utf-8")
        if not chosen:
            raise StepStopped(f"step '{node.tag}': {spec.prompts} has no prompts left for round {rnd} "
                              f"({spec.n} per round); add prompts or set `fresh: false`")
        return {"value": str(out), "rows": len(chosen)}


# ---------------------------------------------------------------------------------------- run


class RunKindStep(StepKind):
    """Run a pipeline with its overrides (``{step: id}`` resolved); the recipe's db unless set."""

    def _file(self, node: Node) -> Path:
        spec = node.spec
        sets = {"name": f"{node.recipe.cfg.name}-{node.tag}", "db": node.recipe.cfg.db, **node.value(spec.set)}
        from .overrides import materialise

        return materialise(spec.run, sets, node.recipe.state_dir / "pipelines" / f"{node.tag}.yaml")

    def plan(self, node: Node) -> str:
        from ..kinds import load

        _, lp = load(self._file(node))
        return content_key("run", lp.config_hash)

    def run(self, node: Node, identity: str) -> dict:
        from ..kinds import run

        summary = run(self._file(node), quiet=node.quiet, retry_failed=node.retry_failed)
        if summary.status != "done":
            raise StepStopped(f"run {summary.run_id} (step '{node.tag}') {summary.status}"
                              f"{': ' + summary.error if summary.error else ''}; rerun the recipe to continue")
        return {"value": summary.run_id, "run_id": summary.run_id, "db": summary.db, "kind": summary.kind,
                "written": summary.written, "reused": summary.reused, "labels": summary.labels,
                "failures": summary.failures, "audit": {k: summary.extra.get(k) for k in ("audit_id", "report_path")}
                if summary.kind == "audit" else None}


# ------------------------------------------------------------------------------------- export


class ExportKind(StepKind):
    def run(self, node: Node, identity: str) -> dict:
        from ..export import ExportError

        try:
            return self._export(node, identity)
        except ExportError as e:  # nothing to export: recorded; a training step reading it stops the recipe
            return {"value": None, "rows": 0, "reason": str(e), "kind": node.spec.export, "runs": []}

    def _export(self, node: Node, identity: str) -> dict:
        from ..export import export_human, export_prefs, export_sft

        spec = node.spec
        out = node.path("exports", identity)
        db = node.recipe.cfg.db
        if spec.export == "human":
            r = export_human(spec.human, out, limit=spec.limit, offset=spec.offset)
            runs = []
        else:
            src = node.ref(spec.from_)
            run_id = src.get("run_id")
            if run_id is None:
                raise StepStopped(f"step '{node.tag}': `from: {spec.from_}` is not a run step")
            if spec.export == "sft":
                r = export_sft(db, run_id, out, rounds=spec.rounds, principles=spec.principles)
            else:
                r = export_prefs(db, run_id, out, min_confidence=spec.min_confidence, principles=spec.principles,
                                 position_consistent_only=spec.position_consistent_only, soft=spec.soft, seed=spec.seed)
            runs = [run_id]
        return {"value": str(r.out), "rows": r.rows, "dropped": r.dropped, "kind": spec.export, "runs": runs}


# -------------------------------------------------------------------------------------- train


def trl_trainer(kind: str, config_path: Path, cfg: dict) -> dict:
    """Train with TRL (factory.train); resumes from the last checkpoint in ``output_dir``."""
    from ..train import train

    r = train(kind, config_path)
    return {"steps": r.steps, "rows": r.rows, "seconds": r.seconds, "train_loss": r.train_loss, "device": r.device}


def copy_trainer(kind: str, config_path: Path, cfg: dict) -> dict:
    """A stub for wiring tests: the 'trained' model is a copy of its base folder plus a record of
    what it was trained on (so its fingerprint differs from the base's)."""
    from ..models import resolve

    out = Path(cfg["output_dir"])
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(resolve(cfg["model"]), staging)
    (staging / "factory_train.json").write_text(json.dumps({"kind": kind, "stub": True, "config": cfg}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {"steps": 0, "rows": None, "seconds": 0.0, "train_loss": None, "device": "none"}


# trainer name -> fn(kind, config path, config) -> facts; `copy` is the wiring-test stub
TRAINERS: dict[str, Callable[[str, Path, dict], dict]] = {"trl": trl_trainer, "copy": copy_trainer}


class TrainKind(StepKind):
    def plan(self, node: Node) -> str:
        return content_key("train", node.config(), node.input_identities())

    def run(self, node: Node, identity: str) -> dict:
        import yaml

        from .lineage import record_model

        spec = node.spec
        data = node.ref(spec.data)
        if not data.get("rows"):
            dropped = data.get("dropped") or {}
            why = f" (left out: {', '.join(f'{n}× {r}' for r, n in dropped.items())})" if dropped else ""
            why = f": {data['reason']}" if data.get("reason") else why
            raise StepStopped(f"training step '{node.tag}' has no data: step '{spec.data}' exported 0 rows{why}; "
                              "nothing to train on, so the recipe stops here")
        if spec.trainer not in TRAINERS:
            raise StepStopped(f"step '{node.tag}': unknown trainer '{spec.trainer}'; use one of {', '.join(TRAINERS)}")
        base = node.value(spec.model)
        out = node.path("models", identity)
        cfg = {"model": base, "dataset": data["value"], "output_dir": str(out), "args": spec.args}
        if spec.peft:
            cfg["peft"] = spec.peft
        config_path = node.recipe.state_dir / "train" / f"{node.tag}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(f"# written by recipe step {node.tag}: `factory train {spec.train} {config_path}` "
                               "reproduces it\n" + yaml.safe_dump(cfg, sort_keys=False))
        start = time.perf_counter()
        facts = TRAINERS[spec.trainer](spec.train, config_path, cfg)
        facts["seconds"] = facts.get("seconds") or time.perf_counter() - start
        runs = list(data.get("runs", []))
        model_id = record_model(node.recipe.cfg.db, out, trainer=spec.trainer, kind=spec.train, config_hash=identity,
                                base=base, runs=runs, exports=[{"path": data["value"], "rows": data["rows"],
                                                                "step": spec.data}],
                                recipe=node.recipe.cfg.name, step=node.step.id, round=node.round, facts=facts)
        return {"value": str(out), "model_id": model_id, "base": base, "kind": spec.train, **facts}


# --------------------------------------------------------------------------------------- eval


class EvalKind(StepKind):
    def plan(self, node: Node) -> str:
        human = node.spec.human or node.recipe.cfg.human
        return content_key("eval", node.config(), node.input_identities(), human.model_dump() if human else None)

    def run(self, node: Node, identity: str) -> dict:
        from .evals import EVALS

        return EVALS[node.spec.eval](node)


KINDS: dict[str, StepKind] = {"prompts": PromptsKind(), "run": RunKindStep(), "export": ExportKind(),
                              "train": TrainKind(), "eval": EvalKind()}


def policy_input(recipe: Recipe, round: int, outputs: dict) -> dict:
    """What ``{step: policy}`` is in ``round``: policy.first (a once step's output or a model name)
    in round 1, round k-1's policy.next after."""
    pol = recipe.cfg.policy
    if round <= 1:
        if pol.first in recipe.steps:
            return outputs[(pol.first, 0)]
        return {"value": pol.first, "identity": content_key("model", pol.first)}
    return outputs[(pol.next, round - 1)]


__all__ = ["KINDS", "Node", "POLICY", "StepStopped", "TRAINERS", "copy_trainer", "policy_input", "trl_trainer"]
