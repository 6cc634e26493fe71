"""``factory render``: the exact chat messages one example sends to the model, without an engine.

Each run kind's ``render`` calls one of these: SL pipelines show the answer, critique or revise
prompt of a prompt; preference and audit pipelines show the judge prompt of a pair (a file's pair,
a human set's pair, or placeholders where pairs are sampled or come from SL runs).
"""

from __future__ import annotations

import json
from pathlib import Path

from .fewshot import judge_shots, sl_shots
from .sources import read_pairs, read_prompts
from .stages import judge as J
from .stages import sl
from .store import Store, StoreError

PLACEHOLDER = "<the {what} generated for this prompt will appear here; run the pipeline to see a real one>"


def _stored_text(db: str, table: str, prompt_id: str) -> str | None:
    """The latest stored ok text for a prompt, if the database exists and is not being written."""
    if not Path(db).exists():
        return None
    try:
        with Store(db, read_only=True) as store:
            row = store.one(
                f"SELECT text FROM {table} WHERE prompt_id = ? AND status = 'ok' ORDER BY round DESC, created_at DESC LIMIT 1",
                [prompt_id])
    except Exception:  # in use by a run, or an older schema: placeholders will do
        return None
    return row[0] if row else None


def render_judge(lp, example: int, order: str = "ab") -> list[dict]:
    """The judge's messages for one pair of a preference or audit pipeline."""
    cfg = lp.cfg.judge
    src = getattr(lp.cfg, "pairs", None) or lp.cfg.human
    if getattr(src, "source", "file") == "file":
        table, _ = read_pairs(src.path, format=src.format, split=src.split, data_dir=src.data_dir, limit=src.limit)
        if not 0 <= example < table.num_rows:
            raise StoreError(f"--example {example} is out of range: the file has {table.num_rows} valid pairs")
        r = table.slice(example, 1).to_pylist()[0]
        pair = J.Pair(r["pair_id"], json.loads(r["conversation"]), r["response_a"], r["response_b"])
    else:
        pair = J.Pair("example", [{"role": "user", "content": "<the prompt>"}], PLACEHOLDER.format(what="first response"),
                      PLACEHOLDER.format(what="second response"))
    p = J.choose(lp.constitution, cfg.per_pair, cfg.seed, pair.pair_id)[0]
    ctx = J.JudgeCtx(run_id="", model="", seed=None, constitution=lp.constitution, template=lp.templates["judge"],
                     options=cfg.options, option_ids=[], sampling_hash="", max_chars=cfg.max_conversation_chars,
                     shots=judge_shots(lp.constitution, cfg))
    return ctx.messages(pair, p, order, cot=cfg.mode == "cot")


def render_sl(kind, lp, stage: str, example: int) -> list[dict]:
    src = lp.cfg.prompts
    table, _ = read_prompts(src.path, field=src.field, split=src.split, data_dir=src.data_dir,
                            limit=max(example + 1, 1) if src.limit is None else min(src.limit, example + 1))
    if not 0 <= example < table.num_rows:
        raise StoreError(f"--example {example} is out of range: the prompts have {table.num_rows} valid rows")
    pid = table.column("prompt_id")[example].as_py()
    conv = json.loads(table.column("messages")[example].as_py())
    if stage == "answer":
        return lp.templates["answer"].render(conversation=conv)
    pc = lp.cfg.principles
    principles = sl.principles_for(lp.constitution, pc.strategy, pc.per_round, pc.seed, pid, example, 1, pc.only)
    response = _stored_text(lp.cfg.db, "responses", pid) or PLACEHOLDER.format(what="initial answer")
    shots = sl_shots(lp.constitution, lp.cfg, lp.templates)  # few-shot demonstrations, as the run sends them
    if stage == "critique":
        return sl.critique_messages(lp.templates, shots, pid, conv, response, principles[0], 1)
    if stage == "revise":
        critique = _stored_text(lp.cfg.db, "critiques", pid) or PLACEHOLDER.format(what="critique")
        return sl.revise_messages(lp.templates, shots, pid, conv, response, [(p, critique) for p in principles], 1)
    raise StoreError(f"unknown --stage '{stage}'; use answer, critique or revise")
