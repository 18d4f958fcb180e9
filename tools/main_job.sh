#!/bin/bash
# The README's main-job measurement: the newcomer's command from a clean clone of this
# repository's HEAD, with a fresh venv and empty data and compilation caches, timed.
#   tools/main_job.sh [CLONE_DIR [--config.X=Y ...]]      (default /tmp/emit-jax-main-job)
# Flags after CLONE_DIR go to the run (to time a variant of the recipe).
# CLONE_DIR must be new, empty, or a folder an earlier run of this script made (it is replaced
# then; any other folder is refused, never deleted). Prints the commit, the install time, the
# run's own lines and the run time; any failing step stops it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-/tmp/emit-jax-main-job}
shift || true
mark=.emit-jax-main-job
if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ] && [ ! -e "$dir/$mark" ]; then
  echo "tools/main_job.sh: error: $dir: exists and was not made by this script; choose a new folder" >&2
  exit 2
fi
rm -rf "$dir"
git clone -q "$repo" "$dir"
cd "$dir"
touch "$mark"
git log --oneline -1
export EMIT_JAX_CACHE="$dir/.data-cache" JAX_COMPILATION_CACHE_DIR="$dir/.jax-cache"
s=$(date +%s); echo "start $(date -u)"
python3 -m venv .venv
. .venv/bin/activate
pip install -q -e .
m=$(date +%s); echo "install $((m - s)) s"
python -m emit_jax.train --config configs/grpo.py --workdir runs/grpo "$@"
e=$(date +%s); echo "run $((e - m)) s; end $(date -u)"
