#!/usr/bin/env bash
# Sets up the environment (with test, parity and serving extras), then runs the test suite without
# the tests marked slow (the fast default CI runs); `scripts/test.sh -m ""` runs every test.
# Exit code 5 (no tests collected) counts as a failure.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh" "dev,parity,serve" || exit 1
cd "$root"
python -m pytest tests -m "not slow" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
exit "$rc"
