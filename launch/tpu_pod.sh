#!/usr/bin/env bash
# Trains on a Cloud TPU VM (a pod slice or a single host): creates it unless it exists, copies
# this repository to every worker and starts one training process per worker, detached from the
# ssh session (the processes find each other through jax.distributed). launch/tpu_worker.sh is
# the worker side: it stops this job's processes of a previous launch, installs Python 3.12 and
# the exact packages of launch/tpu_requirements.txt with uv, starts the job with its log under
# WORKDIR/logs/ and checks that it is still running 20 s later.
#
# Usage: launch/tpu_pod.sh TPU_NAME CONFIG WORKDIR [flags for ihdm_jax.main ...]
# WORKDIR must be seen by every worker: a gs://bucket/path, or an absolute path on a shared file
# system. Running the same command again finds the TPU VM (gcloud ... describe), stops the
# running job (it saves a checkpoint) and resumes it with the code and flags given now; a TPU
# VM that was preempted (Spot) is deleted and created again first.
# Environment:
#   ZONE              required unless ACCELERATOR_TYPE is v4-* (default zone us-central2-b)
#   ACCELERATOR_TYPE  (default v4-32: 4 hosts x 4 chips)
#   RUNTIME_VERSION   TPU VM image; default by generation: tpu-ubuntu2204-base (v4),
#                     v2-alpha-tpuv5-lite (v5e, v5litepod-*), v2-alpha-tpuv5 (v5p),
#                     v2-alpha-tpuv6e (v6e)
#   QUEUED=1          create the TPU VM through a queued resource: the request waits for
#                     capacity instead of failing at once (the launcher waits with it)
#   CREATE_FLAGS      more flags for the create command, e.g. '--spot' or '--reserved'
#   WATCH_S           after the start, look at the TPU VM every WATCH_S seconds and launch
#                     again (recreating it) when it was preempted; Ctrl-C ends the watching,
#                     not the job
# Example:
#   ACCELERATOR_TYPE=v5litepod-16 ZONE=us-west4-a QUEUED=1 CREATE_FLAGS=--spot WATCH_S=600 \
#       launch/tpu_pod.sh ihdm-cifar10 configs/cifar10.py gs://my-bucket/runs/cifar10 \
#       --config.data.data_dir=gs://my-bucket/tensorflow_datasets
set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: $0 TPU_NAME CONFIG WORKDIR [flags for ihdm_jax.main ...]" >&2
    exit 2
fi
name=$1
config=$2
workdir=$3
shift 3
case $workdir in
    gs://* | /*) ;;
    *)
        echo "Error: WORKDIR=$workdir is a relative path; every worker must see it: give a" \
             "gs://bucket/path or an absolute path on a shared file system." >&2
        exit 2 ;;
esac
accelerator=${ACCELERATOR_TYPE:-v4-32}
case $accelerator in
    v4-*) default_runtime=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) default_runtime=v2-alpha-tpuv5 ;;
    v6e-*) default_runtime=v2-alpha-tpuv6e ;;
    *) default_runtime= ;;
esac
if [[ -z ${ZONE:-} && $accelerator != v4-* ]]; then
    echo "Error: set ZONE to a zone that offers ACCELERATOR_TYPE=$accelerator (the default" \
         "zone, us-central2-b, has v4 only; see the Cloud TPU documentation's regions and" \
         "zones)." >&2
    exit 2
fi
zone=${ZONE:-us-central2-b}
runtime=${RUNTIME_VERSION:-$default_runtime}
read -r -a create_flags <<<"${CREATE_FLAGS:-}"
repo_dir="$(cd "$(dirname "$0")/.." && pwd)"

# The TPU VM's state (READY, CREATING, PREEMPTED, ...); empty if there is none.
state() {
    gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format='value(state)' \
        2>/dev/null || true
}

create() {
    if [[ -z $runtime ]]; then
        echo "Error: no default TPU runtime for ACCELERATOR_TYPE=$accelerator; set" \
             "RUNTIME_VERSION (see the Cloud TPU documentation's software versions)." >&2
        exit 1
    fi
    if [[ ${QUEUED:-0} != 1 ]]; then
        gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
            --accelerator-type="$accelerator" --version="$runtime" "${create_flags[@]}"
        return
    fi
    gcloud compute tpus queued-resources create "$name" --node-id="$name" --zone="$zone" \
        --accelerator-type="$accelerator" --runtime-version="$runtime" "${create_flags[@]}"
    local queued
    while true; do
        queued=$(gcloud compute tpus queued-resources describe "$name" --zone="$zone" \
                 --format='value(state.state)')
        case $queued in
            ACTIVE) return ;;
            FAILED | SUSPENDED)
                echo "Error: the queued resource $name is $queued (gcloud compute tpus" \
                     "queued-resources describe $name --zone=$zone)." >&2
                exit 1 ;;
        esac
        echo "$(date '+%H:%M:%S') queued resource $name: $queued; waiting for capacity."
        sleep 60
    done
}

delete() {
    if [[ ${QUEUED:-0} == 1 ]]; then
        gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
    else
        gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    fi
}

# Every argument quoted once for the worker's shell; no extra flags add nothing.
command="bash ~/tpu_worker.sh ~/ihdm_jax.tar.gz"
for arg in "$config" "$workdir" "$@"; do
    command+=" $(printf '%q' "$arg")"
done
# The repository's files as they are now, committed or not, without what git ignores.
archive=$(mktemp -d)/ihdm_jax.tar.gz
trap 'rm -rf "$(dirname "$archive")"' EXIT
git -C "$repo_dir" ls-files -z --cached --others --exclude-standard |
    tar -czf "$archive" -C "$repo_dir" --null --files-from=- --ignore-failed-read

launch() {
    local now
    now=$(state)
    case $now in
        '') create ;;
        PREEMPTED | TERMINATED)
            echo "TPU VM $name in $zone is $now: deleting and creating it again."
            delete
            create ;;
        *) echo "TPU VM $name exists in $zone ($now): launching on it." ;;
    esac
    gcloud compute tpus tpu-vm scp "$archive" "$repo_dir/launch/tpu_worker.sh" "$name":~ \
        --zone="$zone" --worker=all
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$command"
    echo "Started on every worker of $name. Follow process 0's log with:"
    echo "  gcloud compute tpus tpu-vm ssh $name --zone=$zone --worker=0 \\"
    echo "      --command='tail -f ~/ihdm_jax_run/log'"
}

launch
if [[ -n ${WATCH_S:-} ]]; then
    echo "Watching $name every $WATCH_S s; it is launched again after a preemption (Ctrl-C" \
         "ends the watching, not the job)."
    while sleep "$WATCH_S"; do
        now=$(state)
        case $now in
            READY) ;;
            '' | PREEMPTED | TERMINATED) launch ;;
            *) echo "$(date '+%H:%M:%S') TPU VM $name is $now." ;;
        esac
    done
fi
