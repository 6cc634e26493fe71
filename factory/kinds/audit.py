"""The audit run kind: the judges (a panel, or the one feedback model) label held-out human pairs,
then their labels are scored against the humans' (see :mod:`factory.audit.run`)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import judges
from ..audit.core import AuditPipeline, AuditSettings, _audit, _judge_meta, _weights, naive_run, run_judgements
from ..constitution import load_constitution
from ..fewshot import check_judge
from ..human import import_into
from ..inputs import chunked
from ..labelrun import label_run
from ..labels import rule_for
from ..runs import Loaded, RunContext, RunKind
from . import KINDS, register_kind
from ..sources import SqlReader, text_limit
from ..coverage import flag_coverage
from ..store import StoreError
from ..stages import judge as J
from .prefs import judge_templates
from ..yamlconf import load_yaml_model


@register_kind
class AuditKind(RunKind):
    name = "audit"
    tables = ("judgements", "rationales")

    def load(self, path: str | Path) -> Loaded:
        cfg = load_yaml_model(path, AuditPipeline, what="pipeline")
        constitution = load_constitution(cfg.constitution)
        check_judge(str(path), cfg, constitution)  # comparison principles, judge.few_shot examples
        return Loaded(str(path), "audit", cfg, constitution, judge_templates(cfg))

    def settings(self, ctx: RunContext) -> AuditSettings:
        over = {k: v for k, v in ctx.options.items() if k in ("naive_principle", "report_dir") and v is not None}
        return ctx.lp.cfg.audit.model_copy(update={k: str(v) if k == "report_dir" else v for k, v in over.items()})

    def execute(self, ctx: RunContext) -> None:
        lp, store, cfg = ctx.lp, ctx.store, ctx.lp.cfg
        c = lp.constitution
        settings = self.settings(ctx)
        naive = settings.naive_principle or c.rl_principles[0].id  # a principle judges can use
        if not c.principle(naive).rl:  # an unknown id is a clear error before any work
            raise StoreError(f"naive principle '{naive}' has no comparison question; name one that has")
        h = cfg.human
        set_id, n, skips = import_into(store, h.path, format=h.format, name=h.name, limit=h.limit, split=h.split,
                                       data_dir=h.data_dir, offset=h.offset,
                                       max_chars=text_limit(cfg.engine.max_model_len))
        ctx.summary.extra["set_id"] = set_id
        store.record_skips(lp.run_id, "human", skips)
        panel = judges.setup_panel(store, ctx.engines, lp.judge_roles(), run_id=lp.run_id, constitution=c,
                                   templates=lp.templates)
        spec = cfg.judge
        extra_naive = settings.naive_all_pairs and spec.per_pair is not None and spec.per_pair < len(c.rl_principles)

        def expand(rows, _):
            pairs = [J.Pair(r["pair_id"], json.loads(r["conversation"]), r["response_a"], r["response_b"]) for r in rows]
            jobs = judges.panel_jobs(panel, pairs)
            if extra_naive:  # the naive principle on every pair, as "<run>-naive": this run's own judgements
                # (its labels, `--run` audits, exports) stay exactly the configured sample
                jobs += judges.panel_jobs(panel, pairs, run_id=naive_run(lp.run_id), principles=lambda p: [c.principle(naive)])
            return jobs

        reader = SqlReader(store, """SELECT p.pair_id, p.conversation, p.response_a, p.response_b FROM human_labels h
                                     JOIN pairs p USING (pair_id) WHERE h.set_id = ? ORDER BY h.source_row""",
                           f"human set {set_id}", [set_id])
        parse = lambda row, rec: {"pair_id": rec[0], "source_row": row, "conversation": rec[1],  # noqa: E731
                                  "response_a": rec[2], "response_b": rec[3], "status": "ok"}
        ctx.own_runs = [naive_run(lp.run_id)]
        done, changed = ctx.done_chunks("pairs", reader.fingerprint)
        inputs = chunked(store, lp.run_id, "pairs", reader, parse, entity="pairs", expand=expand, done=done,
                         chunk_size=cfg.chunk_inputs)
        ctx.stream("pairs", inputs, own_runs=[naive_run(lp.run_id)], full_probe=changed)
        ctx.summary.extra["naive"] = naive

    def finish(self, ctx: RunContext) -> None:
        lp, store, cfg = ctx.lp, ctx.store, ctx.lp.cfg
        s = ctx.summary
        s.pairs = store.count("run_pairs", "run_id = ?", [lp.run_id])
        s.labels = label_run(store, lp.run_id, lp.constitution, cfg.judge, changed=s.written > 0 or s.reused > s.skipped_jobs)
        flag_coverage(store, lp.run_id, s)
        settings = self.settings(ctx).model_copy(update={"naive_principle": s.extra["naive"]})
        naive_j = run_judgements(store, naive_run(lp.run_id), cfg.judge.clamp)
        c = lp.constitution
        meta = {"run": lp.run_id, "pipeline": lp.path, "model": cfg.model,
                "constitution": f"{c.name} v{c.version} ({c.hash})", "judge": _judge_meta(cfg.judge.model_dump())}
        rule = rule_for(store, c, cfg.judge, lp.run_id)
        settings.constitution_weights = _weights(c)
        audit_id, result, report = _audit(store, lp.run_id, s.extra["set_id"], rule,
                                          naive_j if naive_j.num_rows else None, settings, meta)
        s.extra.update(audit_id=audit_id, report_path=report)
        s.extra["result"] = result

    def render(self, lp: Loaded, stage: str, example: int) -> list[dict]:
        from ..render import render_judge

        return render_judge(lp, example)




def load(path: str | Path) -> Loaded:
    return KIND.load(path)


KIND = KINDS[AuditKind.name]
