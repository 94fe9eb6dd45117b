#!/usr/bin/env bash
# The GPU run of issue #15, for whoever gets a GPU: `validate --device cuda` on every fixture in
# f32 and bf16, and on --shape bart-large|whisper-large|mllama-11b at every valid tp up to 8 in f32
# and bf16, at real token counts. Writes one JSON report per run and a markdown table for
# docs/gpu-validation.md into OUT (default gpu-validate-out/). Exit 0 when every run passed.
#
#   scripts/gpu-validate.sh [OUT]          # builds target/release/reshard with --features cuda
#   RESHARD=/path/to/reshard scripts/gpu-validate.sh OUT
#
# Needs an NVIDIA driver and CUDA 12/13 cuBLAS and NVRTC on LD_LIBRARY_PATH; without a GPU every
# run exits 3 and the script stops at the first one. ITERS (default 50) sets the timed iterations.
# To try the script itself without a GPU: DEVICE=cpu ITERS=1 TOKENS=3 SOURCE_TOKENS=6 \
#   SHAPE_EXTRA="--head-dim 4" scripts/gpu-validate.sh /tmp/gv (the times then mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-validate-out}
iters=${ITERS:-50} device=${DEVICE:-cuda} tokens=${TOKENS:-256}
read -r -a extra <<<"${SHAPE_EXTRA:-}"
mkdir -p "$out"
if [[ -z ${RESHARD:-} ]]; then
  cargo build --release --features cuda --quiet || exit 2
  RESHARD=target/release/reshard
fi
status=0
one() { # NAME ARGS...
  local name=$1 code
  shift
  "$RESHARD" validate "$@" --device "$device" --iters "$iters" --json >"$out/$name.json" 2>"$out/$name.err"
  code=$?
  printf '%-40s exit %s\n' "$name" "$code"
  if [[ $code == 3 ]]; then
    cat "$out/$name.err" >&2
    exit 3
  fi
  [[ $code == 0 ]] || status=1
}
for f in bart-tiny:4 bart-awkward:3 bart-mixed-heads:2 bart-legacy:2 whisper-tiny:2 mllama-gqa:8 mllama-awkward:6 mllama-sharded:2; do
  n=${f%:*} tp=${f#*:}
  "$RESHARD" convert "fixtures/$n" --tp "$tp" --out "$out/ckpt/$n" --force >/dev/null || { status=1; continue; }
  for dt in f32 bf16; do one "fixture-$n-tp$tp-$dt" "fixtures/$n" "$out/ckpt/$n" --dtype "$dt"; done
done
# Valid tp up to 8 (heads and kv heads divide or replicate evenly): bart-large 16/16, whisper-large
# 20/20, mllama-11b 32 q / 8 kv. S: BART's 1024 positions, Whisper's 1500 frames, mllama's 4 tiles
# of 1601 vision tokens.
for spec in bart-large:1024:1,2,4,8 whisper-large:1500:1,2,4,5 mllama-11b:6404:1,2,4,8; do
  IFS=: read -r shape s tps <<<"$spec"
  for tp in ${tps//,/ }; do
    for dt in f32 bf16; do
      one "shape-$shape-tp$tp-$dt" --shape "$shape" --tp "$tp" --tokens "$tokens" --source-tokens "${SOURCE_TOKENS:-$s}" --dtype "$dt" "${extra[@]}"
    done
  done
done
python3 - "$out" <<'PY' >"$out/table.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | device | tp | fused vs ref | split vs ref | fused vs split | tol | fused ms | split ms | time ratio | FLOP ratio | ok |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(out.glob("*.json")):
    try:
        r = json.loads(f.read_text())
    except ValueError:
        print(f"| {f.stem} | (no report) |||||||||||")
        continue
    for p in r["problems"]:
        e = lambda k: f'{p[k]["max_rel"]:.2e}'
        print(f'| {f.stem} {p["label"]} | {r["device"]} | {p["tp"]} | {e("fused_vs_reference")} | {e("split_vs_reference")} '
              f'| {e("fused_vs_split")} | {p["tolerance"]:.0e} | {p["fused_ms"]:.4f} | {p["split_ms"]:.4f} '
              f'| {p["time_ratio"]:.3f} | {p["flop_ratio"]:.3f} | {p["passed"]} |')
PY
echo "table: $out/table.md"
exit $status
