#!/bin/bash
# The GPU runs that answer the open model and capture questions of 2026-12-06, in one go
# (about 4 minutes on the H100 with Nsight Compute, 2026-12-06): usage
# open_questions_gpu.sh OUTDIR.
# - capture overhead with the capture thread woken every step vs every 4 steps (issue #6;
#   docs/results/h100-kernels/README.md);
# - how much of a buffer read with evict_last / evict_first survives other traffic
#   (docs/decode_compare.md: evict_last costs the H100 8.6 points in t13, the model none);
# - whether a row read by two programs of one kernel together hits as often as one read by
#   two kernels in a row (docs/decode_compare.md, t04).
# Each result is compared with the model on any machine by `dsacache compare --measured FILE`.
set -u
OUT=${1:?usage: open_questions_gpu.sh OUTDIR}
mkdir -p "$OUT"
run() {  # name, command...: log each run, keep going after a failure
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$OUT/run.log"
  "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after ${SECONDS}s" | tee -a "$OUT/run.log"
}
run capture python3 benchmarks/bench_capture.py --steps-per-wake 1,4 --repeats 30 --out "$OUT"
SIZES=4MiB,8MiB,16MiB,24MiB
BETWEEN=0,8MiB,16MiB,32MiB,64MiB
for evict in evict_last evict_first ""; do
  run "hint-${evict:-none}" dsacache probe hint --evict "$evict" --sizes $SIZES \
    --between $BETWEEN --out "$OUT/l2-hint-${evict:-none}.parquet"
done
for k in 512 2048; do
  run "twice-$k" dsacache probe twice --k $k --context 32768 --out "$OUT/l2-twice-$k.parquet"
done
