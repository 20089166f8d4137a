#!/usr/bin/env bash
# Runs one t5like experiment on every worker of a Cloud TPU pod slice, or on one multi-GPU host.
# NOT RUN HERE: this project's machines have neither a TPU pod nor GPUs; the commands follow the
# Cloud TPU and JAX multi-process documentation and are checked only by `bash -n`.
#
#   scripts/launch_tpu_pod.sh tpu  CONFIG WORKDIR [main.py flags...]   # all workers of $TPU_NAME
#   scripts/launch_tpu_pod.sh gpu  CONFIG WORKDIR [main.py flags...]   # this host, all its GPUs
#   scripts/launch_tpu_pod.sh aot  VARIANT MESH DEVICES                # compile only, fake devices
#
# tpu: needs TPU_NAME, ZONE (and PROJECT unless gcloud has a default). The code is copied to
#   ~/t5like on every worker, the TPU extra installed, and `experiments/main.py` started on all
#   workers at once through `python -m t5like.parallel.distributed`, whose
#   jax.distributed.initialize() auto-detects the slice (process count, ids, coordinator). Each
#   worker reads only its share of every global batch (the data pipeline slices by process index);
#   WORKDIR must be storage every worker sees (a gs:// bucket) for orbax checkpoints.
# gpu: one process drives all local GPUs (no jax.distributed needed). For several GPU hosts, run
#   the same command on each with T5LIKE_COORDINATOR=host0:port T5LIKE_NUM_PROCESSES=N
#   T5LIKE_PROCESS_ID=i (or under SLURM, which JAX detects).
# The mesh comes from the experiment config's `mesh` section: only that section changes between
# 1 CPU, 8 devices and a pod slice (e.g. mesh.fsdp=-1 fills the slice).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode="${1:-}"; shift || true

usage() { sed -n '2,12p' "$0" >&2; exit 2; }

case "$mode" in
  tpu)
    [ $# -ge 2 ] || usage
    config="$1" workdir="$2"; shift 2
    : "${TPU_NAME:?set TPU_NAME to the pod slice name}" "${ZONE:?set ZONE, e.g. us-central2-b}"
    project=(); [ -n "${PROJECT:-}" ] && project=(--project "$PROJECT")
    ssh_all() {
      gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project[@]}" --worker=all \
        --command "$1"
    }
    # Copy the working tree (without its venv and run folders) to every worker.
    tarball="$(mktemp -t t5like.XXXXXX.tar.gz)"
    tar -C "$root" --exclude=.venv --exclude=.git --exclude='runs' -czf "$tarball" .
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/t5like.tar.gz" --zone "$ZONE" \
      "${project[@]}" --worker=all
    rm -f "$tarball"
    ssh_all "mkdir -p ~/t5like && tar -C ~/t5like -xzf ~/t5like.tar.gz && cd ~/t5like && \
      pip install -q -e '.[dev]' 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    flags="$(printf ' %q' "$@")"
    ssh_all "cd ~/t5like && python -m t5like.parallel.distributed experiments/main.py \
      --config=$(printf %q "$config") --workdir=$(printf %q "$workdir")$flags 2>&1 | \
      tee -a ~/t5like_worker.log"
    ;;
  gpu)
    [ $# -ge 2 ] || usage
    config="$1" workdir="$2"; shift 2
    source "$root/scripts/setup_env.sh" "dev"
    pip install -q 'jax[cuda12]'
    cd "$root"
    exec python -m t5like.parallel.distributed experiments/main.py --config="$config" \
      --workdir="$workdir" "$@"
    ;;
  aot)
    [ $# -eq 3 ] || usage
    exec "$root/.venv/bin/python" "$root/scripts/aot_compile.py" --variant="$1" --mesh="$2" \
      --devices="$3"
    ;;
  *) usage ;;
esac
