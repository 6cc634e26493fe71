"""A reward model as a judge: a local sequence-classifier folder scored in batches with transformers.

The folder is what ``factory train rm`` writes (``AutoModelForSequenceClassification`` with
``num_labels=1``; a LoRA adapter folder is merged on load), or any public reward model of that shape.
A request carries the two candidates as full chat conversations (``Request.candidates``: the
conversation plus one assistant turn each, in shown order); each is rendered with the model's chat
template exactly as TRL's RewardTrainer rendered the training pairs (and as ``factory eval rm``
scores them: :func:`factory.evaluate.load_model`, ``_chat_ids``), truncated to its last
``max_length`` tokens (the start of a long conversation is lost, the responses kept), and scored
under ``torch.no_grad`` in length-sorted, right-padded batches of ``batch_size`` sequences. The
answer is Bradley–Terry: ``option_logprobs = (log σ(r1 − r2), log σ(r2 − r1))``, so a judge mode
reads it like the two option log-probs of a one-step LLM judge, and swapping the order gives 1 − p.

Requests are pulled lazily from the caller's iterable, at most ``window`` pairs held at a time;
``None`` from the iterable ("nothing right now") scores what is held and yields it. The engine's
``model`` is the pipeline's name plus a content fingerprint of the folder
(:func:`factory.models.identity`), so a retrained reward model gets new keys.

Registering the kind (in ``factory/engines/__init__.py``)::

    @builder("reward_model")
    def _reward_model(spec, model):
        from .reward_model import build
        return build(spec, model)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from pydantic import Field

from .base import Capabilities, Completion, EngineError, Request

NOT_A_CLASSIFIER_HINT = ("a `reward_model` judge needs a sequence-classifier folder (AutoModelForSequenceClassification, "
                         "num_labels=1), such as one written by `factory train rm`; to judge with a chat model use "
                         "an LLM engine instead (`engine: {kind: vllm}` or `{kind: openai, base_url: …}`)")


def _define_spec():
    from ..config import EngineBase

    class RewardModelEngineSpec(EngineBase):
        """A reward model (sequence classifier) scored with transformers; it answers pairwise judgements only."""

        kind: Literal["reward_model"] = "reward_model"
        batch_size: int = Field(8, ge=1, description="sequences per forward pass (two per pair)")
        max_length: int | None = Field(None, ge=16, description="tokens scored per conversation + response; a "
                                       "longer one keeps its end (default: max_model_len)")
        device: Literal["cpu", "auto"] = Field("cpu", description="cpu, or auto (a GPU when torch sees one)")
        dtype: Literal["auto", "float32", "bfloat16"] = Field(
            "auto", description="auto: float32 on CPU (as `factory eval rm` scores), bfloat16 on a GPU; bfloat16 on a "
            "CPU with AMX/AVX512-bf16 is faster but rounds rewards (close pairs may flip)")

        def expected_model(self, model: str) -> str | None:
            """The identity this engine will have, from files alone (no model load); None if unknown."""
            from .. import models

            try:
                return models.identity(model, models.resolve(model, pull=False))
            except (models.ModelError, OSError):
                return None

    RewardModelEngineSpec.__module__, RewardModelEngineSpec.__qualname__ = __name__, "RewardModelEngineSpec"
    return RewardModelEngineSpec


def __getattr__(name: str):
    """``factory.config`` names this kind's settings in its engine union, so importing this module first
    imports config, which asks for the spec while this module is still loading: build it then (PEP 562)."""
    if name == "RewardModelEngineSpec":
        globals()[name] = spec = _define_spec()
        return spec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from .. import config as _config  # noqa: E402,F401  (may come back here for the spec: see __getattr__)

RewardModelEngineSpec = globals().get("RewardModelEngineSpec") or _define_spec()


def build(spec: RewardModelEngineSpec, model: str) -> "RewardModelEngine":
    """The ``reward_model`` engine for pipeline model name ``model`` (an existing folder)."""
    from .. import models

    try:
        path = models.resolve(model)
    except models.ModelError as e:
        raise EngineError(f"reward model '{model}': {e}; {NOT_A_CLASSIFIER_HINT}") from None
    return RewardModelEngine(path, model_name=model, seed=spec.seed, max_model_len=spec.max_model_len,
                             batch_size=spec.batch_size, max_length=spec.max_length, device=spec.device,
                             dtype=spec.dtype)


def load_reward_model(path: str | Path, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) of a reward-model folder, or an EngineError naming the folder and the fix."""
    from ..evaluate import load_model
    from ..models import ModelError

    if not Path(path).is_dir():
        raise EngineError(f"{path}: not a local folder; {NOT_A_CLASSIFIER_HINT}")
    try:
        model, tok = load_model(path, "rm")
    except (ModelError, OSError, ValueError, KeyError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        where = "" if str(path) in why else f"{path}: cannot be used as a reward model: "
        raise EngineError(f"{where}{why}; {NOT_A_CLASSIFIER_HINT}") from None
    import torch

    if device == "cpu" and model.device.type != "cpu":
        model = model.to("cpu").float()
    if dtype != "auto":
        model = model.to(getattr(torch, dtype))
    return model, tok


def score_token_ids(model, pad_id: int, seqs: list[list[int]], batch_size: int) -> np.ndarray:
    """The reward (logit 0) of each token sequence, in length-sorted right-padded batches under no_grad.

    The one batched scoring loop over token ids (``factory.evaluate.rm_scores`` is this after
    rendering and truncating; it can call this)."""
    import torch

    from ..evaluate import _batches, _pad

    out = np.empty(len(seqs), dtype=np.float64)
    with torch.no_grad():
        for idx in _batches([len(s) for s in seqs], batch_size):
            ids, mask = _pad([seqs[i] for i in idx], pad_id, model.device)
            out[idx] = model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu().numpy()
    return out


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log σ(x), stable at both ends."""
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


class RewardModelEngine:
    kind = "reward_model"

    def __init__(self, path: str | Path, *, model_name: str | None = None, seed: int = 0, max_model_len: int = 2048,
                 batch_size: int = 8, max_length: int | None = None, device: str = "cpu", dtype: str = "auto",
                 window: int | None = None):
        from ..models import identity

        self.path = str(path)
        self.reward_model, self.tokenizer = load_reward_model(path, device, dtype)
        self.model = identity(model_name, self.path)
        self.seed = seed
        self.max_model_len = max_model_len
        self.batch_size = batch_size
        self.max_length = max_length or max_model_len
        self.window = window or max(1, 4 * batch_size)  # pairs held before scoring (length-sorted together)
        self.capabilities = Capabilities(scoring="token_ids", prefill=False)
        self.truncated = 0  # sequences cut to their last max_length tokens so far
        self.pairs = 0

    def token_ids(self, text: str) -> list[int]:
        raise EngineError("a reward model has no option tokens: it scores the two candidates of "
                          "`Request.candidates` (judge mode reward_model), not options")

    def render(self, conversation) -> list[int]:
        """Token ids of one full conversation (ending with the candidate's assistant turn), as TRL trained it."""
        from ..evaluate import _chat_ids

        return _chat_ids(self.tokenizer, [dict(m) for m in conversation])

    def generate(self, requests: Iterable[Request | None]) -> Iterator[Completion]:
        held: list[Request] = []
        for req in requests:
            if req is None:  # nothing more right now: answer what is held
                if held:
                    yield from self._score(held)
                    held = []
                continue
            held.append(req)
            if len(held) >= self.window:
                yield from self._score(held)
                held = []
        if held:
            yield from self._score(held)

    def _score(self, reqs: list[Request]) -> list[Completion]:
        done: dict[int, Completion] = {}
        seqs: list[list[int]] = []
        owner: list[int] = []
        for i, req in enumerate(reqs):
            try:
                ids = [self.render(c) for c in _candidates(req)]
            except Exception as e:  # a malformed request or one the chat template refuses fails alone
                done[i] = Completion(key=req.key, status="failed", error=f"reward model: {type(e).__name__}: {e}")
                continue
            for s in ids:
                self.truncated += len(s) > self.max_length
                seqs.append(s[-self.max_length:])
                owner.append(i)
        rewards = score_token_ids(self.reward_model, self.tokenizer.pad_token_id, seqs, self.batch_size) if seqs \
            else np.empty(0)
        for j in range(0, len(seqs), 2):
            i, r1, r2 = owner[j], rewards[j], rewards[j + 1]
            lp = log_sigmoid(np.array([r1 - r2, r2 - r1]))
            done[i] = Completion(key=reqs[i].key, option_logprobs=(float(lp[0]), float(lp[1])),
                                 prompt_tokens=len(seqs[j]) + len(seqs[j + 1]), completion_tokens=0)
            self.pairs += 1
        return [done[i] for i in range(len(reqs))]

    def close(self) -> None:
        self.reward_model = None


def _candidates(req: Request) -> tuple:
    """The request's two candidate conversations, checked (a ValueError says what is wrong)."""
    cands = getattr(req, "candidates", None)
    if cands is None:
        raise ValueError("the request has no candidates; a reward model scores two candidate conversations "
                         "(judge mode reward_model sets Request.candidates), not a prompt")
    if len(cands) != 2:
        raise ValueError(f"a reward model compares exactly 2 candidates; got {len(cands)}")
    for k, conv in enumerate(cands):
        if not conv or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conv):
            raise ValueError(f"candidate {k + 1} is not a list of {{role, content}} messages")
        if conv[-1]["role"] != "assistant":
            raise ValueError(f"candidate {k + 1} does not end with the assistant turn to score "
                             f"(last role: {conv[-1]['role']!r})")
    return tuple(cands)


__all__ = ["RewardModelEngine", "RewardModelEngineSpec", "build", "load_reward_model", "log_sigmoid",
           "score_token_ids"]
