"""Judge-mode settings: one settings model per judge mode, registered by the mode's name.

``judge.<mode>: {...}`` in a pipeline sets a mode's own settings (``judge: {mode: vote, vote: {votes:
9}}``); the mode class in :mod:`factory.judges` reads them as ``spec.settings_for(name)``. A mode
whose settings existed before they were nested (``cot``, ``vote``) also names its legacy flat keys
(``cot_max_tokens``, ``votes``…): they still load, and the pipeline's hashed snapshot keeps that flat
shape, so files written before keep their run ids. A new mode's settings appear in the snapshot
only when they differ from the defaults.

Kept free of heavy imports: the pipeline config builds its ``judge:`` model from this registry.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MODE_SETTINGS: dict[str, type[BaseModel]] = {}
LEGACY_FLAT: dict[str, dict[str, str]] = {}  # mode -> {its field: the flat key it was written as}


def mode_settings(name: str, legacy: dict[str, str] | None = None):
    """Register a settings model for judge mode ``name`` (``legacy``: field -> old flat key)."""

    def register(cls: type[BaseModel]) -> type[BaseModel]:
        MODE_SETTINGS[name] = cls
        if legacy:
            LEGACY_FLAT[name] = legacy
        return cls

    return register


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


@mode_settings("cot", legacy={"max_tokens": "cot_max_tokens", "temperature": "cot_temperature"})
class CotSettings(_Settings):
    max_tokens: int = Field(96, ge=8, description="rationale length in tokens")
    temperature: float = Field(0.0, ge=0, description="rationale sampling temperature")


@mode_settings("vote", legacy={"votes": "votes", "temperature": "vote_temperature", "max_tokens": "vote_max_tokens"})
class VoteSettings(_Settings):
    votes: int = Field(5, ge=1, le=64, description="sampled verdicts per order")
    temperature: float = Field(1.0, ge=0, description="sampling temperature")
    max_tokens: int = Field(3, ge=1, le=16, description="tokens per sampled verdict")


@mode_settings("reward_model")
class RewardModelSettings(_Settings):
    """A reward model scores each pair once (order ``ab``): σ(r_a − r_b) is symmetric, so the other
    order would repeat the same two forward passes."""

    principle_id: str = Field("reward", description="the pseudo-principle its judgements are stored under")


def flat_keys() -> dict[str, tuple[str, str]]:
    """Every legacy flat key -> (mode, field)."""
    return {flat: (mode, f) for mode, m in LEGACY_FLAT.items() for f, flat in m.items()}
