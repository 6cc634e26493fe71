"""Thin wrappers over TRL's SFTTrainer, RewardTrainer and DPOTrainer, configured in YAML.

A training config (see ``train/*.yaml``)::

    model: smollm2-135m            # alias, local folder or hub id (factory.models.resolve)
    dataset: data/exports/demo-sft # an export folder, or a mapping that exports first:
    #   {db: data/demo.duckdb, run_id: demo-…, rounds: [2]}           (sft: revisions)
    #   {db: …, run_id: …, min_confidence: 0.2, soft: bernoulli}      (rm/dpo: AI preferences)
    #   {human: path/to/hh-rlhf.jsonl.gz, limit: 200, offset: 0}      (rm/dpo: human labels)
    output_dir: runs/sft-demo
    peft: {r: 16, alpha: 32, target_modules: all-linear}   # optional LoRA
    args: {max_steps: 3, per_device_train_batch_size: 2, max_length: 256}
    ensemble: 3                    # rm only: k members in output_dir/member-0 … member-(k-1)
    bootstrap: true                # rm ensembles: each member trains on a seeded bootstrap of the pairs

``args`` passes straight to ``SFTConfig`` / ``RewardConfig`` / ``DPOConfig``; a key that is not a
field of that dataclass is an error at its line, with the closest field names. Device choices:
on CPU bf16/fp16 are forced off and ``use_cpu`` on, and gradient checkpointing defaults to off
(it only trades compute for memory, which a 135M model on CPU does not need); on a GPU TRL's
default (bf16 on) stands. Models load in float32 (TRL's default), so small CPU updates are not
lost to bf16 rounding and GPU runs use bf16 autocast over float32 master weights.

Reward-model ensembles (``ensemble: k``): member i trains with seed ``args.seed + i`` (TRL's
default 42 when unset) and, with ``bootstrap: true``, on n pairs drawn with replacement from the
n training pairs by a generator seeded from (seed, i). Each member is saved in
``output_dir/member-i`` with its ``factory_train.json``; ``output_dir/ensemble.json`` lists the
members (seed, rows, distinct rows, loss, time). A member whose ``factory_train.json`` carries
the same member key (config, base model, dataset content, index, seed, bootstrap) is not trained
again, so an interrupted ensemble resumes at the next member.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .yamlconf import ConfigError, Issue, Marks, error_at, load_yaml_data, validate_data

KINDS: dict[str, tuple[str, str]] = {
    "sft": ("SFTConfig", "SFTTrainer"),
    "rm": ("RewardConfig", "RewardTrainer"),
    "dpo": ("DPOConfig", "DPOTrainer"),
}
NEEDED_COLUMNS = {"sft": ("messages",), "rm": ("chosen", "rejected"), "dpo": ("prompt", "chosen", "rejected")}
EXPORT_HINT = {"sft": "factory export sft --db … --run … --out …",
               "rm": "factory export prefs … (or factory export human …)", "dpo": "factory export prefs … (or factory export human …)"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DbData(Strict):
    """Export a run of a DuckDB store first (sft: revisions; rm/dpo: preference labels)."""

    db: str = Field(description="the DuckDB file")
    run_id: str = Field(description="the run id (`factory status --db …` lists them)")
    rounds: list[int] | None = None
    principles: list[str] | None = None
    include_failed: bool = False
    min_confidence: float = Field(0.0, ge=0, le=1)
    position_consistent_only: bool = False
    soft: Literal["none", "bernoulli"] = "none"
    seed: int = 0


class HumanData(Strict):
    """Export human-labelled pairs first (rm/dpo): chosen = the human's choice."""

    human: str = Field(description="an hh-rlhf or pairs JSONL file, saved dataset or HF name")
    limit: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    format: Literal["auto", "hh-rlhf", "jsonl"] = "auto"


class Lora(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainConfig(Strict):
    model: str = Field("smollm2-135m", description="the embedded alias, a local folder or a hub id")
    dataset: str | DbData | HumanData = Field(description="an export folder or a {db, run_id} / {human} mapping")
    output_dir: str = Field(description="where the trained model (and the exported dataset) go")
    peft: Lora | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="fields of the TRL config class")
    ensemble: int = Field(1, ge=1, le=32, description="rm only: train k members (seed + i), in output_dir/member-i")
    bootstrap: bool = Field(False, description="rm ensembles: each member trains on a seeded bootstrap of the pairs")


@dataclass
class TrainResult:
    kind: str
    output_dir: Path
    model: str
    rows: int
    steps: int
    seconds: float
    device: str
    train_loss: float
    losses: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")


@dataclass
class Prepared:
    """Everything ``train`` needs, loaded and checked; ``trainer`` is a constructed TRL trainer."""

    kind: str
    cfg: TrainConfig
    model: str
    trainer: Any
    rows: int
    device: str


# ------------------------------------------------------------------------------ validation


def config_class(kind: str):
    import trl

    if kind not in KINDS:
        raise ConfigError("<kind>", f"unknown training kind {kind!r}; use sft, rm or dpo")
    return getattr(trl, KINDS[kind][0])


def check_args(kind: str, args: dict, path: str | Path, marks: Marks) -> None:
    """Every key of ``args`` must be a field of the TRL config class (errors at the key's line)."""
    allowed = sorted(f.name for f in dataclasses.fields(config_class(kind)) if f.init)
    issues = []
    for key in args:
        line, col = marks.find(("args", key), key=True)
        if key == "output_dir":
            issues.append(Issue(str(path), line, col, "set `output_dir` at the top level, not under `args`"))
        elif key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            issues.append(Issue(str(path), line, col,
                                f"`args.{key}` is not a field of TRL's {KINDS[kind][0]}{hint}"))
    if issues:
        raise ConfigError.many(issues)


def load_config(kind: str, path: str | Path) -> tuple[TrainConfig, Marks]:
    data, marks = load_yaml_data(path)
    cfg = validate_data(data, marks, TrainConfig, path, what=f"{kind} training config")
    for key, bad in (("ensemble", cfg.ensemble > 1), ("bootstrap", cfg.bootstrap)):
        if bad and kind != "rm":
            raise error_at(path, marks, (key,), f"`{key}` is for reward models (`factory train rm`), not {kind}", key=True)
    check_args(kind, cfg.args, path, marks)
    return cfg, marks


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def trl_args(kind: str, args: dict, output_dir: str | Path, dev: str | None = None):
    """The TRL config object: ``args`` plus the device rules of the module docstring."""
    dev = dev or device()
    final = dict(args)
    if dev == "cpu":
        final.update(bf16=False, fp16=False, use_cpu=True)
        final.setdefault("gradient_checkpointing", False)
    final.setdefault("report_to", "none")
    # checkpoints exist to resume after a kill: keep only the newest (each is the model plus its
    # optimizer state, ~3x the model) unless the config asks for more
    final.setdefault("save_total_limit", 1)
    return config_class(kind)(output_dir=str(output_dir), **final)


# -------------------------------------------------------------------------------- datasets


def load_dataset_folder(folder: str | Path):
    """A folder written by an export (or any ``save_to_disk`` folder), or a parquet file/folder."""
    import datasets

    folder = Path(folder)
    if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(folder))
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    files = [folder] if folder.suffix == ".parquet" else sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(folder)
    return datasets.Dataset.from_parquet([str(f) for f in files])


def resolve_dataset(kind: str, cfg: TrainConfig, path: str | Path, marks: Marks):
    """The training dataset named by ``cfg.dataset`` (exporting first for a db/human mapping)."""
    from .export import export_human, export_prefs, export_sft
    from .store import StoreError

    spec = cfg.dataset
    at = ("dataset",)
    try:
        if isinstance(spec, str):
            folder = Path(spec)
            if not folder.exists():
                raise error_at(path, marks, at, f"dataset folder {spec} not found; create it with `{EXPORT_HINT[kind]}` "
                                                "or give a {db, run_id} mapping to export on the fly")
            ds = load_dataset_folder(folder)
        else:
            out = Path(cfg.output_dir) / "dataset"
            if isinstance(spec, HumanData):
                if kind == "sft":
                    raise error_at(path, marks, at, "human preference pairs train rm or dpo, not sft; "
                                                    "give an sft export or a {db, run_id} of a critique→revise run")
                export_human(spec.human, out, limit=spec.limit, offset=spec.offset, format=spec.format)
            elif kind == "sft":
                export_sft(spec.db, spec.run_id, out, rounds=spec.rounds, principles=spec.principles,
                           include_failed=spec.include_failed)
            else:
                export_prefs(spec.db, spec.run_id, out, min_confidence=spec.min_confidence,
                             position_consistent_only=spec.position_consistent_only, principles=spec.principles,
                             soft=spec.soft, seed=spec.seed)
            ds = load_dataset_folder(out)
    except (StoreError, FileNotFoundError) as e:
        raise error_at(path, marks, at, f"cannot use this dataset: {e}") from None
    missing = [c for c in NEEDED_COLUMNS[kind] if c not in ds.column_names]
    if missing:
        raise error_at(path, marks, at, f"the dataset has columns {ds.column_names} but {kind} needs {missing}; "
                                        f"make it with `{EXPORT_HINT[kind]}`")
    if len(ds) == 0:
        raise error_at(path, marks, at, "the dataset has no rows")
    return ds


def resolve_model(cfg: TrainConfig, path: str | Path, marks: Marks) -> tuple[str, Any]:
    """(model path or hub id, tokenizer); a tokenizer without a chat template is an error."""
    from transformers import AutoTokenizer

    from .models import ModelError, resolve

    try:
        name = resolve(cfg.model)
    except ModelError as e:
        raise error_at(path, marks, ("model",), str(e)) from None
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise error_at(path, marks, ("model",), f"cannot load model '{cfg.model}' ({name}): {str(e).splitlines()[0]}; "
                                                "give an existing model folder or the embedded alias smollm2-135m") from None
    if not tok.chat_template and "chat_template_path" not in cfg.args:
        raise error_at(path, marks, ("model",), f"the tokenizer of '{cfg.model}' has no chat template, which the "
                                                "conversational datasets need; pass a chat/instruct model (e.g. "
                                                "smollm2-135m) or set args.chat_template_path")
    return name, tok


# -------------------------------------------------------------------------------- training


def make_trainer(kind: str, model: str, dataset, output_dir: str | Path, *, args: dict | None = None,
                 tokenizer=None, peft: Lora | None = None, dev: str | None = None):
    """Construct the TRL trainer of ``kind`` on ``dataset`` (the single place trainers are built)."""
    import trl

    if kind not in KINDS:
        raise ConfigError("<kind>", f"unknown training kind {kind!r}; use sft, rm or dpo")
    config = trl_args(kind, args or {}, output_dir, dev)
    peft_config = None
    if peft is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                                 target_modules=peft.target_modules,
                                 task_type="SEQ_CLS" if kind == "rm" else "CAUSAL_LM")
    trainer_cls = getattr(trl, KINDS[kind][1])
    return trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                       peft_config=peft_config)


@dataclass
class Member:
    """One reward model of an ensemble (or the single model: index None, saved in output_dir)."""

    index: int | None
    seed: int
    output_dir: Path
    bootstrap: bool = False


def members(cfg: TrainConfig) -> list[Member]:
    seed = int(cfg.args.get("seed", 42))  # TRL's default seed
    if cfg.ensemble == 1 and not cfg.bootstrap:
        return [Member(None, seed, Path(cfg.output_dir))]
    return [Member(i, seed + i, Path(cfg.output_dir) / f"member-{i}", cfg.bootstrap) for i in range(cfg.ensemble)]


def bootstrap_rows(n: int, member: Member) -> list[int]:
    """The row indices a member trains on: all n, or n drawn with replacement (seeded by seed and index)."""
    if not member.bootstrap:
        return list(range(n))
    import numpy as np

    from .store import content_key

    rng = np.random.default_rng(int(content_key("bootstrap", member.seed, member.index), 16))
    return rng.integers(0, n, n).tolist()


def resample(ds, member: Member):
    """The member's training dataset (the whole one unless it is a bootstrap member)."""
    return ds.select(bootstrap_rows(len(ds), member)) if member.bootstrap else ds


def dataset_hash(ds) -> str:
    """A content hash of the training rows (decides whether a stored ensemble member is still valid)."""
    import hashlib

    import pyarrow as pa

    sink = pa.BufferOutputStream()
    table = ds.data.table.combine_chunks()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def _build(kind: str, cfg: TrainConfig, config_path, marks, model: str, tok, ds, dev: str, member: Member):
    args = {**cfg.args, "seed": member.seed}
    try:
        return make_trainer(kind, model, resample(ds, member), member.output_dir, args=args, tokenizer=tok,
                            peft=cfg.peft, dev=dev)
    except (TypeError, ValueError) as e:  # a TRL/transformers argument check
        raise error_at(config_path, marks, ("args",), f"TRL rejected the arguments: {e}") from None


def prepare(kind: str, config_path: str | Path) -> Prepared:
    """Load and check the config, model, tokenizer and dataset; construct the trainer (of member 0
    for an ensemble)."""
    cfg, marks = load_config(kind, config_path)
    model, tok = resolve_model(cfg, config_path, marks)
    ds = resolve_dataset(kind, cfg, config_path, marks)
    dev = device()
    trainer = _build(kind, cfg, config_path, marks, model, tok, ds, dev, members(cfg)[0])
    return Prepared(kind, cfg, model, trainer, len(ds), dev)


def last_checkpoint(out: Path, cfg: TrainConfig, model: str, kind: str) -> str | None:
    """The newest ``checkpoint-N`` in ``out`` written by this same training (kind, config, base), to
    resume from after a kill (``args.save_steps`` sets how often they are written); None otherwise.
    A checkpoint of another training in the same folder is not resumed: its ``factory_resume.json``
    key differs (the folder's checkpoints are then left to TRL, which overwrites them)."""
    import re
    import shutil

    from .store import content_key

    snapshot = json.loads(cfg.model_dump_json())
    snapshot.pop("output_dir")
    key = content_key("train-resume", kind, snapshot, model)
    marker = out / "factory_resume.json"
    found = None
    # newest first; a checkpoint is complete once its trainer_state.json (written last) parses: one
    # a kill cut short is removed, and training resumes from the one before it
    ckpts = sorted((p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()),
                   key=lambda p: int(p.name.split("-")[1]), reverse=True) if out.is_dir() else []
    for ckpt in ckpts:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            found = str(ckpt)
            break
        except (OSError, ValueError):
            shutil.rmtree(ckpt, ignore_errors=True)
    old = json.loads(marker.read_text()).get("key") if marker.exists() else None
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "kind": kind, "base_model": model}))
    return found if found and old == key else None


def drop_checkpoints(out: Path) -> None:
    """Remove the ``checkpoint-N`` folders a finished training leaves in ``out`` (kept only when the
    config sets ``args.save_total_limit``)."""
    import re
    import shutil

    for p in out.glob("checkpoint-*"):
        if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _fit(kind: str, trainer, cfg: TrainConfig, out: Path, model: str, rows: int, dev: str, config_path,
         extra: dict) -> TrainResult:
    start = time.perf_counter()
    resume = last_checkpoint(out, cfg, model, kind)
    res = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    trainer.save_model(str(out))
    if "save_total_limit" not in cfg.args:  # finished: the resume checkpoints are no longer needed
        drop_checkpoints(out)
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    result = TrainResult(kind, out, model, rows, int(res.global_step), seconds, dev, float(res.training_loss), losses)
    record = {**dataclasses.asdict(result), "seconds_per_step": result.seconds_per_step,
              "config": json.loads(cfg.model_dump_json()), "config_path": str(config_path),
              "trl_config": KINDS[kind][0], "metrics": res.metrics, "resumed_from": resume, **extra}
    (out / "factory_train.json").write_text(json.dumps(record, indent=2, default=str))
    return result


def train(kind: str, config_path: str | Path) -> TrainResult:
    """Run ``factory train <kind> <config>``; the model and ``factory_train.json`` go to ``output_dir``
    (an ensemble: one folder per member and ``ensemble.json``; the result is the last member's)."""
    cfg, marks = load_config(kind, config_path)
    model, tok = resolve_model(cfg, config_path, marks)
    ds = resolve_dataset(kind, cfg, config_path, marks)
    dev = device()
    plan = members(cfg)
    if plan[0].index is None:
        trainer = _build(kind, cfg, config_path, marks, model, tok, ds, dev, plan[0])
        return _fit(kind, trainer, cfg, plan[0].output_dir, model, len(ds), dev, config_path, {})
    from .store import content_key

    snapshot = json.loads(cfg.model_dump_json())
    snapshot.pop("output_dir")
    data_hash = dataset_hash(ds)
    done: list[dict] = []
    result = None
    for m in plan:
        key = content_key("rm-member", snapshot, model, data_hash, m.index, m.seed, m.bootstrap)
        record_path = m.output_dir / "factory_train.json"
        old = json.loads(record_path.read_text()) if record_path.exists() else {}
        if old.get("member", {}).get("key") != key:
            trainer = _build(kind, cfg, config_path, marks, model, tok, ds, dev, m)
            rows = len(ds)
            distinct = len(set(bootstrap_rows(len(ds), m)))
            info = {"key": key, "index": m.index, "seed": m.seed, "bootstrap": m.bootstrap, "distinct_rows": distinct,
                    "dataset_hash": data_hash}
            result = _fit(kind, trainer, cfg, m.output_dir, model, rows, dev, config_path, {"member": info})
            old = json.loads(record_path.read_text())
        done.append({"path": m.output_dir.name, **old["member"], "rows": old["rows"], "steps": old["steps"],
                     "train_loss": old["train_loss"], "seconds": old["seconds"]})
    manifest = {"kind": "rm-ensemble", "k": len(plan), "bootstrap": cfg.bootstrap, "base_model": model,
                "training_rows": len(ds), "dataset_hash": data_hash, "config": json.loads(cfg.model_dump_json()),
                "config_path": str(config_path), "members": done}
    Path(cfg.output_dir, "ensemble.json").write_text(json.dumps(manifest, indent=2, default=str))
    if result is None:  # every member was already trained
        last = done[-1]
        result = TrainResult(kind, plan[-1].output_dir, model, last["rows"], last["steps"], 0.0, dev, last["train_loss"])
    return result


__all__ = ["KINDS", "Member", "Prepared", "TrainConfig", "TrainResult", "check_args", "load_config", "make_trainer",
           "bootstrap_rows", "members", "prepare", "resample", "train", "trl_args"]
