#!/usr/bin/env bash
# Run ON the GPU machine (bare, no network), in the repository root of the carried working tree,
# with the parts made by tools/gpu_carry.sh (bench/GPU.md). Files outside $OUT survive between
# calls only while the machine stays warm, so the parts are stashed under $STASH call by call.
#
#   bash tools/gpu_remote.sh stash gpu-carry/parts/carry.tar.00 # one call per part: copy + verify
#   bash tools/gpu_remote.sh install                           # reassemble, verify, venv, pip install
#   bash tools/gpu_remote.sh check [gpu_check.py args]         # the check; report under $OUT/gpu-check
set -euo pipefail

STASH="${STASH:-/tmp/prolora-carry}"
SITE="$STASH/site"  # the carried wheels, first on PYTHONPATH: they override the machine's own versions
PY="${PY:-python3}"
SUMS=gpu-carry/SHA256SUMS.parts
mkdir -p "$STASH/parts"

case "${1:-}" in
  stash)
    shift
    for part in "$@"; do
      name=$(basename "$part")
      want=$(awk -v p="parts/$name" '$2 == p { print $1 }' "$SUMS")
      got=$(sha256sum "$part" | cut -d' ' -f1)
      [ -n "$want" ] && [ "$want" = "$got" ] || { echo "checksum mismatch for $name" >&2; exit 3; }
      cp "$part" "$STASH/parts/$name"
      echo "stashed $name ($(stat -c %s "$part") bytes, sha256 ok)"
    done
    ls -l "$STASH/parts"
    ;;
  install)
    sums="$PWD/$SUMS"
    (cd "$STASH" && sha256sum -c --quiet "$sums")  # every part present and intact
    cp gpu-carry/SHA256SUMS.bundles "$STASH/"
    cat "$STASH"/parts/carry.tar.* >"$STASH/carry.tar"
    (cd "$STASH" && sha256sum -c SHA256SUMS.bundles)
    mkdir -p "$STASH/carry"
    tar -xf "$STASH/carry.tar" -C "$STASH/carry"
    rm -f "$STASH/carry.tar"
    if [ -d "$STASH/carry/model" ]; then
      mkdir -p "$HOME/.cache/prolora-export"
      cp -a "$STASH"/carry/model/. "$HOME/.cache/prolora-export/"
    fi
    # the machine's torch (CUDA 13) and its nvidia libraries stay; the carried wheels go to a --target
    # folder put first on PYTHONPATH (no venv: that would need ensurepip, which a bare image may lack)
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$STASH"/carry/wheels/*/*.whl
    # onnxruntime ≥ 1.21: preload_dlls() loads the CUDA/cuDNN libraries torch's nvidia packages installed
    # (tools/gpu_check.py calls it before any session)
    PYTHONPATH="$SITE" "$PY" -c "import torch, onnxruntime as ort; ort.preload_dlls(); \
print(ort.__version__, ort.__file__, ort.get_available_providers(), torch.cuda.get_device_name(0))"
    ;;
  check)
    shift
    PYTHONPATH="$SITE" "$PY" tools/gpu_check.py --out "${OUT:-/tmp/out}/gpu-check" "$@"
    ;;
  *)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
