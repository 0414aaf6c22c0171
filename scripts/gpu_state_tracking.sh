#!/usr/bin/env bash
# One device call's slice of the paper-scale state-tracking grid (docs/RESULTS.md, SPEC §5).
# The sweep stops its current run after MINUTES with a checkpoint; the next call resumes it.
# Device tool: carry [".whl", "runs/st_paper", "runs/xla_cache"] (what earlier calls brought
# back, unpacked), run
#   bash scripts/gpu_state_tracking.sh 8
# and unpack the returned archive here before the next call: tar xzf <files_at>/st_paper.tgz
# GRID overrides the grid (sweep flags), e.g. GRID="--groups S5 --num_householder 1 2 3 4".
# Finished runs travel without their checkpoints (results, curves and metrics only), and their
# results, config and curves also go to docs/data/st_paper (commit them: a fresh clone then
# skips those cells even without the runs/ folder). A checkpoint
# every 10 epochs (a time-limit stop writes one as well) instead of every epoch.
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-8}
GRID=${GRID:---groups S3 --num_householder 1 2 --eig_ranges neg pos --seeds 0 1 2}
# shellcheck source=scripts/gpu_lib.sh
source scripts/gpu_lib.sh
gpu_setup "${GRAIN_WHEELS[@]}" || exit 1
# finished runs kept in the repository (results, config, curves) count as done: restore the ones
# this call did not bring
mkdir -p runs/st_paper
for d in docs/data/st_paper/*/; do
  [ -d "$d" ] && [ ! -e "runs/st_paper/$(basename "$d")" ] && cp -r "$d" runs/st_paper/
done
# shellcheck disable=SC2086
python3 experiments/state_tracking_sweep.py $GRID --out_dir runs/st_paper --time_limit "$MINUTES" \
  -- --epochs 100 --impl auto --progress False --compilation_cache runs/xla_cache \
  --checkpoint_every 490 \
  2>&1 | grep -v "^WARNING" | tee "$OUT/sweep.log" | tail -30
keep_finished_runs runs/st_paper docs/data/st_paper
archive_runs st_paper.tgz runs/st_paper runs/xla_cache docs/data/st_paper
