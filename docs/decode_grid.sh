#!/bin/bash
# The decode-step profiling grid behind docs/decode_compare.md: each line runs the decode-step
# driver (kernels/decode_step.py) under `dsacache profile` (ncu, no cache control, application
# replay). Usage: decode_grid.sh OUTDIR [SECONDS]; configs already in OUTDIR are skipped, and no new
# config starts after SECONDS (default 520), so the grid can be run in several calls.
set -u
OUT=${1:?usage: decode_grid.sh OUTDIR [SECONDS]}
BUDGET=${2:-520}
mkdir -p "$OUT"
KERNELS='dsa_indexer_logits|dsa_mla_sparse_decode|dsa_gqa_sparse_decode|flash|mla'
ds() {  # a DeepSeek-V3.2-shaped synthetic trace: context k requests layers steps
  echo "synth:deepseek-v3.2:context=$1,k=$2,requests=$3,layers=$4,steps=$5"
}
GRID=(
  "t01|$(ds 8192 2048 1 16 4) --batch 1"
  "t02|$(ds 8192 256 8 16 4) --batch 8"
  "t03|$(ds 32768 2048 1 16 4) --batch 1"
  "t04|$(ds 32768 512 8 8 4) --batch 8"
  "t05|$(ds 65536 2048 8 4 3) --batch 8"
  "t06|$(ds 131072 2048 1 8 4) --batch 1"
  "t07|$(ds 131072 1024 64 2 3) --batch 64"
  "t08|$(ds 8192 2048 64 4 3) --batch 64"
  "t09|$(ds 8192 2048 1 16 4) --batch 1 --index-evict evict_first"
  "t10|$(ds 32768 2048 1 16 4) --batch 1 --index-evict evict_first"
  "t11|$(ds 32768 512 8 8 4) --batch 8 --index-evict evict_first"
  "t12|$(ds 131072 2048 1 8 4) --batch 1 --index-evict evict_first"
  "t14|$(ds 32768 2048 1 16 4) --batch 1 --index-evict evict_first --kv-evict evict_last"
  "t15|$(ds 32768 2048 1 16 4) --batch 1 --persist-layers 5 --set-aside 30MiB --hit-ratio 1.0"
  "t16|$(ds 8192 2048 1 16 4) --batch 1 --persist-layers 8 --set-aside 30MiB --hit-ratio 0.5"
  "f01|$(ds 8192 2048 1 16 4) --batch 1 --backend flashmla"
  "f02|$(ds 32768 2048 1 16 4) --batch 1 --backend flashmla"
  "f03|$(ds 65536 2048 8 4 3) --batch 8 --backend flashmla"
  "f04|$(ds 131072 2048 1 8 4) --batch 1 --backend flashmla"
  "f05|$(ds 8192 2048 64 4 3) --batch 64 --backend flashmla"
  "f06|$(ds 32768 2048 1 16 4) --batch 1 --backend flashmla --index-evict evict_first"
  "g01|smollm2-135m-oracle-k1024 --layout gqa --batch 4 --steps 4"
  "g02|smollm2-135m-oracle-k256 --layout gqa --batch 4 --steps 4"
  "g03|smollm2-135m-lightning-k64 --layout gqa --batch 1 --steps 4"
  "g04|smollm2-135m-oracle-k64-group --layout gqa --batch 4 --steps 4"
  "g05|smollm2-135m-oracle-k1024 --layout gqa --batch 4 --steps 4 --index-evict evict_first"
  "t13|$(ds 8192 256 8 16 4) --batch 8 --kv-evict evict_last"
  "f07|$(ds 8192 256 8 16 4) --batch 8 --backend flashmla"
  "g06|smollm2-135m-oracle-k256 --layout gqa --batch 1 --steps 4"
  "r01|smollm2-135m-oracle-k1024 --layout mla-fp8 --heads 128 --batch 4 --steps 4"
)
start=$(date +%s)
for entry in "${GRID[@]}"; do
  name=${entry%%|*}; args=${entry#*|}
  [ -f "$OUT/$name.parquet" ] && continue
  if (( $(date +%s) - start > BUDGET )); then echo "budget spent before $name"; break; fi
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout 300 dsacache profile --kernel "$KERNELS" --out "$OUT/$name.parquet" \
    -- python3 -m dsacache.kernels.decode_step $args > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s $(tail -1 "$OUT/$name.log")"
done
