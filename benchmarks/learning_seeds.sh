#!/usr/bin/env bash
# The default tiny-world run of every script at seeds 1 (the default), 2 and 3: the final metrics each learning test
# checks, so its threshold can sit below the worst seed with margin. Usage: bash benchmarks/learning_seeds.sh OUT_DIR
set -euo pipefail
out=${1:?usage: learning_seeds.sh OUT_DIR}
for seed in 1 2 3; do
  for script in dpo reward_model sft lora grpo ppo opd; do
    python "$script.py" --seed "$seed" --output-dir "$out" --run-name "${script}_seed$seed" > "$out/${script}_seed$seed.log" 2>&1
    python - "$out/${script}_seed$seed/metrics.jsonl" "$script" "$seed" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
keys = ("eval/accuracy", "eval/general_accuracy", "eval/rewards_accuracy", "eval/teacher_accuracy")
first = {k: rows[0][k] for k in keys if k in rows[0]}
last = {k: rows[-1][k] for k in keys if k in rows[-1]}
print(sys.argv[2], "seed", sys.argv[3], "first", first, "last", last, flush=True)
PY
  done
done
