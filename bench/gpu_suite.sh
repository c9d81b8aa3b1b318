#!/usr/bin/env bash
# The one prepared GPU benchmark (an H100 or H200; under 9 minutes): flux2's rows beside the diffusers rows of
# ../shared/bench/anchor_bench.py (Flux2Transformer2DModel + PEFT, eager and compile_repeated_blocks), LoRA rank 32
# on every block Linear, batch 1 at 1024x1024 + 512 text tokens, bf16, gradient checkpointing unless the row says
# otherwise. One process per row (clean peak memory), rows in bench/train_step.py's notation.
#
#   bash bench/gpu_suite.sh [--out DIR]     # on the GPU machine: DIR/rows.json, DIR/table.md (for docs/performance.md)
#   bash bench/gpu_suite.sh --dry-run       # anywhere: the same loop at tiny shapes on a CPU (tests/test_gpu_suite.py)
#
# First the QLoRA memory targets of issue 16 (bench/memory.py --gpu: dev and klein-base-9b, NF4 base). Then rows,
# most important first: klein-base-4b (defaults = compiled, fp8 products, diffusers + compile, one denoising
# step), klein-base-9b (defaults, diffusers + compile), then klein-base-4b eager, diffusers eager, 12 of 25 blocks
# checkpointed, none, cuDNN attention, klein-base-9b fp8 and dev with fp8 while the 8-minute budget lasts. A row
# starts only with 30 s left and never runs past the budget; a row that fails is reported and the suite goes on.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=bench/results/gpu_suite
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: bash bench/gpu_suite.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$OUT/rows"
rm -f "$OUT"/rows/*.json "$OUT/memory_gpu.json"

if [ "$DRY" = 1 ]; then
  # Tiny shapes on a CPU, dynamo without code generation: minutes of compiling become seconds.
  export FLUX2_COMPILE_BACKEND=eager
  COMMON=(--res 64 --text_tokens 16 --rank 4 --warmup 1 --rounds 1 --steps 1 --backend eager --memory)
  PLAN=("dry:flux2+compile+fp8 diffusers")
  BUDGET_S=600; ROW_LIMIT_S=300; QLORA_LIMIT_S=120
  QLORA=(--gpu_variants tiny --res 64 --rank 4 --device cpu)
else
  COMMON=(--res 1024 --warmup 3 --rounds 4 --steps 2 --memory)
  # Most important first: a row starts only while time is left, and never runs past the budget.
  PLAN=("klein-base-4b:flux2 flux2+fp8 diffusers+compile flux2+fwd"
        "klein-base-9b:flux2 diffusers+compile"
        "klein-base-4b:flux2+eager diffusers flux2+gc=12 flux2+nogc diffusers+compile+fwd flux2+attn=cudnn"
        "klein-base-9b:flux2+fp8"
        "dev:flux2+fp8 diffusers+compile")
  BUDGET_S=480; ROW_LIMIT_S=180; QLORA_LIMIT_S=150  # 8 minutes in all, the QLoRA targets included
  QLORA=()
  "$PY" bench/train_step.py --matmul_peak > "$OUT/matmul_peak.json" || echo '{}' > "$OUT/matmul_peak.json"
fi

START=$(date +%s)
# The QLoRA targets first (dev <= 24 GiB, klein-base-9b <= 12 GiB with an NF4 base at 1024^2): bench/memory.py
# --gpu, inside the budget; off a GPU (the dry run) it says it skipped. suite_table.py sets its rows beside the
# CPU count of the same step (bench/results/step_memory.json, bench/step_memory.py).
echo "== QLoRA memory targets"
if ! timeout "$QLORA_LIMIT_S" "$PY" bench/memory.py --gpu "${QLORA[@]}" --json "$OUT/memory_gpu.json" > "$OUT/memory_gpu.log" 2>&1; then
  echo "   failed or timed out: $(grep -v '^\s*$' "$OUT/memory_gpu.log" | tail -1)"
fi
for entry in "${PLAN[@]}"; do
  variant=${entry%%:*}
  for row in ${entry#*:}; do
    elapsed=$(( $(date +%s) - START ))
    left=$(( BUDGET_S - elapsed ))
    if [ "$left" -lt 30 ]; then
      echo "skipped $variant $row: ${elapsed}s of the ${BUDGET_S}s budget used"; continue
    fi
    limit=$(( left < ROW_LIMIT_S ? left : ROW_LIMIT_S ))
    file="$OUT/rows/${variant}__${row//[+=]/_}.json"
    echo "== $variant $row (${elapsed}s)"
    if ! timeout "$limit" "$PY" bench/train_step.py "${COMMON[@]}" --variant "$variant" --one "$row" \
        --json "$file" > "$file.log" 2>&1; then
      echo "   failed or timed out: $(grep -v '^\s*$' "$file.log" | tail -1)"
      rm -f "$file"
    fi
  done
done
"$PY" bench/suite_table.py "$OUT"
echo "suite took $(( $(date +%s) - START ))s; rows in $OUT/rows.json, table in $OUT/table.md"
