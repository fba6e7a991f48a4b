#!/usr/bin/env bash
# A tour of the whole tiny world in one command: every script in its natural order, then one table of what each did.
#
#   bash tour.sh                 # writes runs/tour/<script>/ and runs/tour/<script>.log; ~15 min on 2 CPU cores
#   bash tour.sh /tmp/tour       # somewhere else
#   TOUR_FLAGS="--max-steps 4" bash tour.sh /tmp/short    # flags added to every script's command line
#
# sft.py trains on the target skill; reward_model.py trains the reward model that ppo.py then optimizes (instead of
# the shipped assets/tiny-rm); dpo.py and grpo.py learn from preferences and from the verifier; opd.py distills the
# tour's GRPO policy (instead of the shipped assets/tiny-teacher); lora.py is sft.py with an adapter. Every run starts
# from assets/tiny-base with its script's defaults, so each row is the README's command for that script.
# The table: the target skill's held-out greedy accuracy (reward_model.py: held-out pair accuracy) before and after,
# the general skills' accuracy after (what forgetting costs), and each run's wall time.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-runs/tour}
mkdir -p "$out"
python=${PYTHON:-python}

run() {  # run NAME SCRIPT FLAGS...: one script, its output in $out/NAME.log, its wall time in $out/NAME.time
  local name=$1 script=$2
  shift 2
  echo "== $script.py $*" >&2
  local start=$SECONDS
  # shellcheck disable=SC2086 # TOUR_FLAGS is a list of flags
  if ! "$python" "$script.py" --output-dir "$out" --run-name "$name" "$@" ${TOUR_FLAGS:-} > "$out/$name.log" 2>&1; then
    echo "error: $script.py failed; its output is in $out/$name.log" >&2
    tail -n 5 "$out/$name.log" >&2
    exit 1
  fi
  echo $((SECONDS - start)) > "$out/$name.time"
}

rm -rf "${out:?}"/{sft,reward_model,ppo,dpo,grpo,opd,lora}
run sft sft
run reward_model reward_model
run ppo ppo --reward-model "$out/reward_model/final"
run dpo dpo
run grpo grpo
run opd opd --teacher "$out/grpo/final"
run lora lora

"$python" - "$out" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("| script | target before | target after | general after | wall time |")
print("|---|---|---|---|---|")
total = 0
for name in ("sft", "reward_model", "ppo", "dpo", "grpo", "opd", "lora"):
    evals = [m for m in map(json.loads, (out / name / "metrics.jsonl").open()) if "eval/accuracy" in m]
    seconds = int((out / f"{name}.time").read_text())
    total += seconds
    first, last = evals[0], evals[-1]
    general = f"{last['eval/general_accuracy']:.3f}" if "eval/general_accuracy" in last else "-"
    label = f"{name}.py" + (" (pair accuracy)" if name == "reward_model" else "")
    print(f"| {label} | {first['eval/accuracy']:.3f} | {last['eval/accuracy']:.3f} | {general} "
          f"| {seconds // 60} min {seconds % 60} s |")
print(f"\ntotal: {total // 60} min {total % 60} s")
PY
