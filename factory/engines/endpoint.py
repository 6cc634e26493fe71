"""What an OpenAI-compatible endpoint can do, and how its log-probs become option log-probs.

Detection (``detect_*``) sends a few tiny requests at start-up (one generated token each) through a
``post(body) -> (status, json, error)`` callable, so it is independent of the HTTP client:
- ``token_ids``: vLLM's ``logprob_token_ids`` extension (log-probs of exactly the given token ids,
  answered as ``token_id:<id>`` entries). Exact, and needs the option labels' token ids.
- ``top_k``: the standard ``logprobs: true, top_logprobs: k`` of the chat API (vLLM, SGLang,
  llama.cpp, hosted APIs). k is the largest of the configured k, 20, 10, 5, 1 the endpoint accepts.
- ``none``: no log-probs at all (only sampled verdicts).
- ``prefill``: whether the endpoint continues a final assistant message (vLLM's and SGLang's
  ``continue_final_message`` with ``add_generation_prompt: false``). Hosted APIs reject the field
  or ignore it. Probe: the same two-turn conversation asked with both fields and with
  ``add_generation_prompt: false`` alone. A continued message has no end-of-turn marker, so the
  prompt is shorter; an endpoint that ignores the field counts both the same. Where it counts both
  the same but its answer continues the message anyway (llama.cpp prefills a final assistant
  message by itself), prefill is reported too.

Reading options from a top-k answer (:func:`option_logprobs`), the one rule:
- A returned token matches an option label when both are equal after stripping whitespace: the
  label itself, the label with a leading space (``" A"``), or with a newline after it. Case
  matters. Several tokens matching one option (``"A"`` and ``" A"``) are alternative spellings of
  the same answer, so their probabilities add (log-sum-exp). The sampled token counts as an entry
  too (it can lie outside the top k when sampling).
- An option with no matching token in the top k gets the floor
  ``log(min(p_k, 1 - sum(top-k p)) / 2)``: its probability is at most that of the k-th token (it
  ranked below all of them) and at most the mass the top k left over, and we credit it half of
  that bound (never less than 1e-12 / 2). So a floored option is never credited with more than it
  could have had, and the value stays finite for the label rule. Its index goes in
  ``Completion.floored`` so the row is flagged; it is never dropped. When both options are
  floored, both get the same value (P = 0.5: no information) and both are flagged.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from .base import Capabilities, EngineError

Post = Callable[[dict], "tuple[int, Any, str]"]  # body -> (HTTP status, parsed JSON or None, error text)


class EndpointError(EngineError):
    """The endpoint cannot serve this run at all (unreachable, wrong model, missing features)."""


FLOOR_MIN_P = 1e-12
PROBE_MESSAGES = [{"role": "user", "content": "Which letter comes first in the alphabet, A or B? Answer with one letter."}]
PREFILL_MESSAGES = [{"role": "user", "content": "Continue the count: 1, 2, 3"},
                    {"role": "assistant", "content": "4, 5,"}]


# --- reading an answer --------------------------------------------------------------------------

def first_position(choice: dict) -> dict | None:
    """The log-prob record of the first generated token, ``choice.logprobs.content[0]`` (None when
    the answer carries no log-probs)."""
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    content = lp.get("content") if isinstance(lp, dict) else None
    return content[0] if isinstance(content, list) and content and isinstance(content[0], dict) else None


def top_entries(pos: dict | None) -> list[tuple[str, float]]:
    """``(token text, log-prob)`` of the ``top_logprobs`` at one position."""
    return [(str(e["token"]), float(e["logprob"])) for e in (pos or {}).get("top_logprobs") or []]


def matches(token: str, label: str) -> bool:
    """A returned token spells the option label (see the module docstring)."""
    text = token.strip()
    return bool(text) and text == label.strip()


def logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m if m == -math.inf else m + math.log(sum(math.exp(x - m) for x in xs))


def floor_logprob(top: list[float]) -> float:
    """The value given to an option missing from these top-k log-probs (see the module docstring)."""
    probs = [math.exp(x) for x in top]
    bound = min(min(probs), max(0.0, 1.0 - sum(probs)))
    return math.log(max(bound, FLOOR_MIN_P) / 2)


def option_logprobs(options: tuple[str, ...], pos: dict) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """One log-prob per option from a top-k answer, and the indexes of the floored options."""
    top = top_entries(pos)
    if not top:
        raise ValueError("the answer has no top_logprobs entries")
    entries = list(top)
    sampled, lp = pos.get("token"), pos.get("logprob")
    if isinstance(sampled, str) and isinstance(lp, (int, float)) and not any(
            t == sampled and abs(x - lp) < 1e-6 for t, x in top):
        entries.append((sampled, float(lp)))
    floor = floor_logprob([x for _, x in top])
    out, floored = [], []
    for i, label in enumerate(options):
        found = [x for t, x in entries if matches(t, label)]
        if found:
            out.append(logsumexp(found))
        else:
            out.append(floor)
            floored.append(i)
    return tuple(out), tuple(floored)


def distinct_labels(options: tuple[str, ...]) -> bool:
    """Labels that text matching can tell apart (``"A"`` and ``" A"`` cannot)."""
    stripped = [o.strip() for o in options]
    return all(stripped) and len(set(stripped)) == len(stripped)


# --- which model ---------------------------------------------------------------------------------

def match_served(model: str, served: dict[str, dict]) -> tuple[str, dict]:
    """The served id (and its /models entry) for the pipeline's model name: the name itself, or the
    local folder it resolves to (a server started with ``--model <folder>`` lists the folder)."""
    from .. import models

    candidates = [model]
    try:
        candidates.append(models.resolve(model, pull=False))
    except models.ModelError:
        pass
    real = {os.path.realpath(s): s for s in served if os.path.exists(s)}
    for c in candidates:
        if c in served:
            return c, served[c]
        if os.path.exists(c) and os.path.realpath(c) in real:
            return real[os.path.realpath(c)], served[real[os.path.realpath(c)]]
    raise EndpointError(
        f"endpoint serves {sorted(served)}; set the pipeline's `model` to one of them "
        f"(or start the server with --served-model-name {model})"
    )


def local_tokenizer(model: str, served: str) -> str | None:
    """A tokenizer folder on this machine for the model, if any."""
    from .. import models

    for name in (model, served):
        try:
            path = models.resolve(name, pull=False)
        except models.ModelError:
            continue
        if os.path.isdir(path):
            return path
    return None


# --- detection ----------------------------------------------------------------------------------

def _base(model: str, messages: list[dict], max_tokens: int = 1) -> dict:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}


def _pos(data: Any) -> dict | None:
    choices = data.get("choices") if isinstance(data, dict) else None
    return first_position(choices[0]) if isinstance(choices, list) and choices else None


def detect_token_ids(post: Post, model: str, ids: list[int]) -> tuple[bool, str]:
    """Whether the endpoint answers vLLM's ``logprob_token_ids`` with exactly those ids."""
    body = {**_base(model, PROBE_MESSAGES), "logprobs": True, "logprob_token_ids": ids, "return_tokens_as_token_ids": True}
    status, data, error = post(body)
    if status != 200:
        return False, f"logprob_token_ids rejected ({error})"
    got = {t for t, _ in top_entries(_pos(data))}
    if all(f"token_id:{i}" in got for i in ids):
        return True, "vLLM's logprob_token_ids extension (exact option token ids)"
    return False, "logprob_token_ids ignored (no token_id:<id> entries in the answer)"


def detect_top_k(post: Post, model: str, k: int) -> tuple[int, str]:
    """The k of standard ``top_logprobs`` the endpoint answers with (0: no log-probs)."""
    error = ""
    for kk in sorted({x for x in (k, 20, 10, 5, 1) if x <= k}, reverse=True):
        status, data, error = post({**_base(model, PROBE_MESSAGES), "logprobs": True, "top_logprobs": kk})
        if status == 200:
            pos = _pos(data)
            if pos is None:
                return 0, "the answer has no logprobs field"
            got = len(top_entries(pos))
            if not got:
                return 0, "the answer has logprobs but no top_logprobs entries"
            return min(kk, got), f"standard top_logprobs (k={min(kk, got)}, options matched by token text)"
    return 0, f"top_logprobs rejected ({error})"


def detect_prefill(post: Post, model: str) -> tuple[bool, str]:
    """Whether the endpoint continues a final assistant message (see the module docstring)."""
    status, cont, error = post({**_base(model, PREFILL_MESSAGES, 3), "continue_final_message": True,
                                "add_generation_prompt": False})
    if status != 200:
        return False, f"continue_final_message rejected ({error})"
    status, closed, error = post({**_base(model, PREFILL_MESSAGES, 3), "add_generation_prompt": False})
    n_cont = ((cont or {}).get("usage") or {}).get("prompt_tokens")
    n_closed = ((closed or {}).get("usage") or {}).get("prompt_tokens") if status == 200 else None
    if isinstance(n_cont, int) and isinstance(n_closed, int) and n_cont < n_closed:
        return True, f"continues a final assistant message ({n_cont} vs {n_closed} prompt tokens)"
    try:
        text = cont["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        text = ""
    if text.strip().startswith("6"):
        return True, "continues a final assistant message by itself (the probe's count went on)"
    return False, "continue_final_message ignored (the assistant message is closed and a new turn starts)"


def detect(post: Post, model: str, token_ids: Callable[[str], list[int]], *, scoring: str = "auto", k: int = 20,
           prefill: bool | str = "auto") -> tuple[Capabilities, dict[str, str]]:
    """The endpoint's capabilities and, per item, why (detected or forced). ``scoring`` auto prefers
    exact token ids, then standard top-k, then none; ``top_k`` is filled whenever top-k works."""
    why: dict[str, str] = {}
    top_k = 0
    if scoring == "auto":
        try:
            ids = [token_ids(label)[0] for label in ("A", "B")]
        except EngineError as e:
            ok, why_ids = False, f"no token ids ({str(e).split(';')[0]})"
        else:
            ok, why_ids = detect_token_ids(post, model, ids)
        top_k, why_top = detect_top_k(post, model, k)
        scoring = "token_ids" if ok else "top_k" if top_k else "none"
        why["scoring"] = f"detected: {why_ids}" if ok else f"detected: {why_top}; {why_ids}"
    else:
        top_k = k if scoring == "top_k" else 0
        why["scoring"] = "forced by engine.scoring" + (f" (k={k})" if top_k else "")
    if prefill == "auto":
        prefill, why_prefill = detect_prefill(post, model)
        why["prefill"] = f"detected: {why_prefill}"
    else:
        why["prefill"] = "forced by engine.prefill"
    return Capabilities(scoring=scoring, top_k=top_k, prefill=bool(prefill)), why
