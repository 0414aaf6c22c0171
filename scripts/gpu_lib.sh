# Shared by the scripts/gpu_*.sh device-call scripts (source it from the repository root).

# gpu_setup [WHEEL_GLOB...]: $OUT as an absolute path (created), the carried .whl/ wheels (all, or
# those matching the globs) installed into /tmp/site, and PYTHONPATH set to use them and the tree.
# With GPU_SETUP_DONE set (scripts/gpu_parallel.sh installs once for all its commands), only the
# environment is set.
gpu_setup() {
  OUT=$(realpath -m "${OUT:-gpu_out}")
  mkdir -p "$OUT"
  if [ -n "${GPU_SETUP_DONE:-}" ]; then
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT
    return 0
  fi
  local wheels=()
  if [ $# -eq 0 ]; then wheels=(.whl/*.whl); else for g in "$@"; do wheels+=(.whl/$g); done; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" || return 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT
}

# require_jax_gpu: fail unless JAX's default backend is the GPU (a CUDA plugin that cannot start,
# e.g. over conflicting XLA_*MEM_FRACTION variables, otherwise leaves JAX quietly on the CPU).
require_jax_gpu() {
  python3 -c 'import jax, sys; b = jax.default_backend()
sys.exit(0 if b == "gpu" else f"JAX found no GPU (backend {b!r}); see the errors above")'
}

# The Grain wheels and their dependencies (the experiments' data pipelines).
GRAIN_WHEELS=("grain*.whl" "array_record*.whl" "portpicker*.whl" "cloudpickle*.whl")

# finished_runs RUNS_DIR: the directories of the runs in RUNS_DIR that finished (a results.json
# without "time_limited": true), one per line.
finished_runs() {
  for r in "$1"/*/results.json "$1"/*/*/results.json; do  # RUNS_DIR/<run> or <seed>/<run>
    [ -f "$r" ] || continue
    grep -q '"time_limited": true' "$r" || dirname "$r"
  done
}

# archive_runs ARCHIVE RUNS_DIR [MORE_PATHS...]: tar RUNS_DIR (and MORE_PATHS) into $OUT/ARCHIVE,
# leaving out the checkpoints of runs that finished.
archive_runs() {
  local archive=$1 runs=$2 d
  shift 2
  local exclude=()
  while read -r d; do exclude+=(--exclude "$d/checkpoints"); done < <(finished_runs "$runs")
  tar czf "$OUT/$archive" "${exclude[@]}" "$runs" "$@"
  ls -la "$OUT"
}

# keep_finished_runs RUNS_DIR KEEP_DIR: copy results.json, config.json and curve_*.json of every
# finished run in RUNS_DIR to KEEP_DIR/<run> (small files to commit).
keep_finished_runs() {
  local d
  while read -r d; do
    mkdir -p "$2/${d#"$1"/}"
    cp "$d"/results.json "$d"/config.json "$d"/curve_*.json "$2/${d#"$1"/}/" 2>/dev/null
  done < <(finished_runs "$1")
}
