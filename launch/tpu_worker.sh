#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh, run on every worker of the TPU VM:
#   1. stops this job's training process of a previous launch (SIGTERM: it saves a checkpoint
#      and exits; SIGKILL if it still runs 10 minutes later),
#   2. unpacks the project into ~/ihdm_jax,
#   3. installs uv if missing, a Python 3.12 environment in ~/ihdm_jax_venv, the requirements,
#      gcsfs (gs:// workdirs and data) and jax[tpu] (quick when they are there already),
#   4. starts `python -m ihdm_jax.main --multihost` detached from the ssh session and returns.
# The log is WORKDIR/logs/<host>.log (for a gs:// WORKDIR: written on the worker and copied
# there every minute and at the end); ~/ihdm_jax_run/log points at it.
#
# Usage: tpu_worker.sh ARCHIVE CONFIG WORKDIR [flags for ihdm_jax.main ...]
set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: $0 ARCHIVE CONFIG WORKDIR [flags for ihdm_jax.main ...]" >&2
    exit 2
fi
archive=$1
config=$2
workdir=$3
shift 3
project=$HOME/ihdm_jax
venv=$HOME/ihdm_jax_venv
run_dir=$HOME/ihdm_jax_run  # this worker's record of the job: pid, log link
host=$(hostname)
mkdir -p "$run_dir"

# 1. The process of a previous launch, if it is still this job's (a pid may be reused).
if [[ -f $run_dir/pid ]]; then
    pid=$(<"$run_dir/pid")
    if grep -qa 'ihdm_jax\.main' "/proc/$pid/cmdline" 2>/dev/null; then
        echo "$host: stopping the previous launch (pid $pid); it saves a checkpoint first."
        kill -TERM "$pid" 2>/dev/null || true
        for ((waited = 0; waited < 600; waited++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$host: pid $pid still runs after 600 s; killing it."
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$run_dir/pid"
fi

# 2. The project.
rm -rf "$project"
mkdir -p "$project"
tar -xzf "$archive" -C "$project"

# 3. Python >= 3.11 (the TPU images have Ubuntu 22.04's 3.10) and the packages.
export PATH=$HOME/.local/bin:$PATH
if ! command -v uv >/dev/null; then
    curl -LsSf https://astral.sh/uv/install.sh | sh
fi
if [[ ! -x $venv/bin/python ]]; then
    uv venv --python 3.12 "$venv"
fi
uv pip install --quiet --python "$venv/bin/python" -r "$project/requirements.txt" gcsfs 'jax[tpu]'

# 4. The job, detached: its own session, no terminal, survives the end of the ssh session.
case $workdir in
    gs://*) log=$run_dir/$host.log ;;
    *) mkdir -p "$workdir/logs"; log=$workdir/logs/$host.log ;;
esac
ln -sfn "$log" "$run_dir/log"
cd "$project"
setsid nohup "$venv/bin/python" -m ihdm_jax.main --multihost --config="$config" \
    --workdir="$workdir" "$@" >>"$log" 2>&1 </dev/null &
echo $! >"$run_dir/pid"
if [[ $workdir == gs://* ]]; then
    pid=$!
    setsid nohup bash -c 'while kill -0 "$0" 2>/dev/null; do sleep 60;
                              gcloud storage cp --quiet "$1" "$2"; done
                          gcloud storage cp --quiet "$1" "$2"' \
        "$pid" "$log" "$workdir/logs/$host.log" >/dev/null 2>&1 </dev/null &
fi
echo "$host: started (pid $(<"$run_dir/pid")); log: $workdir/logs/$host.log"
