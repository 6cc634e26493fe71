"""Recipes: the whole method as one file of steps that name each other, run in rounds, with lineage.

``factory run recipes/cai.yaml`` runs (or continues) it; ``factory validate`` checks it; ``factory
lineage ID`` prints where a row, a run or a trained model came from. Modules: :mod:`.spec` (YAML →
steps and graph), :mod:`.overrides` (dotted pipeline keys), :mod:`.steps` (step kinds and trainers),
:mod:`.evals` (eval steps), :mod:`.state` (``recipe_steps``), :mod:`.execute` (the executor),
:mod:`.lineage` (``models`` and chains), :mod:`.report` (per-round report), :mod:`.kind` (the hook
into ``factory run`` / ``validate``).
"""
