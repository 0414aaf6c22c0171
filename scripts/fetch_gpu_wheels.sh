#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what the GPU machine lacks, for the device tool's `carry`:
# Grain and its runtime needs (the training CLIs), the peers for the side-by-side benchmark
# (FLA, jax-linear-attention) and a copy of ../shared/tools/bench_peers.py.
# Run here (any CPU machine with pip and network access to the package registry):
#   bash scripts/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$@"
}
pip_download grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 cloudpickle==3.1.2
pip_download fla-core==0.6.0 flash-linear-attention==0.6.0 jax-linear-attention==0.1.0
if [ -f ../shared/tools/bench_peers.py ]; then cp ../shared/tools/bench_peers.py .whl/; fi
ls -1 .whl
