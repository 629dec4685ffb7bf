#!/bin/bash
# One device call: rotary/attention micro-benchmarks, then bench/engine_speed.py with the faster
# correct options, then the rank's start-up for 650M (cold and warm inductor cache); deadline $1 s.
END=$((SECONDS + ${1:-330}))
M6=esm2_t33_650M_UR50D
M3=esm2_t36_3B_UR50D
left() { echo $((END - SECONDS)); }
cap() { local l=$(left); (( l < $1 )) && echo $l || echo $1; }
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader | tee -a $OUT/err.log
echo "=== micro $(date +%T)"
timeout -k 5 $(cap 80) python bench/packed_micro.py --choice /tmp/choice 2>>$OUT/err.log | tee $OUT/micro.jsonl
FLAGS=$(cat /tmp/choice 2>/dev/null || echo "--rotary-kernel 0 --attention flash")
echo "=== engine_speed $FLAGS $(date +%T)"
TORCHINDUCTOR_CACHE_DIR=/tmp/ic_es timeout -k 5 $(cap 240) python bench/engine_speed.py --models $M6 $M3 $FLAGS \
  2>>$OUT/err.log | tee $OUT/engine_speed.txt
echo "=== start-up $(date +%T)"
for run in cold warm; do
  l=$(cap 70); (( l < 25 )) && { echo "skipped start-up $run"; continue; }
  TORCHINDUCTOR_CACHE_DIR=/tmp/ic_start timeout -k 5 $l python bench/packed_variants.py --model $M6 --label start-$run \
    $([ $run = cold ] && echo --write-checkpoint || echo --checkpoint) /tmp/m650.pt $FLAGS --tokens 131072 --check 24 \
    2>>$OUT/err.log | tee -a $OUT/startup.jsonl
done
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader | tee -a $OUT/err.log
