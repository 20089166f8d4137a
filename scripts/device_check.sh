#!/usr/bin/env bash
# One prepared check on an accelerator: install the matching jax, run the tests that need no torch,
# benchmark training (t5_small and t5_base, bf16, MFU against the chip's published peak) and
# decoding, and write every record as JSON under $OUT.
#
#   OUT=/some/folder bash scripts/device_check.sh [auto|cpu|cuda|tpu] [--quick]
#
# auto (default) picks cuda when nvidia-smi lists a GPU, tpu on a TPU VM, else cpu (a dry run of
# the whole script on a laptop). --quick: smaller benchmarks and the test subset without the slow
# ones (for trying the script out). A virtualenv whose jax already sees the platform is used as is
# (the install steps need the package index only when something is missing).
# Output under $OUT (default runs/device_check):
#   devices.json                 platform, device kind, count, jax version, published chip spec
#   tests.txt, tests.xml         pytest -m "not parity and not slow" (tests run on 8 fake CPU
#                                devices, as in CI: they check the install, not the chip)
#   train_<variant>_bf16.json    scripts/bench.py train --precision=bf16
#   decode.json                  scripts/bench.py decode
#   summary.json                 each step's exit status and seconds
# Every step runs even when an earlier one fails; the exit status is the first failure's.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
platform="${1:-auto}"
quick=''
if [ "${2:-}" = --quick ] || [ "${1:-}" = --quick ]; then quick=1; fi
if [ "$platform" = --quick ]; then platform=auto; fi
out="${OUT:-$root/runs/device_check}"
mkdir -p "$out"
cd "$root"
source scripts/setup_env.sh "dev" || exit 1
bash scripts/install_jax.sh "$platform" || exit 1
python="$(command -v python)"

declare -a names=() codes=() secs=()
step() {   # step NAME COMMAND...: runs it, records exit status and seconds
  local name="$1"; shift
  local t0=$SECONDS
  echo "== $name: $*" >&2
  "$@"
  local rc=$?
  names+=("$name"); codes+=("$rc"); secs+=("$((SECONDS - t0))")
  echo "== $name: exit $rc in $((SECONDS - t0)) s" >&2
}

step devices "$python" -c '
import json, sys
import jax
from t5like.parallel import hardware
d = jax.devices()[0]
spec = hardware.lookup(d.device_kind)
json.dump({"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
           "jax": jax.__version__, "published": spec and {"name": spec.name,
           "bf16_flops": spec.bf16_flops, "f32_flops": spec.f32_flops,
           "memory_bytes": spec.memory_bytes}}, open(sys.argv[1], "w"), indent=1)
print(open(sys.argv[1]).read())' "$out/devices.json"

# --quick: two small test files instead of the whole torch-free, fast suite.
tests='tests'
[ -n "$quick" ] && tests='tests/parallel/test_hardware.py tests/models/test_flops.py'
step tests bash -c "$(printf %q "$python") -m pytest $tests -q -m 'not parity and not slow and not multiprocess' \
  --junitxml=$(printf %q "$out/tests.xml") > $(printf %q "$out/tests.txt") 2>&1; rc=\$?; \
  tail -n 3 $(printf %q "$out/tests.txt"); exit \$rc"

if [ -n "$quick" ]; then
  train_args=(--batch=2 --inputs=32 --targets=32 --steps=2); variants=(t5_tiny)
  decode_args=(--variant=t5_tiny --input_len=16 --new_tokens=8 --batches=1 --runs=1)
else
  # Batch 32 x (512 + 128) tokens: enough work per step for a GPU / TPU chip.
  train_args=(--batch=32 --inputs=512 --targets=128 --steps=10); variants=(t5_small t5_base)
  decode_args=(--variant=t5_small)
fi
for v in "${variants[@]}"; do
  step "train_$v" "$python" scripts/bench.py train --variant="$v" --precision=bf16 \
    "${train_args[@]}" --out="$out/train_${v}_bf16.json"
done
step decode bash -c "$(printf %q "$python") scripts/bench.py decode ${decode_args[*]} \
  > $(printf %q "$out/decode.json")"

"$python" - "$out/summary.json" "${#names[@]}" "${names[@]}" "${codes[@]}" "${secs[@]}" <<'EOF'
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
names, codes, secs = sys.argv[3:3 + n], sys.argv[3 + n:3 + 2 * n], sys.argv[3 + 2 * n:3 + 3 * n]
steps = [{'step': a, 'exit': int(b), 'seconds': int(c)} for a, b, c in zip(names, codes, secs)]
json.dump({'steps': steps, 'ok': all(s['exit'] == 0 for s in steps)}, open(path, 'w'), indent=1)
print(json.dumps(steps))
EOF
for rc in "${codes[@]}"; do [ "$rc" -eq 0 ] || exit "$rc"; done
