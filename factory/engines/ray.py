"""Ray backend: N replicas (Ray actors, each holding one engine, normally a ``VLLMEngine``).

How work is shared: the batch is cut into chunks of ``chunk_size`` requests; each replica holds at
most ``inflight_per_replica`` chunks (one running, one queued so it never idles) and the next
chunk goes to the least-loaded live replica, so fast replicas take more work. ``ray.wait`` yields
chunks as they complete; a chunk's completions are released only once the whole chunk is back,
which is what makes a killed replica unable to duplicate rows.

Faults: replicas are created with ``max_restarts`` and ``max_task_retries`` = ``max_restarts``.
A killed replica is restarted by Ray (its engine rebuilt) and its unfinished chunks are re-run on
it; rows of chunks that already came back are not recomputed. When a replica is gone for good
(restarts used up), its unfinished chunks are yielded as ``failed`` with the error (retry them with
``--retry-failed``) and the rest goes to the surviving replicas; with none left, ``generate`` raises
:class:`EngineError`, so the run ends ``failed`` and everything not stored is left for the resume.

Requests are pulled lazily from the caller's iterable, a chunk at a time, only while a replica has
room: the driver holds at most ``replicas × inflight_per_replica`` chunks, whatever the run's size.

Parquet shards (``shard_dir``): workers write each finished chunk to
``<shard_dir>/<chunk>.parquet.tmp`` and rename it to ``<chunk>.parquet`` (atomic), and the owner
reads the rows back from the shard, so the owner stays the single writer of the DuckDB file. When the
owner has committed a shard's rows (the runner calls :meth:`RayEngine.committed` after each write),
the shard is deleted; so the shards present at start-up are exactly the work finished by workers but
not yet stored by an owner that crashed. Their keys are indexed at start-up and a requested key found
there is answered from the shard (``ok``/``skipped`` rows only), never recomputed. On a multi-node
cluster ``shard_dir`` must be a shared filesystem.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .base import Capabilities, Completion, Engine, EngineError, Request

SHARD_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("texts", pa.list_(pa.string())),
    ("finish_reasons", pa.list_(pa.string())),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("option_logprobs", pa.list_(pa.float64())),
    ("floored", pa.list_(pa.int64())),
    ("error", pa.string()),
    ("status", pa.string()),
])


def to_table(completions: Sequence[Completion]) -> pa.Table:
    rows = [{
        "key": c.key, "texts": c.texts, "finish_reasons": c.finish_reasons, "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "option_logprobs": None if c.option_logprobs is None else list(c.option_logprobs),
        "floored": list(c.floored),
        "error": c.error, "status": c.status,
    } for c in completions]
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def from_table(table: pa.Table) -> list[Completion]:
    out = []
    for r in table.to_pylist():
        lp = None if r["option_logprobs"] is None else tuple(r["option_logprobs"])
        out.append(Completion(key=r["key"], texts=r["texts"] or [], finish_reasons=r["finish_reasons"] or [],
                              prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
                              option_logprobs=lp, floored=tuple(r["floored"] or ()), error=r["error"], status=r["status"]))
    return out


def chunk_name(requests: Sequence[Request]) -> str:
    return hashlib.sha256("\n".join(r.key for r in requests).encode()).hexdigest()[:24]


class Replica:
    """The actor: one engine per process, built once (and again by Ray after a restart)."""

    def __init__(self, engine_factory: Callable[[], Engine]):
        self.engine = engine_factory()

    def info(self) -> dict:
        caps = getattr(self.engine, "capabilities", None) or Capabilities()
        return {"pid": os.getpid(), "model": self.engine.model, "seed": self.engine.seed,
                "max_model_len": self.engine.max_model_len, "capabilities": caps}

    def token_ids(self, text: str) -> list[int]:
        return self.engine.token_ids(text)

    def run(self, requests: list[Request], shard_path: str | None = None) -> list[Completion] | str:
        done = list(self.engine.generate(requests))
        if shard_path is None:
            return done
        tmp = shard_path + ".tmp"
        pq.write_table(to_table(done), tmp)
        os.replace(tmp, shard_path)  # atomic: a reader never sees half a shard
        return shard_path

    def close(self) -> None:
        self.engine.close()


def vllm_factory(model_path: str, **kwargs: Any) -> Callable[[], Engine]:
    """A picklable factory of ``VLLMEngine`` for the actors (vLLM itself is imported in the actor only).
    On CPU each replica gets VLLMEngine's explicit KV-cache size (2 GiB unless ``kv_cache_gib``)."""
    from .vllm import VLLMEngine

    return functools.partial(VLLMEngine, model_path, **kwargs)


class RayEngine:
    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        *,
        replicas: int = 1,
        num_cpus: int | None = None,
        chunk_size: int = 64,
        shard_dir: str | Path | None = None,
        max_restarts: int = 1,
        inflight_per_replica: int = 2,
    ):
        """``engine_factory`` builds one engine inside each actor (it is pickled to the workers);
        model, seed and max_model_len are read from the first replica's engine. Ray is started here
        with ``num_cpus`` (default 2) unless it is already running or ``RAY_ADDRESS`` names a cluster."""
        import ray

        self._ray = ray
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            if os.environ.get("RAY_ADDRESS"):
                ray.init()
            else:
                ray.init(num_cpus=num_cpus or 2, include_dashboard=False)
        res = ray.cluster_resources()
        opts: dict[str, Any] = {"max_restarts": max_restarts, "max_task_retries": max_restarts}
        if res.get("GPU", 0) >= replicas:
            opts["num_gpus"] = 1
        else:  # share the CPUs out, so that N replicas always fit (a vLLM CPU engine uses threads of its own)
            opts["num_cpus"] = res.get("CPU", 1) / replicas
        self.chunk_size = chunk_size
        self.inflight = inflight_per_replica
        self.shard_dir = Path(shard_dir) if shard_dir else None
        if self.shard_dir:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
        actor = ray.remote(Replica).options(**opts)
        self.actors = [actor.remote(engine_factory) for _ in range(replicas)]
        infos = ray.get([a.info.remote() for a in self.actors])
        self.model, self.seed, self.max_model_len = infos[0]["model"], infos[0]["seed"], infos[0]["max_model_len"]
        self.capabilities = infos[0]["capabilities"]
        self._alive = set(range(replicas))
        self._tokens: dict[str, list[int]] = {}
        self._leftover = self._index_shards()  # key -> shard path, for shards an owner never committed
        self._read: set[Path] = set()  # shards whose rows went to the caller (deleted once committed)

    def token_ids(self, text: str) -> list[int]:
        if text not in self._tokens:
            self._tokens[text] = self._ray.get(self.actors[min(self._alive)].token_ids.remote(text))
        return self._tokens[text]

    def _index_shards(self) -> dict[str, Path]:
        if not self.shard_dir:
            return {}
        out: dict[str, Path] = {}
        for path in sorted(self.shard_dir.glob("*.parquet")):
            for k in pq.read_table(path, columns=["key", "status"]).to_pylist():
                if k["status"] != "failed":
                    out[k["key"]] = path
        return out

    def _from_shard(self, req: Request) -> Completion | None:
        path = self._leftover.pop(req.key, None)
        if path is None:
            return None
        got = [c for c in from_table(pq.read_table(path)) if c.key == req.key]
        self._read.add(path)
        return got[0] if got else None

    def commit_token(self) -> frozenset[Path]:
        """The shards whose rows the caller has received so far (it stores them in its next write)."""
        return frozenset(self._read)

    def committed(self, token: frozenset[Path]) -> None:
        """The caller's write holding the rows of ``token``'s shards is committed: they can go."""
        for path in token:
            if not any(p == path for p in self._leftover.values()):
                path.unlink(missing_ok=True)
        self._read -= token

    def generate(self, requests: Iterable[Request | None]) -> Iterator[Completion]:
        ray = self._ray
        source = iter(requests)
        exhausted = False
        inflight: dict[Any, tuple[int, list[Request]]] = {}
        load = {a: 0 for a in self._alive}
        try:
            while True:
                while not exhausted and self._alive and min(load[a] for a in self._alive) < self.inflight:
                    chunk: list[Request] = []
                    while len(chunk) < self.chunk_size:
                        try:
                            req = next(source)
                        except StopIteration:
                            exhausted = True
                            break
                        if req is None:
                            break
                        done = self._from_shard(req) if self._leftover else None
                        if done is not None:
                            yield done
                        else:
                            chunk.append(req)
                    if not chunk:
                        break
                    a = min(self._alive, key=lambda i: load[i])
                    shard = str(self.shard_dir / f"{chunk_name(chunk)}.parquet") if self.shard_dir else None
                    inflight[self.actors[a].run.remote(chunk, shard)] = (a, chunk)
                    load[a] += 1
                if not inflight:
                    if exhausted:
                        return
                    if not self._alive:  # the run cannot go on: what is not stored is left for the resume
                        raise EngineError("no live Ray replica left (every replica died past its restarts); "
                                          "rerun the same command to resume")
                    continue
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                a, chunk = inflight.pop(ref)
                load[a] -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # died for good, or unreachable past the retries
                    if isinstance(e, ray.exceptions.ActorDiedError):
                        self._alive.discard(a)
                    yield from self._failed(chunk, f"Ray replica {a} lost the chunk: {type(e).__name__}: {str(e)[:300]}")
                    continue
                except ray.exceptions.RayTaskError as e:  # the engine raised on this chunk
                    cause = getattr(e, "cause", None) or e
                    yield from self._failed(chunk, f"engine error on Ray replica {a}: {type(cause).__name__}: {str(cause)[:500]}")
                    continue
                if isinstance(result, str):
                    self._read.add(Path(result))
                    yield from from_table(pq.read_table(result))
                else:
                    yield from result
        finally:
            for ref in inflight:  # the consumer stopped early: drop queued chunks (best effort)
                ray.cancel(ref)

    @staticmethod
    def _failed(chunk: Sequence[Request], error: str) -> Iterator[Completion]:
        for r in chunk:
            yield Completion(key=r.key, status="failed", error=error)

    def close(self) -> None:
        ray = self._ray
        for a in self._alive:
            try:
                ray.get(self.actors[a].close.remote(), timeout=60)
            except Exception:  # best effort: the actor is killed next anyway
                pass
        for actor in self.actors:
            ray.kill(actor)
        if self._own_ray:
            ray.shutdown()
