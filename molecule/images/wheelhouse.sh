#!/usr/bin/env bash
# Builds the wheelhouse the hosts of an inventory install MoRAG from (morag_app_source:
# wheelhouse), so no host downloads anything from PyPI: the air-gapped install path, and
# what the test containers use.
#
#   molecule/images/wheelhouse.sh [--inventory INV] [DIR]   build (default: inventory/lab,
#                                                           .cache/wheelhouse), then check
#   molecule/images/wheelhouse.sh --check [--inventory INV] [DIR]   only check
#
# What goes in is read from the inventory (molecule/images/wheelhouse_plan.py): morag with
# the extras of every host group, the CPU build of torch when an extra needs it (server:
# [all]), and in cuda/ the NVIDIA wheels GPU workers install (cuda_runtime_method: wheels),
# which the cuda_runtime role copies to GPU hosts only. The check then resolves each host
# group's requirements with the hosts' Python from this directory alone (pip --no-index
# --dry-run, pip's configuration ignored) and fails naming the group and what is missing.
#
# The dependencies are built once and cached by a hash of app/pyproject.toml and the plan;
# the morag wheel itself is rebuilt every time (byte-identical for identical sources thanks
# to SOURCE_DATE_EPOCH, so an unchanged app is not reinstalled).
# The controller's Python must be the hosts' (Debian 12: 3.11); manylinux wheels fit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
INVENTORY=$ROOT/inventory/lab
CHECK_ONLY=false
while [ $# -gt 0 ]; do
  case "$1" in
    --inventory) INVENTORY=$2; shift 2 ;;
    --check) CHECK_ONLY=true; shift ;;
    -*) echo "usage: $0 [--check] [--inventory INV] [DIR]" >&2; exit 2 ;;
    *) break ;;
  esac
done
DIR=${1:-$ROOT/.cache/wheelhouse}
PY=${PY:-$ROOT/.venv/bin/python}
# The hosts' Python (Debian 12's 3.11.2, as on the lab's containers).
HOST_PYTHON=${MORAG_WHEELHOUSE_HOST_PYTHON:-/usr/bin/python3}
STACK=$(PYTHONPATH=$ROOT/app/src "$PY" -m morag.gpu_stack --json)
plan() { "$PY" "$ROOT/molecule/images/wheelhouse_plan.py" "$INVENTORY" "$STACK" "$1"; }
plan extras >/dev/null  # an unreadable inventory stops here, with its reason
# MORAG_WHEELHOUSE_EXTRAS overrides the union of the inventory's extras.
EXTRAS=${MORAG_WHEELHOUSE_EXTRAS:-$(plan extras)}
NEEDS_TORCH=$(plan torch)
CUDA_WHEELS=$(plan cuda_wheels)
# In the cache key only when present: a wheelhouse without them keeps its earlier key.
PLAN_KEY=$( { [ "$NEEDS_TORCH" = true ] && echo -n "torch "; echo -n "$CUDA_WHEELS"; } || true)

check() {
  # Each host group's requirements from this directory alone, with the hosts' Python.
  local venv group reqs ok=true links=(--find-links "$DIR")
  [ -d "$DIR/cuda" ] && links+=(--find-links "$DIR/cuda")
  venv=$(mktemp -d); "$HOST_PYTHON" -m venv "$venv"
  for group in $(plan groups); do
    reqs=$(plan "requirements:$group")
    # shellcheck disable=SC2086
    if ! out=$(env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
        "$venv/bin/pip" install --disable-pip-version-check --dry-run --ignore-installed -q \
        --no-index "${links[@]}" $reqs 2>&1); then
      echo "[wheelhouse] $DIR cannot install the $group hosts' $reqs offline:" >&2
      echo "$out" | grep -v "is ignored: it is neither" | tail -5 >&2
      ok=false
    fi
  done
  rm -rf "$venv"
  $ok && echo "[wheelhouse] $DIR holds everything the hosts of $INVENTORY install" >&2
  $ok
}
if $CHECK_ONLY; then
  check
  exit
fi
mkdir -p "$DIR"
export SOURCE_DATE_EPOCH=315532800
want=$( { cat "$ROOT/app/pyproject.toml"; echo "$EXTRAS${PLAN_KEY:+ $PLAN_KEY}"; "$HOST_PYTHON" -V; "$PY" -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-16)
if [ "$(cat "$DIR/.deps-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[wheelhouse] building dependencies of morag[$EXTRAS] for $INVENTORY into $DIR" >&2
  find "$DIR" -name '*.whl' -delete
  if [ "$NEEDS_TORCH" = true ]; then
    # torch first and alone, as the Makefile does: resolved through the app's extras, pip
    # would take PyPI's CUDA build (GBs of nvidia-* wheels) for hosts that run it on CPU.
    "$PY" -m pip wheel --disable-pip-version-check -q --no-deps torch==2.13.0 -w "$DIR"
    if ! ls "$DIR"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
      echo "[wheelhouse] pip found no CPU build of torch 2.13.0 (got: $(cd "$DIR" && ls torch-*.whl))." \
        "Give pip one, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2
      exit 1
    fi
  fi
  if [ -n "$CUDA_WHEELS" ]; then
    # The NVIDIA libraries GPU workers load (cuda_runtime_method: wheels), for the hosts' platform.
    mkdir -p "$DIR/cuda"
    # shellcheck disable=SC2086
    "$PY" -m pip download --disable-pip-version-check -q --only-binary=:all: --no-deps $CUDA_WHEELS -d "$DIR/cuda"
  fi
  "$PY" -m pip wheel --disable-pip-version-check -q --find-links "$DIR" "$ROOT/app/[$EXTRAS]" -w "$DIR" 2> >(grep -v "is ignored: it is neither" >&2)
  # Environment markers differ between Python versions (redis needs async-timeout below
  # 3.11.3): when the controller's Python is not the hosts' (Debian 12: /usr/bin/python3,
  # 3.11.2), let a throwaway venv of the hosts' Python add what its markers select.
  if [ -x "$HOST_PYTHON" ] && [ "$("$HOST_PYTHON" -V)" != "$("$PY" -V)" ]; then
    "$HOST_PYTHON" -m venv "$DIR/.hostpy"
    "$PY" -m pip wheel --disable-pip-version-check -q --no-deps "$ROOT/app/" -w "$DIR/.tmp"
    "$DIR/.hostpy/bin/pip" download --disable-pip-version-check -q --only-binary=:all: \
      --find-links "$DIR" -d "$DIR" "$(ls "$DIR"/.tmp/morag-*.whl)[$EXTRAS]" \
      2> >(grep -v "is ignored: it is neither" >&2)
    rm -rf "$DIR/.tmp" "$DIR/.hostpy"
  fi
  echo "$want" >"$DIR/.deps-stamp"
fi
rm -f "$DIR"/morag-*.whl
"$PY" -m pip wheel --disable-pip-version-check -q --no-deps "$ROOT/app/" -w "$DIR"
# Wheels that cannot run on the containers' Python would fail late: check the tags now.
"$PY" - "$DIR" <<'PYCHECK'
import sys, pathlib
bad = [p.name for p in pathlib.Path(sys.argv[1]).glob("**/*.whl")
       if not any(t in p.name for t in ("-py3-none-any", "-py2.py3-none-any", "-cp311-", "-abi3-", "-py3-none-manylinux", "-py3-none-linux"))]
if bad:
    sys.exit(f"[wheelhouse] not installable on CPython 3.11: {bad}")
PYCHECK
echo "[wheelhouse] $(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR" >&2
# Checked once per set of dependencies (~25 s): the morag wheel rebuilt above declares the
# same requirements as long as app/pyproject.toml, part of the key, is unchanged.
if [ "$(cat "$DIR/.check-stamp" 2>/dev/null)" != "$want" ]; then
  check
  echo "$want" >"$DIR/.check-stamp"
fi
