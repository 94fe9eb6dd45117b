#!/usr/bin/env bash
# Prints the folder holding libnvrtc.so.13 (and its builtins library) from the PyPI wheel
# nvidia-cuda-nvrtc, fetching and unpacking it on first use into a cache outside the clone:
#   ${RESHARD_NVRTC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/reshard}/nvrtc-VERSION/nvidia/cu13/lib
# No GPU and no CUDA install needed: NVRTC compiles on the host. Used by .ci/run for
#   LD_LIBRARY_PATH=$(scripts/nvrtc-lib.sh) cargo test --features cuda --test nvrtc
# Needs python3 with pip (pip download; the wheel is unpacked with python3 -m zipfile).
set -euo pipefail
version=13.5.37
root=${RESHARD_NVRTC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/reshard}
dir=$root/nvrtc-$version
lib=$dir/nvidia/cu13/lib
if [[ ! -f $lib/libnvrtc.so.13 ]]; then
  mkdir -p "$root"
  tmp=$(mktemp -d "$root/.nvrtc-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_12_x86_64 \
    --python-version 3.12 "nvidia-cuda-nvrtc==$version" -d "$tmp/whl" >&2
  python3 -m zipfile -e "$tmp"/whl/nvidia_cuda_nvrtc-*.whl "$tmp/x"
  rm -rf "$dir"
  mv "$tmp/x" "$dir"
fi
echo "$lib"
