"""Best-of-n with the policy: does picking by the ensemble beat picking by one reward model?

For m prompts the policy samples n responses each (one ``generate`` call, stored as generations of
suite ``bon``). Every member of the ensemble scores every sample; one pick per prompt is the
argmax of a single reward model (member ``single``, raw reward), the other the argmax of the
ensemble aggregate (``factory.evals.ensemble``: z-scored members, then mean / min / mean − λ·std).
Where the two picks differ, the constitution judge compares them (``prompts/judge.j2``, principles
sampled per pair, both orders, weighted by ``prefmath``) and P(ensemble pick better) decides a win
(1), a loss (0) or a tie (0.5, |p − 0.5| < tie_eps). The ensemble's win rate over the single RM's
pick, with a bootstrap interval, is the measured over-optimisation check: a single RM that is
being exploited picks responses the judge likes less. Prompts where the picks agree are counted
(they carry no information about the difference). Samples, rewards and judgements are stored, so
a rerun reuses them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engines.base import Request, Sampling
from ..store import content_key
from ..templates import load_template
from . import judging, tables
from .ensemble import AGGREGATES, EnsembleError, aggregate, member_dirs, member_rewards, normalise
from .stats import MIN_ITEMS, Rate, rate
from .tables import GENERATIONS, Work

DEFAULT_PROMPTS = judging.REPO / "data" / "demo_prompts.jsonl"
DEFAULT_CONSTITUTION = judging.REPO / "constitutions" / "harmless.yaml"


@dataclass
class BestOfN:
    rm: str
    policy: str
    judge: str
    prompts: int
    n: int
    aggregate: str
    lam: float
    same_pick: int
    differing: int
    win_rate: Rate  # ensemble pick vs single pick, over the prompts where they differ
    win_rate_all: Rate  # over every prompt, an identical pick counting 0.5
    single_reward_gap: float | None  # mean single-RM z-reward of its pick minus the ensemble's pick
    seconds: float
    details: dict = field(default_factory=dict)

    def summary(self) -> str:
        gap = "—" if self.single_reward_gap is None else f"{self.single_reward_gap:+.2f}"
        single = f"member {self.details.get('single', 0)}"
        line = (f"best-of-{self.n} on {self.prompts} prompts (policy {self.policy}, judge {self.judge}): the ensemble "
                f"({self.aggregate}, λ={self.lam:g}) and {single} pick the same response on {self.same_pick}; where they "
                f"differ ({self.differing}) the judge prefers the ensemble's pick {self.win_rate.fmt()} "
                f"({self.details.get('judge_ties', 0)} judge ties counted 0.5); over all prompts (same pick = 0.5) "
                f"{self.win_rate_all.fmt()}; {single}'s z-reward of its own pick minus of the ensemble's: {gap}")
        if self.differing and self.details.get("judge_ties") == self.differing:
            line += "\nverdict: every differing pair is a judge tie: this judge cannot tell the picks apart, so the check is inconclusive"
        elif self.win_rate.n < MIN_ITEMS:
            line += f"\nverdict: too few differing picks (n={self.win_rate.n} < {MIN_ITEMS}) for a verdict"
        elif self.win_rate.lo > 0.5:
            line += "\nverdict: the judge prefers the ensemble's picks: the single reward model is being over-optimised"
        elif self.win_rate.hi < 0.5:
            line += "\nverdict: the judge prefers the single reward model's picks"
        else:
            line += "\nverdict: not distinguishable from 0.5"
        return line


def _samples(store, engine, prompts, template, sampling: Sampling, label: str, version: str) -> dict:
    """prompt_id → [(generation id, text)] of the ok samples (sampled now where missing)."""
    shash = store.put_config("sampling", {**sampling.as_dict(), "engine_seed": engine.seed})
    work = []
    for p in prompts:
        msgs = template.render(conversation=p["conversation"])
        key = content_key(GENERATIONS, engine.model, engine.seed, sampling.as_dict(), template.hash, label, version,
                          p["prompt_id"], 1, msgs)
        work.append(Work(Request(key, msgs, sampling), {
            "suite": label, "suite_version": version, "item_id": p["prompt_id"], "turn": 1, "parent_id": None,
            "model": engine.model, "seed": engine.seed, "sampling_hash": shash, "template_hash": template.hash,
            "messages": json.dumps(msgs, ensure_ascii=False)}))
    tables.run_step(store, engine, GENERATIONS, work, tables.generation_rows, tables.GENERATION_SCHEMA, name="samples",
                    first_row=lambda k: tables.sample_key(k, 0, sampling.n))
    ids = [tables.sample_key(w.request.key, i, sampling.n) for w in work for i in range(sampling.n)]
    out: dict[str, list] = {}
    for r in sorted(store.fetch(GENERATIONS, ids).to_pylist(), key=lambda r: r["sample_index"]):
        if r["status"] == "ok":
            out.setdefault(r["item_id"], []).append((r["id"], r["text"]))
    return out


def _judge(store, judge, constitution, pairs: list[dict], per_pair: int | None, seed: int, tie_eps: float) -> np.ndarray:
    """P(a better) per pair (a = the ensemble's pick) from the constitution judge, both orders."""
    import pyarrow as pa

    from ..labels import LabelRule, labels_of

    template = load_template(judging.JUDGE_TEMPLATE)
    ids = judging.option_ids(judge)
    principle_hash = {p.id: p.hash for p in constitution.principles}
    work = []
    for pr in pairs:
        for pid, order, msgs in judging.pairwise_messages(template, constitution, per_pair, seed, pr["pair_id"],
                                                          pr["conversation"], pr["a"], pr["b"]):
            key = content_key("pairwise", judge.model, judge.seed, template.hash, principle_hash[pid], pr["pair_id"],
                              order, judging.OPTIONS)
            work.append(Work(judging.scoring_request(key, msgs, ids), {
                "subject_id": pr["pair_id"], "suite": "bon", "item_id": pr["prompt_id"], "scorer": "pairwise",
                "variant": f"{pid}/{order}", "rule_hash": template.hash, "model": judge.model, "seed": judge.seed}))

    def rows(w: Work, c) -> list[dict]:
        lp1, lp2, p_first, error = judging.option_probability(c)
        order = w.row["variant"].rsplit("/", 1)[1]
        p_a = None if p_first is None else (p_first if order == "ab" else 1.0 - p_first)
        return [{**w.row, "id": w.request.key, "logprob_first": lp1, "logprob_second": lp2, "value": p_a,
                 "status": "ok" if error is None else "failed", "error": error, "prompt_tokens": c.prompt_tokens,
                 "detail": json.dumps({"a": pr_ids[w.row["subject_id"]]})}]

    pr_ids = {p["pair_id"]: [p["a_id"], p["b_id"]] for p in pairs}
    tables.run_step(store, judge, tables.SCORES, work, rows, tables.SCORE_SCHEMA, name="judge")
    got = [r for r in store.fetch(tables.SCORES, [w.request.key for w in work]).to_pylist()
           if r["status"] == "ok" and r["value"] is not None]
    if not got:
        return np.full(len(pairs), np.nan)
    judged = pa.table({"pair_id": [r["subject_id"] for r in got],
                       "principle_id": [r["variant"].rsplit("/", 1)[0] for r in got],
                       "order": [r["variant"].rsplit("/", 1)[1] for r in got],
                       "p_a": pa.array([r["value"] for r in got], pa.float64())})
    rule = LabelRule({p.id: float(p.weight) for p in constitution.principles}, tie_eps=tie_eps)
    labels = labels_of(judged, rule).to_pylist()
    by_pair = {x["pair_id"]: x["p_a"] for x in labels}
    return np.array([by_pair.get(p["pair_id"], np.nan) for p in pairs], dtype=float)


def _picks(samples: dict, usable: list[dict], raw: np.ndarray, how: str, lam: float, single: int):
    """Per prompt: the ensemble's pick and the single RM's pick; pairs where they differ."""
    flat = [(i, gid, text) for i in usable for gid, text in samples[i["prompt_id"]]]
    z = normalise(raw)
    agg = aggregate(z, how, lam)
    pairs, same, gaps, pos = [], 0, [], 0
    for i in usable:
        idx = np.arange(pos, pos + len(samples[i["prompt_id"]]))
        pos += len(idx)
        a, b = idx[np.argmax(agg[idx])], idx[np.argmax(raw[single, idx])]
        gaps.append(z[single, b] - z[single, a])
        if a == b:
            same += 1
            continue
        pairs.append({"pair_id": content_key("bon-pair", flat[a][1], flat[b][1]), "prompt_id": i["prompt_id"],
                      "conversation": i["conversation"], "a": flat[a][2], "b": flat[b][2],
                      "a_id": flat[a][1], "b_id": flat[b][1]})
    return pairs, same, gaps


def best_of_n(rm_dir: str | Path, *, db: str | Path, policy: str = "smollm2-135m", judge: str | None = None,
              prompts: str | Path = DEFAULT_PROMPTS, m: int = 16, n: int = 4, how: str = "uwo", lam: float = 1.0,
              single: int = 0, constitution: str | Path = DEFAULT_CONSTITUTION, per_pair: int | None = 4,
              max_tokens: int = 96, temperature: float = 1.0, tie_eps: float = 0.05, max_length: int = 512,
              engine_spec=None, engines: dict | None = None, n_bootstrap: int = 1000, seed: int = 0) -> BestOfN:
    """Sample n responses for each of the first m prompts, pick by member ``single`` and by the
    ensemble aggregate ``how``, and judge the differing picks with the constitution judge."""
    from ..constitution import load_constitution
    from ..evaluate import model_fingerprint
    from ..prefmath import decide
    from ..sources import read_prompts
    from .pool import EnginePool, same_model

    start = time.perf_counter()
    dirs = member_dirs(rm_dir)
    if not 0 <= single < len(dirs):
        raise EnsembleError(f"single member {single}: the ensemble has members 0–{len(dirs) - 1}")
    if how not in AGGREGATES:
        raise EnsembleError(f"unknown aggregate {how!r}; use one of {', '.join(AGGREGATES)}")
    const = load_constitution(constitution)
    table, skips = read_prompts(prompts, limit=m)
    items = [{"prompt_id": r["prompt_id"], "conversation": json.loads(r["messages"])} for r in table.to_pylist()]
    version = content_key("bon-prompts", str(prompts), [i["prompt_id"] for i in items])[:12]
    judge = judge or policy
    with EnginePool(engine_spec, engines) as pool, tables.open_store(db, f"bon-{version}") as store:
        pol = pool.get(policy)
        samples = _samples(store, pol, items, load_template(judging.REPO / "prompts" / "answer.j2"),
                           Sampling(max_tokens=max_tokens, temperature=temperature, n=n), "bon", version)
        usable = [i for i in items if len(samples.get(i["prompt_id"], [])) >= 2]
        flat = [(i, gid, text) for i in usable for gid, text in samples[i["prompt_id"]]]
        if not same_model(policy, judge):
            pool.release(policy)  # one engine at a time; the reward models are scored with transformers
        convs = [i["conversation"] + [{"role": "assistant", "content": text}] for i, _, text in flat]
        raw = member_rewards(dirs, convs, max_length=max_length)[0] if flat else np.zeros((len(dirs), 0))
        tables.insert_scores(store, [
            {"id": content_key("rm", str(d), model_fingerprint(str(d)), gid, max_length), "subject_id": gid,
             "suite": "bon", "item_id": i["prompt_id"], "scorer": "rm", "variant": d.name,
             "rule_hash": content_key(model_fingerprint(str(d))), "model": str(d), "value": float(raw[k, j]),
             "status": "ok"} for k, d in enumerate(dirs) for j, (i, gid, _) in enumerate(flat)])
        pairs, same, gaps = _picks(samples, usable, raw, how, lam, single)
        jud = pol if same_model(policy, judge) else pool.get(judge)
        p = _judge(store, jud, const, pairs, per_pair, seed, tie_eps) if pairs else np.zeros(0)
        chose_a, tie, _ = decide(p, tie_eps)
        ok = ~np.isnan(p)
        wins = np.where(tie, 0.5, chose_a.astype(float))[ok]
        result = BestOfN(str(rm_dir), policy, jud.model, len(usable), n, how, lam, same, len(pairs),
                         rate(wins, n_bootstrap, seed),
                         rate(np.concatenate([wins, np.full(same, 0.5)]), n_bootstrap, seed),
                         float(np.mean(gaps)) if gaps else None, time.perf_counter() - start,
                         {"prompts_skipped": [s.reason for s in skips],
                          "prompts_without_two_samples": len(items) - len(usable), "judge_failed": int((~ok).sum()),
                          "judge_ties": int(tie[ok].sum()),
                          "per_pair": per_pair, "single": single, "constitution": const.hash, "tie_eps": tie_eps,
                          "policy_identity": pol.model, "max_tokens": max_tokens, "temperature": temperature})
        _store(store, result)
    return result


def _store(store, r: BestOfN) -> None:
    from ..evaluate import EVAL_SCHEMA
    from ..store import now

    eval_id = content_key("bon", r.rm, r.policy, r.judge, r.prompts, r.n, r.aggregate, r.lam, r.details)
    store.con.execute("DELETE FROM evals WHERE eval_id = ?", [eval_id])
    store.insert("evals", [{"eval_id": eval_id, "kind": f"bon:{r.aggregate}", "model": r.rm,
                            "set_id": f"{r.prompts} prompts × {r.n}", "n": r.differing,
                            "accuracy": r.win_rate.value, "ties": r.same_pick, "created_at": now(),
                            "details_json": json.dumps({**r.details, "win_rate": r.win_rate.to_dict(),
                                                        "win_rate_all": r.win_rate_all.to_dict(),
                                                        "policy": r.policy, "judge": r.judge, "lam": r.lam,
                                                        "single_reward_gap": r.single_reward_gap})}], EVAL_SCHEMA)


__all__ = ["BestOfN", "best_of_n"]
