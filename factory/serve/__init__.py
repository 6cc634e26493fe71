"""The judge service: a pipeline's constitutional judge over HTTP, for online RL (GRPO, Online DPO, OpenRLHF).

- :mod:`.judging`: the judge(s) of a pipeline and the jobs for one pair (THE place panels plug in),
  and the label of one pair by the one label rule;
- :mod:`.rewards`: group rewards from pairwise preferences (all pairs, m sampled opponents, or a reference);
- :mod:`.batcher`: concurrent requests → judge jobs fed to one engine through one lazy request
  stream; answers from the store by content key; every new judgement written (one writer) before
  its answer is sent;
- :mod:`.app`: the HTTP contract (starlette) with its limits; :mod:`.service`: the lifecycle
  (store lock, run record, engine, uvicorn, drain, labels, status);
- :mod:`.clients`: adapters for TRL (GRPO reward function, pairwise judge) and OpenRLHF.

``factory serve judge PIPELINE --port P`` (``factory/cli_serve.py``) starts it; docs/judge-service.md.
"""
