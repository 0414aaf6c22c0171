#!/usr/bin/env bash
# Several device-call scripts at once, spread over the GPUs (e.g. the device tool's
# nvidia-h200-x2): command i runs with CUDA_VISIBLE_DEVICES = i mod (number of GPUs), its output in
# $OUT/cmd<i>.log; the carried wheels are installed once for all of them. With more commands than
# GPUs, commands share a GPU (memory is then allocated on demand, not preallocated): worth it for
# small jobs whose evaluations and checkpoints leave the GPU idle, never for timings. Example
# (carry [".whl", "runs/st_paper", "runs/xla_cache"]):
#   bash scripts/gpu_parallel.sh "bash scripts/gpu_check.sh lm" \
#     "GRID='--groups S5 --num_householder 1 --eig_ranges neg --seeds 0 1 2' \
#      bash scripts/gpu_state_tracking.sh 8"
# Two state-tracking slices side by side need disjoint grids and different RUNS directories
# (scripts/gpu_state_tracking.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu_lib.sh
source scripts/gpu_lib.sh
gpu_setup || exit 1
export GPU_SETUP_DONE=1
cmds=("$@")
gpus=$(nvidia-smi -L | wc -l)
[ "${#cmds[@]}" -gt "$gpus" ] && export XLA_PYTHON_CLIENT_PREALLOCATE=false
for i in "${!cmds[@]}"; do
  CUDA_VISIBLE_DEVICES=$((i % gpus)) bash -c "${cmds[i]}" > "$OUT/cmd$i.log" 2>&1 &
done
wait
for i in "${!cmds[@]}"; do
  echo "=== command $i (GPU $((i % gpus))): ${cmds[i]}"
  tail -n 45 "$OUT/cmd$i.log"
done
