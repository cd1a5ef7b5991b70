#!/usr/bin/env bash
# Trains with several JAX processes on this machine, as a multi-host job would, on simulated
# CPU devices. The processes join through jax.distributed on localhost.
#
# Usage: launch/local_multiprocess.sh WORKDIR [flags for ihdm_jax.main ...]
# Environment:
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  simulated CPU devices in each process (default 2)
#   CONFIG               config file (default configs/digits.py)
#   PYTHON               interpreter (default python3)
#   XLA_FLAGS            kept, with each process's device count added
# Process i writes its output to WORKDIR/logs/process_i.log; process 0 also to the terminal.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 WORKDIR [flags for ihdm_jax.main ...]" >&2
    exit 2
fi
mkdir -p "$1/logs"
workdir=$(cd "$1" && pwd)  # absolute: the processes run from the repository root
shift
num_processes=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-2}
config=${CONFIG:-configs/digits.py}
python=${PYTHON:-python3}

cd "$(dirname "$0")/.."
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

for ((i = 0; i < num_processes; i++)); do
    log="$workdir/logs/process_$i.log"
    cmd=(env JAX_PLATFORMS=cpu
         XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
         "$python" -m ihdm_jax.main --config="$config" --workdir="$workdir"
         --coordinator_address="localhost:$port" --num_processes="$num_processes"
         --process_id="$i" "$@")
    if ((i == 0)); then
        "${cmd[@]}" > >(tee "$log") 2>&1 &
    else
        "${cmd[@]}" > "$log" 2>&1 &
    fi
    pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
pids=()
exit "$status"
