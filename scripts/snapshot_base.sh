#!/usr/bin/env bash
# Snapshot an earlier revision's code into .base/ (dpjax, pallas_kernels, experiments; git-ignored)
# so that one device call can time it next to the working tree: carry [".whl", ".base"] and run
# `BASE=1 bash scripts/gpu_check.sh bench lm` (scripts/gpu_check.sh: the `bench` and `lm` stages
# then also run from .base/, writing base_* records).
#   bash scripts/snapshot_base.sh HEAD~1
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bash scripts/snapshot_base.sh REV (a git revision, e.g. HEAD~1)}
commit=$(git rev-parse --verify "$rev^{commit}")
rm -rf .base
mkdir .base
git archive "$commit" dpjax pallas_kernels experiments | tar -x -C .base
echo "$commit" > .base/REVISION
echo "snapshot of $rev ($commit) in .base/"
