#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh, run on every worker of the TPU VM:
#   1. stops this job's training process of a previous launch (SIGTERM: it saves a checkpoint
#      and exits; SIGKILL if it still runs 10 minutes later),
#   2. unpacks the project into ~/ihdm_jax,
#   3. installs uv if missing, a Python 3.12 environment in ~/ihdm_jax_venv, and makes its
#      packages exactly those of launch/tpu_requirements.txt (jax, libtpu and the rest pinned,
#      so a worker rebuilt later runs the same versions as the others; TensorFlow is there for
#      tfds to prepare MNIST and CIFAR-10, gcsfs for gs://),
#   4. starts `python -m ihdm_jax.main --multihost` detached from the ssh session, and fails
#      with the tail of its log if the process is gone STARTUP_WAIT (default 20) seconds later.
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
case $workdir in
    gs://*) ;;
    "$project" | "$project"/*)
        echo "Error: $host: WORKDIR=$workdir lies in $project, which every launch replaces." >&2
        exit 2 ;;
    /*) ;;
    *)
        echo "Error: $host: WORKDIR=$workdir is relative; give a gs:// or an absolute path." >&2
        exit 2 ;;
esac
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
uv pip sync --quiet --python "$venv/bin/python" "$project/launch/tpu_requirements.txt"

# 4. The job, detached: its own session, no terminal, survives the end of the ssh session.
case $workdir in
    gs://*) log=$run_dir/$host.log ;;
    *) mkdir -p "$workdir/logs"; log=$workdir/logs/$host.log ;;
esac
ln -sfn "$log" "$run_dir/log"
cd "$project"
setsid nohup "$venv/bin/python" -m ihdm_jax.main --multihost --config="$config" \
    --workdir="$workdir" "$@" >>"$log" 2>&1 </dev/null &
pid=$!
echo $pid >"$run_dir/pid"
if [[ $workdir == gs://* ]]; then
    setsid nohup bash -c 'while kill -0 "$0" 2>/dev/null; do sleep 60;
                              gcloud storage cp --quiet "$1" "$2"; done
                          gcloud storage cp --quiet "$1" "$2"' \
        "$pid" "$log" "$workdir/logs/$host.log" >/dev/null 2>&1 </dev/null &
fi
for ((waited = 1; waited <= ${STARTUP_WAIT:-20}; waited++)); do
    sleep 1
    if ! kill -0 "$pid" 2>/dev/null; then
        status=0
        wait "$pid" || status=$?
        if [[ $status == 0 ]]; then  # e.g. a run that had reached n_iters already
            echo "$host: the training process ended at once, successfully; its log $log:"
            tail -n 5 "$log"
            exit 0
        fi
        echo "Error: $host: the training process (pid $pid) failed (exit status $status)" \
             "within $waited s of its start; the end of its log $log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
done
echo "$host: started (pid $pid); log: $workdir/logs/$host.log"
