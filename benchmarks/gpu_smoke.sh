#!/usr/bin/env bash
# Every script, 3 optimizer steps on a real checkpoint, on one GPU: prints each script's peak GPU memory and median
# step time, and exits non-zero if any script failed (its log says why).
#
#   bash benchmarks/gpu_smoke.sh                          # Qwen/Qwen3-0.6B from the hub (or the local HF cache)
#   bash benchmarks/gpu_smoke.sh /path/to/Qwen3-0.6B runs/gpu_smoke
#
# Data: the tiny world's files in assets/data, rendered with the checkpoint's own chat template (thinking off for
# Qwen3); the point is the GPU path (mixed precision, devices, memory), not learning. ppo.py scores with the reward
# model that reward_model.py trains first; opd.py distils the checkpoint into itself.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-Qwen/Qwen3-0.6B}
OUT=${2:-runs/gpu_smoke}
mkdir -p "$OUT"
head -n 64 assets/data/eval.jsonl >"$OUT/eval64.jsonl"
KW='{"enable_thinking": false}'
COMMON=(--model "$MODEL" --max-steps 3 --eval-every 0 --output-dir "$OUT" --chat-template-kwargs "$KW")
GEN=(--eval-prompts "$OUT/eval64.jsonl" --eval-batch-size 64)
failed=()

run() {  # run NAME SCRIPT ARGS...: one script, its log in $OUT/NAME.log
  local name=$1 script=$2
  shift 2
  rm -rf "${OUT:?}/$name"
  echo "== $name: python $script ${COMMON[*]} $*"
  if ! python "$script" "${COMMON[@]}" "$@" --run-name "$name" >"$OUT/$name.log" 2>&1; then
    failed+=("$name")
    echo "   FAILED (tail of $OUT/$name.log):"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

run sft sft.py "${GEN[@]}" --batch-size 32 --micro-batch-size 8 --max-length 512 --eval-dataset ""
run lora lora.py "${GEN[@]}" --batch-size 32 --micro-batch-size 8 --max-length 512 --eval-dataset "" --merge
run qlora lora.py "${GEN[@]}" --batch-size 32 --micro-batch-size 8 --max-length 512 --eval-dataset "" --quantize nf4
run dpo dpo.py "${GEN[@]}" --batch-size 16 --micro-batch-size 4 --max-length 512
run dpo_precomputed dpo.py "${GEN[@]}" --batch-size 16 --micro-batch-size 4 --max-length 512 --precompute-ref
run reward_model reward_model.py --batch-size 16 --micro-batch-size 4 --max-length 512
run grpo grpo.py "${GEN[@]}" --prompts-per-step 8 --group-size 8 --max-new-tokens 128 --micro-batch-size 16 \
  --kl-every 1
run grpo_beta grpo.py "${GEN[@]}" --prompts-per-step 8 --group-size 8 --max-new-tokens 128 --micro-batch-size 16 \
  --beta 0.04
run ppo ppo.py "${GEN[@]}" --prompts-per-step 32 --max-new-tokens 128 --micro-batch-size 8 \
  --reward-model "$OUT/reward_model/final" --stop-token "<|im_end|>" --missing-eos-penalty 1.0
run opd opd.py "${GEN[@]}" --teacher "$MODEL" --prompts-per-step 8 --group-size 4 --max-new-tokens 128 \
  --micro-batch-size 16 --objective full
run sft_pure sft.py "${GEN[@]}" --batch-size 32 --micro-batch-size 8 --max-length 512 --eval-dataset "" \
  --dtype pure-bf16

echo
echo "script            peak GPU GB   median step s   final train/loss"
for log in "$OUT"/*/metrics.jsonl; do
  python - "$log" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
name = sys.argv[1].split("/")[-2]
mem = max((r["perf/peak_mem_gb"] for r in rows if "perf/peak_mem_gb" in r), default=float("nan"))
steps = [r["perf/step_s"] for r in rows if "perf/step_s" in r]
loss = [r.get("train/loss", r.get("train/pg_loss")) for r in rows if "train/loss" in r or "train/pg_loss" in r]
print(f"{name:<17} {mem:>11.2f}   {statistics.median(steps) if steps else float('nan'):>13.3f}   {loss[-1] if loss else float('nan'):>.4f}")
PY
done
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all scripts passed"
