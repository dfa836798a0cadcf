#!/usr/bin/env bash
# Create (or reuse) the torch reference venv the benchmarks compare against: transformers 4.57.1 +
# torch 2.13.0 CPU, pinned in bench/torch_ref_requirements.txt, kept out of requirements.txt.
#   bash bench/make_torch_venv.sh [VENV]      (default ~/.venvs/torch-ref; or TORCH_REF_VENV)
# Prints the venv's python last; pass it to the benchmarks as --torch_python.
# torch comes from the CPU wheel index when it is reachable, else from pip's configured sources
# (a local wheel folder or index); where no +cpu wheel exists at all it falls back to PyPI's
# torch==2.13.0 (the CUDA build with its nvidia packages, several GB; it runs on CPU too).
# With TORCH_REF_JEMALLOC=1 and root it also installs Debian's libjemalloc2 (the tuned torch column
# uses it via LD_PRELOAD when present; glibc malloc tunables are used otherwise).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-${TORCH_REF_VENV:-$HOME/.venvs/torch-ref}}"
python="${PYTHON:-python3.11}"
requirements="$here/torch_ref_requirements.txt"
cpu_index="https://download.pytorch.org/whl/cpu"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
stamp="$venv/.requirements.sha256"
log="$venv/install.log"

if [[ "$(cat "$stamp" 2>/dev/null)" == "$want" && -x "$venv/bin/python" ]]; then
  echo "[torch-venv] reusing $venv (requirements unchanged)" >&2
  echo "$venv/bin/python"
  exit 0
fi
[[ -x "$venv/bin/python" ]] || { echo "[torch-venv] creating $venv with $python" >&2; "$python" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip)
torch_pin="$(grep -E '^torch==' "$requirements")"
index_args=()
if "$venv/bin/python" - "$cpu_index" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)
PY
then
  index_args=(--extra-index-url "$cpu_index")
  echo "[torch-venv] CPU wheel index reachable" >&2
else
  echo "[torch-venv] CPU wheel index not reachable; trying pip's configured sources for $torch_pin" >&2
fi
: >"$log"
if ! "${pip[@]}" install --no-deps "${index_args[@]}" "$torch_pin" >>"$log" 2>&1; then
  echo "[torch-venv] no $torch_pin wheel found; falling back to PyPI's torch==2.13.0 (CUDA build, runs on CPU)" >&2
  "${pip[@]}" install "torch==2.13.0" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
fi
if ! "${pip[@]}" install --no-deps -r <(grep -v -E '^torch==' "$requirements") >>"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "[torch-venv] failed; full log in $log" >&2
  exit 1
fi
if [[ "${TORCH_REF_JEMALLOC:-0}" == 1 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  apt-get install -y -q libjemalloc2 >>"$log" 2>&1 || echo "[torch-venv] libjemalloc2 not installed (see $log)" >&2
fi
"$venv/bin/python" -c "import torch, transformers; print('[torch-venv] torch', torch.__version__, \
'transformers', transformers.__version__)" >&2
echo "$want" >"$stamp"
echo "$venv/bin/python"
