"""The recipe's own cost: overhead of a 2-round recipe on the embedded model, a rerun of the finished
recipe, and kill -9 inside a training step.

- overhead = wall time of `run_recipe` minus the steps' own time (their runs, exports, training,
  evals: what `recipe_steps.seconds` records); target ≤ 2% of the wall time;
- rerun of the finished recipe (after imports): every step skipped; target ≤ 5 s;
- kill -9 in training (a separate one-step recipe, save_steps 2): the rerun resumes from the last
  complete checkpoint, so at most save_steps optimizer steps are redone.

    python bench/bench_recipe.py            # tiny budgets on the embedded model (CPU: several minutes)
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HH, REPO, record

TRAIN = ("{max_steps: %d, per_device_train_batch_size: 2, max_length: 128, save_strategy: steps, save_steps: %d, "
         "logging_steps: 1, seed: 0}")


def recipe_text(d: Path, steps: int) -> str:
    args = TRAIN % (steps, 1)
    return f"""kind: recipe
name: bench
db: {d}/r.duckdb
state_dir: {d}/state
rounds: 2
policy: {{first: sft, next: dpo}}
steps:
  - {{id: sl, once: true, run: {REPO}/pipelines/demo.yaml, set: {{prompts.limit: 2, rounds: 1, prompts.path: {REPO}/data/demo_prompts.jsonl,
      constitution: {REPO}/constitutions/harmless.yaml, templates: {{answer: {REPO}/prompts/answer.j2,
      critique: {REPO}/prompts/critique.j2, revise: {REPO}/prompts/revise.j2}}, engine.kv_cache_gib: 1.0}}}}
  - {{id: sft_data, once: true, export: sft, from: sl}}
  - {{id: sft, once: true, train: sft, data: sft_data, args: {args}}}
  - {{id: prompts, prompts: {REPO}/data/demo_prompts.jsonl, n: 3, seed: 0}}
  - id: pairs
    run: {REPO}/pipelines/demo-prefs.yaml
    set: {{model: {{step: policy}}, pairs.prompts.path: {{step: prompts}}, pairs.sampling.max_tokens: 32, judge.tie_eps: 0.002,
          constitution: {REPO}/constitutions/harmless.yaml, judge.template: {REPO}/prompts/judge.j2,
          answer_template: {REPO}/prompts/answer.j2, engine.kv_cache_gib: 1.0}}
  - {{id: prefs, export: prefs, from: pairs}}
  - {{id: dpo, train: dpo, data: prefs, model: {{step: policy}}, args: {args}}}
  - {{id: rm, train: rm, data: prefs, args: {args}}}
"""


def kill_in_training(d: Path, steps: int, save_steps: int) -> dict:
    from factory.recipes.execute import run_recipe

    path = d / "kill.yaml"
    path.write_text(f"""kind: recipe
name: kill
db: {d}/k.duckdb
state_dir: {d}/kstate
steps:
  - {{id: human, export: human, human: {HH}, limit: 32}}
  - {{id: rm, train: rm, data: human, args: {TRAIN % (steps, save_steps)}}}
""")
    code = "from factory.cli import app; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, "run", str(path), "--quiet"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = 2 * save_steps
    while proc.poll() is None and not list((d / "kstate" / "models").glob(f"rm-*/checkpoint-{target}/trainer_state.json")):
        time.sleep(0.1)
    time.sleep(1.0)  # into the next steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = [int(p.parent.name.split("-")[1]) for p in (d / "kstate" / "models").glob("rm-*/checkpoint-*/trainer_state.json")]
    t0 = time.perf_counter()
    s = run_recipe(path, quiet=True)
    out = json.loads((Path(s.steps[-1].output["value"]) / "factory_train.json").read_text())
    resumed = int(out["resumed_from"].rsplit("-", 1)[1]) if out.get("resumed_from") else 0
    # the kill came after checkpoint `newest` was complete and before checkpoint newest + save_steps was:
    # resuming from `newest` redoes fewer than save_steps optimizer steps
    return {"train_steps": steps, "save_steps": save_steps, "newest_complete_checkpoint_at_kill": max(complete, default=0),
            "resumed_from_step": resumed, "resumed_from_newest": resumed == max(complete, default=0),
            "kill_rerun_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2, help="training steps per train step of the recipe")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t_imp = time.perf_counter()
    from factory.recipes.execute import run_recipe

    imports_s = time.perf_counter() - t_imp
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        d = Path(tmp)
        path = d / "recipe.yaml"
        path.write_text(recipe_text(d, a.steps))
        t0 = time.perf_counter()
        s = run_recipe(path, quiet=True)
        wall = time.perf_counter() - t0
        assert s.status == "done", s.error
        own = sum(x.seconds for x in s.steps)
        t1 = time.perf_counter()
        again = run_recipe(path, quiet=True)
        rerun = time.perf_counter() - t1
        assert {x.status for x in again.steps} == {"skipped"}
        kill = kill_in_training(d, 4, 1)
    result = {"quick": a.quick, "steps_run": len(s.steps), "wall_s": round(wall, 1), "steps_own_s": round(own, 1),
              "overhead_s": round(wall - own, 2), "overhead_pct": round(100 * (wall - own) / wall, 2),
              "rerun_s": round(rerun, 2), "imports_s": round(imports_s, 2), **kill,
              "per_step_s": {f"{x.step}-r{x.round}": round(x.seconds, 1) for x in s.steps}}
    print(json.dumps(result, indent=2))
    print("→", record("recipe", result))


if __name__ == "__main__":
    main()
