"""Trained models measured against held-out human preference labels (the RLAIF downstream test).

- ``eval_rm``: a reward model scores both responses of each human pair (conversation + response,
  rendered with the model's chat template exactly as TRL's RewardTrainer does); it is right when
  the human's choice scores strictly higher. A tie counts as wrong.
- ``eval_dpo``: a DPO policy's implicit reward ``r(y) = β·(log π(y|x) − log π_ref(y|x))``, the
  log-probs summed over the response tokens (prompt rendered with the generation prompt; the
  response starts where the tokenized prompt and prompt+response diverge, as in TRL).

Sequences longer than ``max_length`` keep their end (the response), losing the start of the
conversation; how many were cut is in ``details``. Scoring runs in batches sorted by length
(little padding) under ``torch.no_grad``; float32 on CPU, bf16 on GPU. With ``db`` the result
is stored in the ``evals`` table keyed by everything that determines it (kind, model folder and
its weight files' sizes/mtimes, human set and slice, β, max_length): rerunning replaces it.
Accuracies carry a seeded 95% bootstrap interval over pairs. Reward-model ensembles (a folder with
``ensemble.json``) are evaluated by ``factory.evals.ensemble``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .models import ModelError
from .store import Store, content_key, now

EVAL_SCHEMA = pa.schema([("eval_id", pa.string()), ("kind", pa.string()), ("model", pa.string()),
                         ("set_id", pa.string()), ("n", pa.int64()), ("accuracy", pa.float64()),
                         ("ties", pa.int64()), ("details_json", pa.string()),
                         ("created_at", pa.timestamp("us", tz="UTC"))])


@dataclass
class EvalResult:
    eval_id: str
    kind: str
    model: str
    set_id: str
    n: int
    accuracy: float
    ties: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lo, hi = self.details.get("ci", (None, None))
        ci = f" [95% CI {lo:.3f}, {hi:.3f}]" if lo is not None and lo == lo else ""
        return (f"{self.kind} eval of {self.model} on {self.n} human pairs ({self.set_id}): accuracy "
                f"{self.accuracy:.3f}{ci} ({self.ties} ties counted wrong) in {self.seconds:.1f} s")


def pairwise_accuracy(score_a: Any, score_b: Any, human_choice: Any) -> tuple[float, int, np.ndarray]:
    """``(accuracy, ties, correct)``: correct where the human's choice scores strictly higher."""
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    chose_a = np.asarray(human_choice) == "a"
    correct = np.where(chose_a, a > b, b > a)
    return (float(correct.mean()) if len(correct) else float("nan")), int((a == b).sum()), correct


# ------------------------------------------------------------------------------ model loading


def _model_path(name: str | Path) -> str:
    from .models import resolve

    path = resolve(str(name))
    if not Path(path).is_dir():
        raise ModelError(f"model '{name}' is not a local folder; pass a folder written by `factory train`")
    return path


def load_model(name: str | Path, kind: str):
    """(model, tokenizer) for ``kind`` "rm" (sequence classifier) or "lm"; LoRA adapters are merged."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = _model_path(name)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    adapter = (Path(path) / "adapter_config.json").exists()
    if adapter:
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        cls = AutoPeftModelForSequenceClassification if kind == "rm" else AutoPeftModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype, **({"num_labels": 1} if kind == "rm" else {})).merge_and_unload()
    else:
        config = AutoConfig.from_pretrained(path)
        if kind == "rm":
            archs = config.architectures or []
            if config.num_labels != 1 or not any("SequenceClassification" in a for a in archs):
                raise ModelError(f"{name} is not a reward model (architectures {archs}, num_labels "
                                 f"{config.num_labels}); train one with `factory train rm`")
        cls = AutoModelForSequenceClassification if kind == "rm" else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        raise ModelError(f"the tokenizer in {name} has no chat template; evaluate a chat model's folder")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if kind == "rm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tok


def _chat_ids(tok, messages: list[dict], **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


def _batches(lengths: list[int], batch_size: int) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(seqs: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding, as TRL's collators
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------- scoring


def rm_scores(model, tok, conversations: list[list[dict]], *, batch_size: int = 8,
              max_length: int = 512) -> tuple[np.ndarray, int]:
    """Reward of each full conversation (ending with the assistant turn) and how many were cut."""
    import torch

    seqs = [_chat_ids(tok, c) for c in conversations]
    cut = sum(len(s) > max_length for s in seqs)
    seqs = [s[-max_length:] for s in seqs]
    out = np.empty(len(seqs), dtype=np.float64)
    with torch.no_grad():
        for idx in _batches([len(s) for s in seqs], batch_size):
            ids, mask = _pad([seqs[i] for i in idx], tok.pad_token_id, model.device)
            out[idx] = model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu().numpy()
    return out, cut


def completion_ids(tok, prompt: list[dict], completion: list[dict], max_length: int) -> tuple[list[int], int, bool]:
    """(token ids, index of the first completion token, whether it was cut) for one example."""
    from trl.data_utils import common_prefix_length

    p = _chat_ids(tok, prompt, add_generation_prompt=True)
    full = _chat_ids(tok, prompt + completion)
    start = max(common_prefix_length(p, full), 1)
    if len(full) <= max_length:
        return full, start, False
    drop = len(full) - max_length
    if drop < start:  # cut the start of the conversation, keep the whole response
        return full[drop:], start - drop, True
    return full[start - 1:start - 1 + max_length], 1, True  # a response longer than max_length: keep its start


def completion_logps(model, tok, prompts: list[list[dict]], completions: list[list[dict]], *,
                     batch_size: int = 4, max_length: int = 512) -> tuple[np.ndarray, int]:
    """Σ log π(completion token | everything before it) per example, and how many were cut."""
    import torch

    items = [completion_ids(tok, p, c, max_length) for p, c in zip(prompts, completions)]
    out = np.empty(len(items), dtype=np.float64)
    with torch.no_grad():
        for idx in _batches([len(it[0]) for it in items], batch_size):
            ids, mask = _pad([items[i][0] for i in idx], tok.pad_token_id, model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            pos = torch.arange(ids.shape[1] - 1, device=ids.device)[None, :]
            starts = torch.tensor([items[i][1] for i in idx], device=ids.device)[:, None]
            keep = (pos >= starts - 1) & (mask[:, 1:] == 1)  # position t predicts token t + 1
            out[idx] = (logp * keep).sum(-1).cpu().numpy()
    return out, sum(it[2] for it in items)


# ------------------------------------------------------------------------------ evaluations


def human(spec: str | Path, limit: int | None, offset: int) -> tuple[pa.Table, list[list[dict]], dict]:
    from .export import ExportError, human_pairs

    table, dropped = human_pairs(spec, limit=limit, offset=offset)
    if table.num_rows == 0:
        raise ExportError(f"{spec}: no human-labelled pairs at offset {offset} (left out: {dropped})")
    convs = [json.loads(c) for c in table.column("conversation").to_pylist()]
    return table, convs, dropped


def model_fingerprint(path: str) -> list:
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def finish(kind: str, model: str, spec: str | Path, table: pa.Table, a: np.ndarray, b: np.ndarray,
           params: dict, extra: dict, seconds: float, db: str | Path | None, *, n_bootstrap: int = 1000,
           seed: int = 0) -> EvalResult:
    """Accuracy (with a seeded 95% bootstrap interval over pairs) of scores ``a``/``b`` against the
    human choices of ``table``; stored in ``evals`` (replacing the row of the same key) when ``db``."""
    from .audit.stats import bootstrap_mean_ci

    choice = table.column("human_choice").to_pylist()
    acc, ties, correct = pairwise_accuracy(a, b, choice)
    ci = bootstrap_mean_ci(correct.astype(np.float64), n_bootstrap, seed)
    set_id = str(spec)
    eval_id = content_key("eval", kind, str(Path(model).resolve()), model_fingerprint(model), set_id, params)
    details = {**params, **extra, "ci": list(ci), "pair_ids": table.column("pair_id").to_pylist(),
               "score_a": a.tolist(), "score_b": b.tolist(), "correct": correct.tolist()}
    result = EvalResult(eval_id, kind, str(model), set_id, len(choice), acc, ties, seconds, details)
    if db is not None:
        with Store(db, writer_run=f"eval-{eval_id}") as store:
            store.con.execute("DELETE FROM evals WHERE eval_id = ?", [eval_id])
            store.insert("evals", [{"eval_id": eval_id, "kind": kind, "model": str(model), "set_id": set_id,
                                    "n": len(choice), "accuracy": acc, "ties": ties, "created_at": now(),
                                    "details_json": json.dumps(details)}], EVAL_SCHEMA)
    return result


def eval_rm(model_dir: str | Path, human_spec: str | Path, *, limit: int | None = 50, offset: int = 0,
            db: str | Path | None = None, batch_size: int = 8, max_length: int = 512) -> EvalResult:
    """Pairwise accuracy of the reward model in ``model_dir`` on human pairs ``[offset, offset+limit)``."""
    start = time.perf_counter()
    model, tok = load_model(model_dir, "rm")
    table, convs, dropped = human(human_spec, limit, offset)
    reply = lambda col: [{"role": "assistant", "content": t} for t in table.column(col).to_pylist()]  # noqa: E731
    n = table.num_rows
    scores, cut = rm_scores(model, tok, [c + [r] for c, r in zip(convs + convs, reply("response_a") + reply("response_b"))],
                            batch_size=batch_size, max_length=max_length)
    params = {"limit": limit, "offset": offset, "max_length": max_length}
    return finish("rm", _model_path(model_dir), human_spec, table, scores[:n], scores[n:], params,
                   {"truncated": cut, "dropped": dropped}, time.perf_counter() - start, db)


def eval_dpo(policy_dir: str | Path, ref_dir: str | Path, human_spec: str | Path, *, beta: float = 0.1,
             limit: int | None = 50, offset: int = 0, db: str | Path | None = None, batch_size: int = 4,
             max_length: int = 512) -> EvalResult:
    """Pairwise accuracy of a DPO policy's implicit reward β·(log π − log π_ref) on human pairs."""
    start = time.perf_counter()
    table, convs, dropped = human(human_spec, limit, offset)
    n = table.num_rows
    prompts = convs + convs
    replies = [[{"role": "assistant", "content": t}] for t in
               table.column("response_a").to_pylist() + table.column("response_b").to_pylist()]
    logps = {}
    for name, path in (("policy", policy_dir), ("ref", ref_dir)):
        model, tok = load_model(path, "lm")
        logps[name], cut = completion_logps(model, tok, prompts, replies, batch_size=batch_size, max_length=max_length)
        del model
    reward = beta * (logps["policy"] - logps["ref"])
    params = {"limit": limit, "offset": offset, "max_length": max_length, "beta": beta,
              "ref": str(Path(_model_path(ref_dir)).resolve())}
    return finish("dpo", _model_path(policy_dir), human_spec, table, reward[:n], reward[n:], params,
                   {"truncated": cut, "dropped": dropped}, time.perf_counter() - start, db)


__all__ = ["EvalResult", "completion_ids", "completion_logps", "eval_dpo", "eval_rm", "finish", "human", "load_model",
           "model_fingerprint", "pairwise_accuracy", "rm_scores"]
