"""What a run is, before and after it runs: :class:`Loaded` (a pipeline with everything it names
loaded and checked, its roles, and the run id they give) and :class:`Summary` (what a run did).
Plain data for the lifecycle (:mod:`factory.runs`) and the kinds; no engine, no database."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .constitution import Constitution
from .runner import TableStats
from .templates import Template

# config keys that change how a run is executed, not what it makes: left out of the run id
OPERATIONAL = ("chunk_rows", "chunk_inputs")


@dataclass
class Loaded:
    """A pipeline with everything it names loaded and checked (no engine, no database yet)."""

    path: str
    kind: str
    cfg: Any
    constitution: Constitution
    templates: dict[str, Template]
    # what answers (the engine's identity): part of the run id, so the same pipeline run with another
    # engine (a trial on the fake engine, a retrained checkpoint, another served model) is another run
    engine_model: str | None = None

    @property
    def run_id(self) -> str:
        return f"{self.cfg.name}-{self.config_hash[:10]}"

    def roles(self) -> list:
        """Every role of the run (config.Role: name, model, engine settings; judges' settings)."""
        return [r for r in (self.policy_role(), *self.judge_roles()) if r is not None]

    def policy_role(self):
        from .roles import Role

        f = getattr(self.cfg, "policy_role", None)
        if f is not None:
            return f()
        return None if hasattr(self.cfg, "judge_roles") else Role(name="policy", model=self.cfg.model,
                                                                  engine=self.cfg.engine)

    def judge_roles(self) -> list:
        f = getattr(self.cfg, "judge_roles", None)
        return f() if f is not None else []

    def identity(self, models: dict[str, str | None]) -> Any:
        """What answers, as part of the run id: the one engine's model for a file without roles (as
        before roles existed), else role -> model. None when one is unknown."""
        if any(m is None for m in models.values()):
            return None
        if not getattr(self.cfg, "uses_roles", lambda: False)():
            return next(iter(models.values()), None)
        return dict(sorted(models.items()))

    @property
    def config_hash(self) -> str:
        from .store import content_key

        body = {k: v for k, v in self.cfg.snapshot().items() if k not in OPERATIONAL + getattr(self.cfg, "NOT_IDENTITY", ())}
        return content_key(self.kind, body, self.constitution.hash, {k: t.hash for k, t in self.templates.items()},
                           self.engine_model)

    def expected_engine_model(self) -> Any:
        """The run's engine identity known without starting any engine (``factory validate``, a no-op
        rerun): each role's engine settings answer their own (fake, a local folder's fingerprint);
        None where only an engine can say (a server's model)."""
        return self.identity({r.name: r.engine.expected_model(r.model) for r in self.roles()})


@dataclass
class Summary:
    """What a run did in this invocation (``stages``), and its totals from the database."""

    run_id: str
    db: str
    kind: str = ""
    status: str = "running"
    error: str | None = None
    stages: list[TableStats] = field(default_factory=list)
    input_skips: dict[str, int] = field(default_factory=dict)  # reason -> rows (the whole run)
    prompts: int = 0
    pairs: int = 0
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)  # "table status: reason" -> rows (the whole run)
    labels: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    skipped_chunks: int = 0  # input chunks finished by an earlier invocation: not read again
    skipped_jobs: int = 0  # the jobs those chunks had

    @property
    def written(self) -> int:
        return sum(w.written for w in self.stages)

    @property
    def reused(self) -> int:
        """Rows this invocation did not have to make: found stored, or in finished chunks."""
        return sum(w.reused for w in self.stages) + self.skipped_jobs

    @property
    def requests(self) -> int:
        return sum(w.requests for w in self.stages)

    @property
    def completion_tokens(self) -> int:
        return sum(w.completion_tokens for w in self.stages)

    @property
    def prompt_tokens(self) -> int:
        return sum(w.prompt_tokens for w in self.stages)
