"""Tests for factory.train: config validation (file:line errors) and tiny real TRL runs on CPU.

The ``train``-marked tests run a few real optimiser steps of SFT, reward modelling and DPO on the
embedded SmolLM2-135M and check that the loss is finite and the weights moved (compared with the
base model's safetensors, read independently of the trainer).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from factory.train import check_args, load_config, prepare, train, trl_args
from factory.yamlconf import ConfigError, parse_yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import HH_RLHF as HH  # noqa: E402  (the shared human labels)
from test_export import add_run, pair, pref, revision  # noqa: E402  (fixture builders)

from factory.store import GEN_SCHEMA, PAIR_SCHEMA, PREFERENCE_SCHEMA, Store  # noqa: E402


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- validation


def test_unknown_args_key_points_at_its_line_with_close_matches(tmp_path):
    cfg = write(tmp_path / "c.yaml", "model: smollm2-135m\ndataset: d\noutput_dir: o\nargs:\n"
                                     "  max_steps: 2\n  learning_rat: 1.0e-5\n  frobnicate: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config("dpo", cfg)
    assert [(i.line, i.col) for i in e.value.issues] == [(6, 3), (7, 3)]
    assert "`args.learning_rat` is not a field of TRL's DPOConfig; did you mean 'learning_rate'" in str(e.value)
    assert f"{cfg}:7:3: `args.frobnicate` is not a field of TRL's DPOConfig" in str(e.value)


def test_fields_are_checked_against_the_kind_s_config_class(tmp_path):
    _, marks = parse_yaml("args:\n  beta: 0.1\n")
    check_args("dpo", {"beta": 0.1}, "x.yaml", marks)  # a DPOConfig field
    with pytest.raises(ConfigError, match=r"x.yaml:2:3: `args.beta` is not a field of TRL's SFTConfig"):
        check_args("sft", {"beta": 0.1}, "x.yaml", marks)
    _, marks = parse_yaml("args:\n  output_dir: x\n")
    with pytest.raises(ConfigError, match="set `output_dir` at the top level"):
        check_args("rm", {"output_dir": "x"}, "x.yaml", marks)


def test_unknown_top_level_key_and_missing_dataset(tmp_path):
    cfg = write(tmp_path / "c.yaml", "model: smollm2-135m\noutput_dir: o\nepochs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config("sft", cfg)
    text = str(e.value)
    assert ":3:1: unknown key 'epochs'" in text and "has no `dataset`" in text


def test_missing_dataset_folder_and_missing_model_are_located_errors(tmp_path):
    cfg = write(tmp_path / "c.yaml", f"model: smollm2-135m\ndataset: {tmp_path / 'nope'}\noutput_dir: {tmp_path / 'o'}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2:10: dataset folder .*nope not found; create it with `factory export sft"):
        prepare("sft", cfg)
    cfg = write(tmp_path / "m.yaml", f"model: {tmp_path / 'no-model'}\ndataset: {tmp_path}\noutput_dir: o\n")
    with pytest.raises(ConfigError, match=r"m.yaml:1:8: .*no-model"):
        prepare("sft", cfg)


@pytest.mark.slow  # loads the embedded model's tokenizer
def test_tokenizer_without_chat_template_is_an_error(tmp_path):
    from transformers import AutoTokenizer

    from factory.models import resolve

    folder = tmp_path / "plain"
    tok = AutoTokenizer.from_pretrained(resolve(None))
    tok.chat_template = None
    tok.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg = write(tmp_path / "c.yaml", f"model: {folder}\ndataset: {tmp_path}\noutput_dir: o\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1:8: the tokenizer of .* has no chat template.*smollm2-135m"):
        prepare("sft", cfg)


def test_human_pairs_cannot_train_sft_and_wrong_columns_are_named(tmp_path):
    from factory.export import export_human

    src = write(tmp_path / "p.jsonl", json.dumps({"prompt": "q", "response_a": "x", "response_b": "y",
                                                   "human_choice": "a"}) + "\n")
    cfg = write(tmp_path / "c.yaml", f"dataset: {{human: {src}}}\noutput_dir: {tmp_path / 'o'}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1:10: human preference pairs train rm or dpo, not sft"):
        prepare("sft", cfg)
    export_human(src, tmp_path / "h")
    cfg = write(tmp_path / "d.yaml", f"dataset: {tmp_path / 'h'}\noutput_dir: {tmp_path / 'o'}\n")
    with pytest.raises(ConfigError, match=r"sft needs \['messages'\]; make it with `factory export sft"):
        prepare("sft", cfg)


def test_cpu_rules_turn_off_bf16_and_checkpointing(tmp_path):
    a = trl_args("dpo", {"bf16": True, "max_steps": 2}, tmp_path, dev="cpu")
    assert (a.bf16, a.fp16, a.use_cpu, a.gradient_checkpointing, a.max_steps) == (False, False, True, False, 2)
    a = trl_args("sft", {"gradient_checkpointing": True}, tmp_path, dev="cpu")
    assert a.gradient_checkpointing is True


# ------------------------------------------------------------------------ real training (CPU)

ARGS = """args:
  max_steps: 2
  per_device_train_batch_size: 1
  max_length: 256
  logging_steps: 1
  save_strategy: "no"
  learning_rate: {lr}
  seed: 0
"""
PROBE = "model.layers.0.self_attn.q_proj.weight"


def _weight(folder: str | Path, key: str = PROBE):
    from safetensors import safe_open

    files = list(Path(folder).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as fh:
            if key in fh.keys():
                return fh.get_tensor(key).float()
    raise KeyError(f"{key} not in {files}")


def _check(result, base: str | None, key: str = PROBE) -> None:
    """Loss finite, and the ``key`` weight differs from ``base`` (None: from zero, LoRA's B)."""
    assert result.steps == 2
    assert math.isfinite(result.train_loss) and result.losses and all(math.isfinite(x) for x in result.losses)
    after = _weight(result.output_dir, key)
    moved = (after - (_weight(base, key) if base else 0 * after)).abs().max().item()
    assert moved > 0, "training did not change the weights"
    record = json.loads((result.output_dir / "factory_train.json").read_text())
    assert record["steps"] == 2 and record["trl_config"]
    print(f"\n{result.kind}: {result.seconds_per_step:.2f} s/step on {result.device} ({result.rows} rows)")


@pytest.mark.train
def test_sft_trains_from_a_duckdb_run(tmp_path):
    from factory.models import resolve

    db = tmp_path / "sl.duckdb"
    msgs = json.dumps([{"role": "user", "content": "How do I bake bread?"}])
    with Store(db) as s:
        add_run(s, "sl-1", "sl")
        s.insert("prompts", [{"prompt_id": f"p{i}", "messages": msgs.replace("bread", f"bread {i}"), "n_chars": 1,
                              "first_run_id": "sl-1"} for i in range(4)])
        s.insert("revisions", [revision(f"r{i}", f"p{i}", 1, "Mix flour, water, yeast; knead; bake.") for i in range(4)],
                 GEN_SCHEMA)
        s.link_run("sl-1", "revisions", [f"r{i}" for i in range(4)])
    cfg = write(tmp_path / "sft.yaml", f"model: smollm2-135m\ndataset: {{db: {db}, run_id: sl-1}}\n"
                                       f"output_dir: {tmp_path / 'out'}\n" + ARGS.format(lr="1.0e-4"))
    result = train("sft", cfg)
    _check(result, resolve(None))
    assert (tmp_path / "out" / "dataset" / "export.json").exists()


def _prefs_db(path: Path, n: int = 4) -> Path:
    """A preference run pr-1 of ``n`` short pairs, a (a refusal with an alternative) preferred at p=0.9."""
    with Store(path) as s:
        add_run(s, "pr-1", "prefs")
        s.insert("pairs", [pair(f"q{i}", "I can't help with that, but here is a safe option.", "Sure, do it.")
                           for i in range(n)], PAIR_SCHEMA)
        s.insert("preferences", [pref(f"q{i}", 0.9) for i in range(n)], PREFERENCE_SCHEMA)
    return path


@pytest.mark.slow  # loads the embedded model's tokenizer and builds a trainer
@pytest.mark.usefixtures("hh_rlhf")
def test_human_pairs_config_builds_a_reward_trainer(tmp_path):
    """The {human: …} dataset path end to end up to the constructed RewardTrainer (tiny model, no steps)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from factory.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve(None))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    cfg = write(tmp_path / "rm.yaml", f"model: {tmp_path / 'tiny'}\ndataset: {{human: {HH}, limit: 6, offset: 100}}\n"
                                      f"output_dir: {tmp_path / 'rm'}\nargs: {{max_steps: 1, max_length: 1024}}\n")
    p = prepare("rm", cfg)
    assert p.rows == 6 and len(p.trainer.train_dataset) == 6
    assert {"chosen_ids", "rejected_ids"} <= set(p.trainer.train_dataset.column_names)
    assert p.trainer.model.config.num_labels == 1


@pytest.mark.train
def test_reward_model_trains_on_ai_preferences(tmp_path):
    from transformers import AutoConfig

    from factory.models import resolve

    db = _prefs_db(tmp_path / "p.duckdb")
    cfg = write(tmp_path / "rm.yaml", f"dataset: {{db: {db}, run_id: pr-1, min_confidence: 0.5}}\n"
                                      f"output_dir: {tmp_path / 'rm'}\n" + ARGS.format(lr="1.0e-4"))
    result = train("rm", cfg)
    _check(result, resolve(None))
    config = AutoConfig.from_pretrained(tmp_path / "rm")
    assert config.num_labels == 1 and config.architectures == ["LlamaForSequenceClassification"]


@pytest.mark.train
def test_dpo_with_lora_trains_on_ai_preferences(tmp_path):
    """DPO with a LoRA adapter (the reference is the base with the adapter off): LoRA's B matrices
    start at zero, so any non-zero B after two steps is a weight change."""
    db = _prefs_db(tmp_path / "p.duckdb")
    cfg = write(tmp_path / "dpo.yaml", f"dataset: {{db: {db}, run_id: pr-1, soft: bernoulli}}\n"
                                       f"output_dir: {tmp_path / 'dpo'}\n"
                                       "peft: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}\n"
                                       + ARGS.format(lr="1.0e-3") + "  beta: 0.1\n")
    result = train("dpo", cfg)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _check(result, None, key=key)
    assert json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())["r"] == 4
