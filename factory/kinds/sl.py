"""The SL-CAI run kind: prompts → answer → critique → revision (1–4 rounds), streamed.

Prompts are read lazily in chunks (``chunk_inputs`` records each); each chunk's prompts are
admitted into ``prompts``/``run_prompts`` and expanded into answer jobs, whose critiques and
revisions follow as soon as their parents are stored (see :mod:`factory.stages.sl`).
"""

from __future__ import annotations

from pathlib import Path

from ..config import load_pipeline
from ..constitution import load_constitution
from ..fewshot import check_sl, sl_shots
from ..inputs import chunked
from ..runs import Loaded, RunContext, RunKind, Summary
from . import KINDS, register_kind
from ..sources import open_source, prompt_row, text_limit
from ..stages import sl
from ..store import Store, StoreError
from ..templates import load_template


@register_kind
class SLKind(RunKind):
    name = "sl"
    tables = ("responses", "critiques", "revisions")

    def load(self, path: str | Path) -> Loaded:
        cfg = load_pipeline(path)
        constitution = load_constitution(cfg.constitution)
        if cfg.principles.only:
            for pid in cfg.principles.only:
                constitution.principle(pid)  # raises a clear error for an unknown id
        templates = {name: load_template(getattr(cfg.templates, name)) for name in type(cfg.templates).model_fields}
        check_sl(str(path), cfg, constitution)  # critique+revision principles, few_shot examples
        return Loaded(str(path), "sl", cfg, constitution, templates)

    def context(self, lp: Loaded, store: Store | None, model: str, seed: int | None) -> sl.Ctx:
        cfg = lp.cfg
        samp = {name: getattr(cfg.sampling, name).to_sampling() for name in sl.STAGES}
        shash = {name: (store.put_config("sampling", {**s.as_dict(), "engine_seed": seed}) if store else "")
                 for name, s in samp.items()}
        pc = cfg.principles
        return sl.Ctx(run_id=lp.run_id, model=model, seed=seed, constitution=lp.constitution, templates=lp.templates,
                      sampling=samp, sampling_hash=shash, rounds=cfg.rounds, strategy=pc.strategy,
                      per_round=pc.per_round, choice_seed=pc.seed, only=pc.only,
                      shots=sl_shots(lp.constitution, cfg, lp.templates))  # few-shot demonstrations

    def execute(self, ctx: RunContext) -> None:
        lp, store = ctx.lp, ctx.store
        engine = ctx.engine()
        sctx = self.context(lp, store, engine.model, engine.seed)
        src = lp.cfg.prompts
        reader = open_source(src.path, src.split, src.data_dir, "prompts")
        done, changed = ctx.done_chunks("prompts", reader.fingerprint)

        def expand(rows, before):
            import json

            return sl.answer_jobs(sctx, [(r["prompt_id"], json.loads(r["messages"]), before + i)
                                         for i, r in enumerate(rows)])

        inputs = chunked(store, lp.run_id, "prompts", reader, lambda row, rec: prompt_row(row, rec, src.field),
                         entity="prompts", expand=expand, done=done, chunk_size=lp.cfg.chunk_inputs, limit=src.limit,
                         max_chars=text_limit(engine.max_model_len))
        ctx.stream("prompts", inputs, progress=lambda: reader.progress, full_probe=changed)
        ctx.summary.prompts = store.count("run_prompts", "run_id = ?", [lp.run_id])

    def input_fingerprints(self, lp: Loaded) -> dict[str, str | None] | None:
        src = lp.cfg.prompts
        return {"prompts": open_source(src.path, src.split, src.data_dir, "prompts").fingerprint}

    def render(self, lp: Loaded, stage: str, example: int) -> list[dict]:
        from ..render import render_sl

        return render_sl(self, lp, stage, example)


KIND = KINDS[SLKind.name]


def load(path: str | Path) -> Loaded:
    return KIND.load(path)


def run(path: str | Path, **kw) -> Summary:
    """Run (or resume) the critique→revise pipeline at ``path``."""
    from . import run as run_any

    return run_any(path, **kw)


__all__ = ["KIND", "load", "run", "StoreError"]
