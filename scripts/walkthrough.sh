#!/usr/bin/env bash
# From constitution to trained model on CPU with the embedded model (the README's walkthrough).
# Quality is not the point on CPU (a 135M model, a few dozen steps); the wiring is.
set -euo pipefail
cd "$(dirname "$0")/.."
F=.venv/bin/factory
HH=../shared/data/hh-rlhf/harmless-base-test.dev.jsonl.gz

# 1. SL-CAI: critique→revise, then SFT on the final revisions
$F run pipelines/demo.yaml --quiet
SL=$($F validate pipelines/demo.yaml | sed -E 's/.*run id ([^ ]+).*/\1/')
$F export sft --db data/demo.duckdb --run "$SL" --out data/exports/demo-sft
$F train sft train/sft.yaml

# 2. RLAIF: AI preference labels on hh-rlhf pairs 0–199, then a reward model on them
$F run pipelines/hh-prefs.yaml --quiet
PREFS=$($F validate pipelines/hh-prefs.yaml | sed -E 's/.*run id ([^ ]+).*/\1/')
sed "s/RUN_ID/$PREFS/" train/rm-ai.yaml > data/exports/rm-ai.yaml
$F train rm data/exports/rm-ai.yaml

# 3. The comparison: a reward model on human labels of a disjoint slice (pairs 200–399), same budget
$F train rm train/rm-human.yaml

# 4. Both evaluated on held-out human pairs 1000–1099 (pairwise accuracy, tie = wrong), stored in data/hh.duckdb
$F eval rm --model data/runs/rm-ai --human "$HH" --offset 1000 --limit 100 --db data/hh.duckdb
$F eval rm --model data/runs/rm-human --human "$HH" --offset 1000 --limit 100 --db data/hh.duckdb

# 5. DPO on the same AI labels, then what did SFT and DPO change? Harmful requests refused, benign
#    ones over-refused, correct answers flipped under push-back: one table, one HTML report
#    (data/behaviour-dpo-hh_vs_smollm2-135m_vs_sft-demo.html)
sed "s/RUN_ID/$PREFS/" train/dpo-hh.yaml > data/exports/dpo-hh.yaml
$F train dpo data/exports/dpo-hh.yaml
$F eval behaviour --model data/runs/dpo-hh --against smollm2-135m --against data/runs/sft-demo \
  --db data/behaviour.duckdb --quiet

# 6. A reward-model ensemble (3 members: seed + i, seeded bootstraps of the AI-labelled pairs);
#    each member and the mean / min / mean − λ·std aggregates on the held-out human pairs
sed "s/RUN_ID/$PREFS/" train/rm-ensemble.yaml > data/exports/rm-ensemble.yaml
$F train rm data/exports/rm-ensemble.yaml
$F eval rm --model data/runs/rm-ens --human "$HH" --offset 1000 --limit 100 --db data/hh.duckdb

# 7. Over-optimisation check: best-of-4 on 16 prompts, picked by member 0 vs by the ensemble
#    (mean − λ·std), the differing picks judged by the constitution judge in both orders
$F eval bon --rm data/runs/rm-ens --m 16 --n 4 --db data/behaviour.duckdb
