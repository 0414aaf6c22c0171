#!/usr/bin/env bash
# One device call's slice of the paper-scale state-tracking grid (docs/RESULTS.md, SPEC §5).
# The sweep stops its current run after MINUTES with a checkpoint; the next call resumes it.
# Device tool: carry [".whl", "runs/st_paper", "runs/xla_cache"] (what earlier calls brought
# back, unpacked), run
#   bash scripts/gpu_state_tracking.sh 8
# and unpack the returned archive here before the next call: tar xzf <files_at>/st_paper.tgz
# GRID overrides the grid (sweep flags), e.g. GRID="--groups S5 --num_householder 1 2 3 4";
# several grids separated by ";" run in turn within the same MINUTES.
# RUNS (default runs/st_paper) is the run directory; the archive is named after it
# (<basename>.tgz) and holds it with its compilation cache <RUNS>_xla (runs/xla_cache for the
# default). Two slices side by side (scripts/gpu_parallel.sh) need different RUNS.
# Finished runs travel without their checkpoints (results, curves and metrics only), and their
# results, config and curves also go to docs/data/st_paper (commit them: a fresh clone then
# skips those cells even without the runs/ folder). A checkpoint
# every 10 epochs (a time-limit stop writes one as well) instead of every epoch.
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-8}
GRID=${GRID:---groups S3 --num_householder 1 2 --eig_ranges neg pos --seeds 0 1 2}
RUNS=${RUNS:-runs/st_paper}
CACHE=runs/xla_cache
[ "$RUNS" = runs/st_paper ] || CACHE=${RUNS}_xla
# shellcheck source=scripts/gpu_lib.sh
source scripts/gpu_lib.sh
gpu_setup "${GRAIN_WHEELS[@]}" && require_jax_gpu || exit 1
# finished runs kept in the repository (results, config, curves) count as done: restore the ones
# this call did not bring
mkdir -p "$RUNS"
for d in docs/data/st_paper/*/; do
  [ -d "$d" ] && [ ! -e "$RUNS/$(basename "$d")" ] && cp -r "$d" "$RUNS/"
done
name=$(basename "$RUNS")
start=$(date +%s)
IFS=';' read -ra grids <<< "$GRID"
for grid in "${grids[@]}"; do
  left=$(python3 -c "print(round($MINUTES - ($(date +%s) - $start) / 60, 2))")
  python3 -c "import sys; sys.exit(0 if $left > 0.5 else 1)" || break
  # shellcheck disable=SC2086
  python3 experiments/state_tracking_sweep.py $grid --out_dir "$RUNS" --time_limit "$left" \
    -- --epochs 100 --impl auto --progress False --compilation_cache "$CACHE" \
    --checkpoint_every 490 \
    2>&1 | grep -v "^WARNING" | tee -a "$OUT/sweep_$name.log" | tail -30
done
keep_finished_runs "$RUNS" docs/data/st_paper
archive_runs "$name.tgz" "$RUNS" "$CACHE" docs/data/st_paper
