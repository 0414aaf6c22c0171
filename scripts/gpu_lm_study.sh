#!/usr/bin/env bash
# One device call's slice of the GPU-scale language-model study (experiments/lm_study.py
# --scale gpu: DeltaNet vs DeltaProduct_2 vs DeltaProduct_3 at matched parameters, byte tokens of
# the machine's Python standard library). The study stops its model in training after MINUTES
# with a checkpoint; the next call resumes it. SEEDS="0 1 2" runs the study once per seed
# (runs/lm_study_gpu/seed_<s>) and writes the mean and spread over seeds (one H100: ≈ 2.5 min per
# seed).
# Device tool: carry [".whl", "runs/lm_study_gpu", "runs/xla_cache_lm"] (what earlier calls
# brought back, unpacked), run
#   bash scripts/gpu_lm_study.sh 8
# and unpack the returned archive here before the next call: tar xzf <files_at>/lm_study.tgz
# Finished models travel without their checkpoints (results, metrics, evaluation only).
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-8}
SCALE=${SCALE:-gpu}  # smoke: a seconds-long check of this script
# shellcheck source=scripts/gpu_lib.sh
source scripts/gpu_lib.sh
gpu_setup "${GRAIN_WHEELS[@]}" && require_jax_gpu || exit 1
# shellcheck disable=SC2086
python3 experiments/lm_study.py --scale "$SCALE" --out_dir runs/lm_study_gpu --time_limit "$MINUTES" \
  --progress False --compilation_cache runs/xla_cache_lm ${SEEDS:+--seeds $SEEDS} \
  2>&1 | grep -v "^WARNING" | tee "$OUT/lm_study.log" | tail -30
archive_runs lm_study.tgz runs/lm_study_gpu runs/xla_cache_lm
