"""The judge service: a pipeline's constitutional judge over HTTP, for online RL (GRPO, Online DPO, OpenRLHF).

- :mod:`.judging`: the judge(s) of a pipeline (one judge or a panel, set up as a prefs run sets them
  up) and the jobs for one pair; its label by the one label rule (``factory.labels.pair_label``);
- :mod:`.rewards`: group rewards from pairwise preferences (all pairs, m sampled opponents, or a reference);
- :mod:`.batcher` (:mod:`.planner`: its store side; :mod:`.tickets`: a request's judgements): concurrent requests → judge jobs, each to
  its judge's engine (the first through one lazy request stream on the batcher's thread, a panel's
  others on feeder threads); answers from the store by content key; every new judgement written
  (one writer) before its answer is sent; :mod:`.render_pool`: judge prompts rendered in worker
  processes (the same messages; the service's GIL kept for the rest);
- :mod:`.app`: the HTTP contract (starlette) with its limits; :mod:`.service`: the lifecycle
  (store lock, run record, engines, uvicorn, drain, labels, status);
- :mod:`.clients`: adapters for TRL (GRPO reward function, pairwise judge) and OpenRLHF.

``factory serve judge PIPELINE --port P`` (``factory/cli_serve.py``) starts it; docs/judge-service.md.
"""
