#!/bin/bash
# One device call: forward-only variants of the packed engine (bench/packed_variants.py), under a
# global deadline of $1 seconds; JSON lines to $OUT/results.jsonl, stderr to $OUT/err.log.
END=$((SECONDS + ${1:-440}))
V=bench/packed_variants.py
M6=esm2_t33_650M_UR50D
M3=esm2_t36_3B_UR50D
MAT='{"max_autotune": true, "coordinate_descent_tuning": true}'
step() {  # step CACHE_DIR TIMEOUT ARGS...
  local cache=$1 limit=$2 left=$((END - SECONDS)); shift 2
  (( left < limit )) && limit=$left
  (( limit < 20 )) && { echo "skipped: $*" | tee -a $OUT/err.log; return; }
  echo "=== $(date +%T) [$limit s] $*" | tee -a $OUT/err.log
  local t0=$SECONDS
  TORCHINDUCTOR_CACHE_DIR=$cache timeout -k 5 $limit python $V "$@" 2>>$OUT/err.log | tee -a $OUT/results.jsonl
  echo "{\"step_s\": $((SECONDS - t0)), \"rc\": ${PIPESTATUS[0]}, \"args\": \"$*\"}" | tee -a $OUT/results.jsonl
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv | tee -a $OUT/err.log
step /tmp/ic_def 150 --model $M6 --label default --write-checkpoint /tmp/m650.pt --tokens 16384 65536 131072 262144 --profile --gemm
step /tmp/ic_mat 200 --model $M6 --label max-autotune-cold --options "$MAT" --tokens 32768 131072 --profile
step /tmp/ic_mat 80 --model $M6 --label max-autotune-warm --options "$MAT" --checkpoint /tmp/m650.pt --tokens 131072
step /tmp/ic_def3 110 --model $M3 --label default --tokens 65536 131072 262144 --reps 3 --profile --gemm
step /tmp/ic_mat3 160 --model $M3 --label max-autotune-cold --options "$MAT" --tokens 131072 --reps 3 --profile
step /tmp/ic_def 60 --model $M6 --label default-warm --checkpoint /tmp/m650.pt --tokens 131072
step /tmp/ic_cdt 90 --model $M6 --label coordinate-descent --options '{"coordinate_descent_tuning": true}' --tokens 131072
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv | tee -a $OUT/err.log
