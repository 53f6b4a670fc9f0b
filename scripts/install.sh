#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its pinned dependencies. Idempotent: a stamp of
# pyproject.toml's hash skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-dev}

die() { echo "install: $*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "no '$PY' found; install Python 3.11 (or set PYTHON=/path/to/python3.11)"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' || die "Python >= 3.10 needed, found $("$PY" --version)"
avail_kb=$(df -Pk . | awk 'NR==2 {print $4}')
[ "${avail_kb:-0}" -gt 8000000 ] || [ -f .venv/.installed-"$extras" ] || \
  die "less than 8 GB free on $(df -P . | awk 'NR==2 {print $6}'); the PyTorch build alone needs about 6 GB"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || die "could not create .venv (is the python3-venv package installed?)"
fi
stamp=.venv/.installed-"$extras"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install: .venv is up to date"
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -m pip install -q -e ".[$extras]"; then
  die "pip install failed; check that the package registry is reachable (pip download torch==2.14.1 ...)"
fi
echo "$want" > "$stamp"
echo "install: done"
