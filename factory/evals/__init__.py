"""Behavioural evaluations of trained models and reward-model ensembles.

- ``suites``: the versioned suites under ``data/evals/`` (and XSTest/HarmBench-style files) → items;
- ``scoring``: the transparent rules (refusal keywords, normalised answer matching);
- ``judging``: the one adapter to the log-prob judge (refusal rubric, constitution pairwise judge);
- ``tables``: DuckDB tables of generations and scores (content keys, resume);
- ``stats``: bootstrap intervals and verdicts;
- ``behaviour``: ``factory eval behaviour`` (generate, score, summarise);
- ``report``: the terminal table and the HTML report;
- ``ensemble`` / ``bestofn``: reward-model ensembles and the best-of-n over-optimisation check.
"""
