#!/usr/bin/env bash
# One device call's slice of the paper-scale state-tracking grid (docs/RESULTS.md, SPEC §5).
# The sweep stops its current run after MINUTES with a checkpoint; the next call resumes it.
# Device tool: carry [".whl", "runs"] (runs/ = what earlier calls brought back, unpacked), run
#   bash scripts/gpu_state_tracking.sh 8
# and unpack the returned archive here before the next call: tar xzf <files_at>/st_paper.tgz
# GRID overrides the grid (sweep flags), e.g. GRID="--groups S5 --num_householder 1 2 3 4".
# Finished runs travel without their checkpoints (results, curves and metrics only). A checkpoint
# every 10 epochs (a time-limit stop writes one as well) instead of every epoch.
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-8}
OUT=$(realpath -m "${OUT:-gpu_out}")
mkdir -p "$OUT"
GRID=${GRID:---groups S3 --num_householder 1 2 --eig_ranges neg pos --seeds 0 1 2}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/grain*.whl .whl/array_record*.whl .whl/portpicker*.whl \
  .whl/cloudpickle*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# shellcheck disable=SC2086
python3 experiments/state_tracking_sweep.py $GRID --out_dir runs/st_paper --time_limit "$MINUTES" \
  -- --epochs 100 --impl auto --progress False --compilation_cache runs/xla_cache \
  --checkpoint_every 490 \
  2>&1 | grep -v "^WARNING" | tee "$OUT/sweep.log" | tail -30
exclude=()
for r in runs/st_paper/*/results.json; do
  [ -f "$r" ] || continue
  if ! grep -q '"time_limited": true' "$r"; then exclude+=(--exclude "$(dirname "$r")/checkpoints"); fi
done
tar czf "$OUT/st_paper.tgz" "${exclude[@]}" runs/st_paper runs/xla_cache
ls -la "$OUT"
