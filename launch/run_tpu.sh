#!/usr/bin/env bash
# On-worker entry of a TPU VM (launch/tpu_vm.py sends it to every worker through ssh --worker=all).
#
#   bash launch/run_tpu.sh setup                       # venv + pinned requirements + jax[tpu], once
#   bash launch/run_tpu.sh stop                        # stop whatever holds the TPU
#   bash launch/run_tpu.sh start NAME MODULE [ARGS...] # stop, then python -m MODULE ARGS, detached
#   bash launch/run_tpu.sh run NAME MODULE [ARGS...]   # the same, waiting for it to end
#
# Run from the code directory (the repository root). Each worker logs to
# $VBERT_LOGS/NAME_$(hostname).log (default ~/logs), so the logs of all workers can be fetched into
# one folder. A run joins JAX's distributed runtime (VBERT_DISTRIBUTED=1 unless set): on Cloud TPU
# VMs JAX finds the other workers through the metadata server. `start` checks that the process is
# still alive after VBERT_START_CHECK_S seconds (default 10) and fails otherwise, printing its log.
# Environment: VBERT_VENV (default ~/vbert_venv; a container without it uses its python),
# VBERT_PYTHON (default python3.11), VBERT_LOGS, VBERT_TPU_LOCKFILE (default
# /tmp/libtpu_lockfile).
set -euo pipefail

CODE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VBERT_VENV:-$HOME/vbert_venv}"
PYTHON="${VBERT_PYTHON:-python3.11}"
LOGS="${VBERT_LOGS:-$HOME/logs}"
LOCKFILE="${VBERT_TPU_LOCKFILE:-/tmp/libtpu_lockfile}"

usage() {
  sed -n '2,16p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

# Idempotent: the venv is made once, and the packages are installed again only when the pins
# (requirements.txt) or this script change.
setup() {
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    sudo apt-get update -q
    sudo apt-get install -y -q "$PYTHON" "$PYTHON-venv"
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local jax_version want stamp
  jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$CODE_DIR/requirements.txt")"
  if [ -z "$jax_version" ]; then
    echo "run_tpu.sh: no 'jax==VERSION' pin in $CODE_DIR/requirements.txt" >&2
    exit 1
  fi
  want="$(cat "$CODE_DIR/requirements.txt" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
  stamp="$VENV/.vbert_jax_requirements"
  if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
    echo "$(hostname): environment up to date (jax[tpu]==$jax_version)"
  else
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$CODE_DIR/requirements.txt" "jax[tpu]==$jax_version"
    echo "$want" > "$stamp"
    echo "$(hostname): installed the pinned requirements and jax[tpu]==$jax_version"
  fi
  # The code directory is replaced on every copy, so the editable install is renewed each time.
  "$VENV/bin/python" -m pip install -q --no-deps -e "$CODE_DIR"
}

# A process that crashed or was left running keeps the TPU open, and the next one cannot start.
stop() {
  local sudo=""
  if sudo -n true 2>/dev/null; then sudo="sudo -n"; fi
  local pids="" pid
  if [ -f "$LOGS/current.pid" ]; then
    pid="$(cat "$LOGS/current.pid")"
    rm -f "$LOGS/current.pid"
    # Only if the pid still belongs to a Python process: a recycled pid is left alone.
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q python; then pids="$pid"; fi
  fi
  if command -v lsof >/dev/null 2>&1; then
    pids="$pids $($sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null || true)"
  fi
  for pid in $pids; do
    echo "$(hostname): stopping process $pid"
    $sudo kill -9 "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 50 ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
  done
  # libtpu refuses to start while the lock file of a dead process remains.
  local held=""
  if command -v lsof >/dev/null 2>&1 && $sudo lsof "$LOCKFILE" >/dev/null 2>&1; then held=1; fi
  if [ -e "$LOCKFILE" ] && [ -z "$held" ]; then
    $sudo rm -f "$LOCKFILE" 2>/dev/null || true
  fi
}

run() {
  local mode="$1" name="$2" module="$3"
  shift 3
  stop
  mkdir -p "$LOGS"
  local log="$LOGS/${name}_$(hostname).log"
  if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  export PYTHONPATH="$CODE_DIR${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
  export VBERT_DISTRIBUTED="${VBERT_DISTRIBUTED:-1}"
  cd "$CODE_DIR"
  echo "$(hostname): python -m $module $* > $log"
  if [ "$mode" = start ]; then
    nohup python -m "$module" "$@" > "$log" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$LOGS/current.pid"
    sleep "${VBERT_START_CHECK_S:-10}"
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$(hostname): the run failed to start; the end of $log:" >&2
      tail -n 20 "$log" >&2
      exit 1
    fi
  else
    python -m "$module" "$@" 2>&1 | tee "$log"
  fi
}

case "${1:-}" in
  setup) setup ;;
  stop) stop ;;
  start|run)
    [ $# -ge 3 ] || usage
    run "$@" ;;
  *) usage ;;
esac
