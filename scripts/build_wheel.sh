#!/usr/bin/env bash
# Builds the t5like wheel into dist/: the install source for machines that cannot
# reach the repository, such as a Colab runtime. Upload the wheel to the Colab session (or put it
# in Google Drive under MyDrive/t5like/) and the quickstart notebook's first cell installs it.
#
#   bash scripts/build_wheel.sh            # -> dist/t5like-<version>-py3-none-any.whl
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${T5LIKE_VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python=python3
out="${1:-$root/dist}"
mkdir -p "$out"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
# Build from a copy of the sources git knows or would add (no venv, runs or caches in it).
git -C "$root" ls-files -z --cached --others --exclude-standard \
  | (cd "$root" && xargs -0 tar --ignore-failed-read -cf - 2>/dev/null) | tar -C "$build" -xf -
(cd "$build" && "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" .)
ls -1 "$out"/t5like-*.whl
