#!/usr/bin/env bash
# One device call's slice of the GPU-scale language-model study (experiments/lm_study.py
# --scale gpu: DeltaNet vs DeltaProduct_2 vs DeltaProduct_3 at matched parameters, byte tokens of
# the machine's Python standard library). The study stops its model in training after MINUTES
# with a checkpoint; the next call resumes it.
# Device tool: carry [".whl", "runs/lm_study_gpu", "runs/xla_cache_lm"] (what earlier calls
# brought back, unpacked), run
#   bash scripts/gpu_lm_study.sh 8
# and unpack the returned archive here before the next call: tar xzf <files_at>/lm_study.tgz
# Finished models travel without their checkpoints (results, metrics, evaluation only).
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-8}
SCALE=${SCALE:-gpu}  # smoke: a seconds-long check of this script
OUT=$(realpath -m "${OUT:-gpu_out}")
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/grain*.whl .whl/array_record*.whl .whl/portpicker*.whl \
  .whl/cloudpickle*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 experiments/lm_study.py --scale "$SCALE" --out_dir runs/lm_study_gpu --time_limit "$MINUTES" \
  --progress False --compilation_cache runs/xla_cache_lm \
  2>&1 | grep -v "^WARNING" | tee "$OUT/lm_study.log" | tail -30
exclude=()
for r in runs/lm_study_gpu/*/results.json; do
  [ -f "$r" ] || continue
  if ! grep -q '"time_limited": true' "$r"; then exclude+=(--exclude "$(dirname "$r")/checkpoints"); fi
done
tar czf "$OUT/lm_study.tgz" "${exclude[@]}" runs/lm_study_gpu runs/xla_cache_lm
ls -la "$OUT"
