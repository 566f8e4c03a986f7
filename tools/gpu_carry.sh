#!/usr/bin/env bash
# Prepare, on this (networked) machine, what the bare GPU machine needs for tools/gpu_check.py
# (issue 22, bench/GPU.md): the cp312 manylinux wheels it lacks, this project's wheel and the demo
# model, packed as one tar (wheels/small, wheels/ort, model/) split into parts of at most PART_MIB MiB,
# with sha256 sums (one stream: fewer parts, hence fewer device calls, than one tar per bundle). Each part travels in one device call (64 MiB per call, the working tree included);
# tools/gpu_remote.sh reassembles, verifies and installs them there and runs the check.
#
#   tools/gpu_carry.sh                 # everything: 13 parts (onnxruntime-gpu 255 MB, model 538 MB)
#   tools/gpu_carry.sh --skip-large    # no onnxruntime-gpu download (slow network), measure the rest
#   tools/gpu_carry.sh --no-model      # no model bundle: the GPU run then uses gpu_check.py --base tiny
#
# Output: gpu-carry/ (gitignored): wheels/, parts/carry.tar.NN, SHA256SUMS.parts, SHA256SUMS.bundles
# (the whole tar), PLAN.txt (the calls and what was measured).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${GPU_CARRY:-$ROOT/gpu-carry}"
PART_MIB="${PART_MIB:-58}"  # 58 MiB + the working tree (2.4 MiB on 2026-12-02) stays under 64 MiB per call
PY="${PYTHON:-$ROOT/.venv/bin/python}"
ORT_GPU="onnxruntime-gpu==1.31.1"
MODEL_DIR="${MODEL_DIR:-$HOME/.cache/prolora-export/SmolLM2-135M-Instruct}"
SKIP_LARGE=0
NO_MODEL=0
for arg in "$@"; do
  case "$arg" in
    --skip-large) SKIP_LARGE=1 ;;
    --no-model) NO_MODEL=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

# The versions this project is tested with here (the GPU machine's own transformers 5.x is newer than
# optimum-onnx 0.1.0 allows, so transformers and its hub/tokenizers travel too).
SMALL=(transformers tokenizers huggingface_hub optimum optimum-onnx onnx-ir peft safetensors click tqdm psutil)
pins=$("$PY" - "${SMALL[@]}" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)

timed() {  # timed LABEL CMD...: run CMD, log its wall seconds to PLAN.txt's measurements
  local label=$1 start end
  shift
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  awk -v l="$label" -v s="$start" -v e="$end" 'BEGIN { printf "%-28s %6.1f s\n", l, e - s }' | tee -a "$OUT/measured.txt"
}

rm -rf "$OUT"
mkdir -p "$OUT/carry/wheels/small" "$OUT/carry/wheels/ort" "$OUT/parts"
: >"$OUT/measured.txt"
DL=(-m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -q)
# shellcheck disable=SC2086  # pins is a list of NAME==VERSION words
timed "download small wheels" "$PY" "${DL[@]}" -d "$OUT/carry/wheels/small" $pins
timed "build project wheel" "$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$OUT/carry/wheels/small" "$ROOT"
if [ "$SKIP_LARGE" = 0 ]; then
  timed "download onnxruntime-gpu" "$PY" "${DL[@]}" -d "$OUT/carry/wheels/ort" "$ORT_GPU"
fi

if [ "$NO_MODEL" = 0 ]; then
  test -f "$MODEL_DIR/model.safetensors" || "$PY" -c "from prolora_export.models import ensure_demo_model; ensure_demo_model()"
  mkdir -p "$OUT/carry/model"
  cp -a "$MODEL_DIR" "$OUT/carry/model/"
fi
# no compression: wheels are zips already and fp32 weights barely shrink (xz: 284 -> 186 MB for ORT's CUDA provider)
timed "pack" tar -cf "$OUT/carry.tar" -C "$OUT/carry" .
(cd "$OUT" && sha256sum carry.tar >SHA256SUMS.bundles)
timed "split" split -b "${PART_MIB}M" -d -a 2 "$OUT/carry.tar" "$OUT/parts/carry.tar."
rm -rf "$OUT/carry.tar" "$OUT/carry/model"
(cd "$OUT" && sha256sum parts/* >SHA256SUMS.parts)

{
  echo "# gpu-carry plan ($(date -u +%FT%TZ)), parts of ≤ $PART_MIB MiB"
  echo "# wheels:"
  (cd "$OUT/carry/wheels" && find . -name '*.whl' -printf '#   %P %s bytes\n' | sort)
  parts=("$OUT"/parts/*)
  last=$(basename "${parts[-1]}")
  echo "# one device call per part (carry = [\"gpu-carry/parts/<part>\", \"gpu-carry/SHA256SUMS.parts\"]):"
  for part in "${parts[@]::${#parts[@]}-1}"; do
    echo "bash tools/gpu_remote.sh stash gpu-carry/parts/$(basename "$part")   # $(stat -c %s "$part") bytes"
  done
  echo "# then one call with the last part (carry = [\"gpu-carry/parts/$last\", \"gpu-carry/SHA256SUMS.parts\", \"gpu-carry/SHA256SUMS.bundles\"]):"
  check="bash tools/gpu_remote.sh check"
  if [ "$NO_MODEL" = 1 ]; then check="$check --base tiny"; fi
  echo "bash tools/gpu_remote.sh stash gpu-carry/parts/$last && bash tools/gpu_remote.sh install && $check"
  echo "# measured here:"
  sed 's/^/#   /' "$OUT/measured.txt"
} >"$OUT/PLAN.txt"
cat "$OUT/PLAN.txt"
