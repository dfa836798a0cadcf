#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the pinned requirements.
# The venv lives outside the checkout so fresh clones (CI) reuse it; it is rebuilt only when
# requirements.txt changes. Override its place with QWENVL_VENV. Prints the venv path last.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${QWENVL_VENV:-$HOME/.venvs/qwenvl-ms}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
stamp="$venv/.requirements.sha256"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "[install] creating venv $venv" >&2
  "$python" -m venv "$venv"
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "[install] installing requirements into $venv (log: $venv/install.log)" >&2
  # --no-deps: requirements.txt is the full closure; this keeps the torch wheel out (see its header).
  if ! { "$venv/bin/python" -m pip install --upgrade pip \
         && "$venv/bin/python" -m pip install --no-deps -r "$root/requirements.txt"; } >"$venv/install.log" 2>&1; then
    tail -n 40 "$venv/install.log" >&2
    echo "[install] failed; full log in $venv/install.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
else
  echo "[install] reusing $venv (requirements unchanged)" >&2
fi
echo "$venv"
