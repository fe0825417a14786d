#!/usr/bin/env bash
# Builds the wheelhouse the test containers install MoRAG from (morag_app_source: wheelhouse),
# so no container downloads anything from PyPI. Also the air-gapped install path.
#
#   molecule/images/wheelhouse.sh [DIR]     (default: .cache/wheelhouse)
#
# The dependencies are built once and cached by a hash of app/pyproject.toml and the
# extras; the morag wheel itself is rebuilt every time (byte-identical for identical
# sources thanks to SOURCE_DATE_EPOCH, so an unchanged app is not reinstalled).
# The controller's Python must be the containers' (Debian 12: 3.11); manylinux wheels fit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$ROOT/.cache/wheelhouse}
PY=${PY:-$ROOT/.venv/bin/python}
# What the lab installs on any host (server and CPU workers: everything but ingest).
EXTRAS=${MORAG_WHEELHOUSE_EXTRAS:-audio,video,documents,web,image,youtube}
# The hosts' Python (Debian 12's 3.11.2, as on the lab's containers).
HOST_PYTHON=${MORAG_WHEELHOUSE_HOST_PYTHON:-/usr/bin/python3}
mkdir -p "$DIR"
export SOURCE_DATE_EPOCH=315532800
want=$( { cat "$ROOT/app/pyproject.toml"; echo "$EXTRAS"; "$HOST_PYTHON" -V; "$PY" -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-16)
if [ "$(cat "$DIR/.deps-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[wheelhouse] building dependencies of morag[$EXTRAS] into $DIR" >&2
  find "$DIR" -name '*.whl' -delete
  "$PY" -m pip wheel --disable-pip-version-check -q "$ROOT/app/[$EXTRAS]" -w "$DIR" 2> >(grep -v "is ignored: it is neither" >&2)
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
bad = [p.name for p in pathlib.Path(sys.argv[1]).glob("*.whl")
       if not any(t in p.name for t in ("-py3-none-any", "-py2.py3-none-any", "-cp311-", "-abi3-", "-py3-none-manylinux", "-py3-none-linux"))]
if bad:
    sys.exit(f"[wheelhouse] not installable on CPython 3.11: {bad}")
PYCHECK
echo "[wheelhouse] $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR" >&2
