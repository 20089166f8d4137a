#!/usr/bin/env bash
# Sets up the environment, then runs the main job (experiments/main.py) on its default config.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" ""
cd "$root"
exec python experiments/main.py "$@"
