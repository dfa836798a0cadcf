#!/usr/bin/env bash
# The README's test command: install if needed, then run the whole pytest suite (slow tests included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/install.sh")"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
