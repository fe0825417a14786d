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
EXTRAS=${MORAG_WHEELHOUSE_EXTRAS:-audio}
mkdir -p "$DIR"
export SOURCE_DATE_EPOCH=315532800
want=$( { cat "$ROOT/app/pyproject.toml"; echo "$EXTRAS"; "$PY" -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-16)
if [ "$(cat "$DIR/.deps-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[wheelhouse] building dependencies of morag[$EXTRAS] into $DIR" >&2
  find "$DIR" -name '*.whl' -delete
  "$PY" -m pip wheel --disable-pip-version-check -q "$ROOT/app/[$EXTRAS]" -w "$DIR" 2> >(grep -v "is ignored: it is neither" >&2)
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
