#!/usr/bin/env bash
# The device session's two calls (a carry limit of 64 MiB a call splits the wheels and the
# model): `stage DIR...` installs the wheels found in DIR into $STATE/site and collects the
# model parts and the audio; `check [--only-transcribe]` runs gpu_check.py with them.
# Usage on a machine with a GPU and Python 3.12, from the repository root:
#   tests/device/run.sh stage .devcheck/a && tests/device/run.sh check
set -uo pipefail
STATE=${STATE:-/root/devcheck}
OUTDIR=${OUT:-/tmp/gpu-check-out}
mkdir -p "$STATE/site" "$STATE/model" "$OUTDIR"
case "${1:-}" in
stage)
  shift
  for dir in "$@"; do
    if ls "$dir"/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$STATE/site" "$dir"/*.whl || exit 1
    fi
    for f in "$dir"/*; do
      case "$f" in *.whl) ;; *) cp "$f" "$STATE/model/" ;; esac
    done
  done
  ls -la "$STATE/model"
  ;;
check)
  shift
  model="$STATE/model"
  if [ -f "$model/model.bin.part-1" ] && [ -f "$model/model.bin.part-2" ]; then
    cat "$model"/model.bin.part-* > "$model/model.bin" && rm -f "$model"/model.bin.part-*
  fi
  export PYTHONPATH="$PWD/app/src:$STATE/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  # libcublas.so.12 (what ctranslate2 4.8.5 loads): a real one if the machine has it, else a
  # link named so to the machine's cuBLAS 13, to see what the worker's version check says.
  cublas=$(find /usr /opt /root /usr/local -name 'libcublas.so.12*' -not -path "$STATE/*" 2>/dev/null | head -1)
  shim="$STATE/cublas"
  mkdir -p "$shim"
  if [ -n "$cublas" ]; then
    ln -sf "$cublas" "$shim/libcublas.so.12"
  else
    c13=$(find /usr /opt /root /usr/local -name 'libcublas.so.13*' 2>/dev/null | head -1)
    [ -n "$c13" ] && ln -sf "$c13" "$shim/libcublas.so.12"
  fi
  args=(--out "$OUTDIR" --cublas-dir "$shim")
  [ -f "$model/model.bin" ] && [ -f "$model/speech.wav" ] &&
    args+=(--model "$model" --audio "$model/speech.wav")
  python3 tests/device/gpu_check.py "${args[@]}" "$@"
  ;;
*) echo "usage: $0 stage DIR... | check [--only-transcribe]" >&2; exit 2 ;;
esac
