#!/usr/bin/env bash
# Installs the jax build for an accelerator, at the jax version setup.py already installed, into
# the project's virtualenv (${T5LIKE_VENV:-./.venv}; run scripts/setup_env.sh first).
#
#   scripts/install_jax.sh [auto|cpu|cuda|tpu]
#
# auto: tpu on a TPU VM, cuda where nvidia-smi lists a GPU, else cpu
# (t5like.parallel.hardware.detect_platform). cuda installs jax[cuda12], tpu jax[tpu]: their
# runtimes come as wheels (only the NVIDIA driver must be on the host). Nothing is installed when
# jax already runs on the platform. Prints the devices jax then sees.
# T5LIKE_DRY_RUN=1 prints the pip command instead of running it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${T5LIKE_VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || { echo "install_jax.sh: no virtualenv at $python; run scripts/setup_env.sh first" >&2; exit 1; }
read -r platform spec < <(cd "$root" && "$python" -m t5like.parallel.hardware jax-requirement "${1:-auto}")
want="$platform"; [ "$want" = cuda ] && want=gpu
if "$python" -c "import jax, sys; sys.exit(jax.devices()[0].platform != '$want')" 2>/dev/null; then
  echo "jax already runs on $platform: nothing to install"
  exit 0
fi
if [ -n "${T5LIKE_DRY_RUN:-}" ]; then
  echo "$python -m pip install -q $spec"
  exit 0
fi
"$python" -m pip install -q "$spec"
"$python" -c 'import jax; print("jax", jax.__version__, "devices:", jax.devices())'
