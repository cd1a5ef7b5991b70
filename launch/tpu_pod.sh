#!/usr/bin/env bash
# Trains on a Cloud TPU VM (a pod slice or a single host): creates it unless it exists, copies
# this repository to every worker and starts one training process per worker, detached from the
# ssh session (the processes find each other through jax.distributed, --multihost). launch/tpu_worker.sh is the
# worker side: it stops this job's processes of a previous launch, installs Python 3.12 with uv,
# the requirements and jax[tpu], and starts the job with its log under WORKDIR/logs/.
#
# Usage: launch/tpu_pod.sh TPU_NAME CONFIG WORKDIR [flags for ihdm_jax.main ...]
# WORKDIR must be seen by every worker: a gs://bucket/path, or a shared file system.
# Running the same command again finds the TPU VM (gcloud ... describe), stops the running job
# (it saves a checkpoint) and resumes it with the code and flags given now.
# Environment:
#   ZONE              (default us-central2-b)
#   ACCELERATOR_TYPE  (default v4-32: 4 hosts x 4 chips)
#   RUNTIME_VERSION   TPU VM image; default by generation: tpu-ubuntu2204-base (v4),
#                     v2-alpha-tpuv5-lite (v5e, v5litepod-*), v2-alpha-tpuv5 (v5p),
#                     v2-alpha-tpuv6e (v6e)
# Example:
#   ACCELERATOR_TYPE=v5litepod-16 ZONE=us-west4-a \
#       launch/tpu_pod.sh ihdm-cifar10 configs/cifar10.py gs://my-bucket/runs/cifar10
set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: $0 TPU_NAME CONFIG WORKDIR [flags for ihdm_jax.main ...]" >&2
    exit 2
fi
name=$1
config=$2
workdir=$3
shift 3
zone=${ZONE:-us-central2-b}
accelerator=${ACCELERATOR_TYPE:-v4-32}
case $accelerator in
    v4-*) default_runtime=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) default_runtime=v2-alpha-tpuv5 ;;
    v6e-*) default_runtime=v2-alpha-tpuv6e ;;
    *) default_runtime= ;;
esac
runtime=${RUNTIME_VERSION:-$default_runtime}
repo_dir="$(cd "$(dirname "$0")/.." && pwd)"

if gcloud compute tpus tpu-vm describe "$name" --zone="$zone" >/dev/null 2>&1; then
    echo "TPU VM $name exists in $zone: launching on it."
else
    if [[ -z $runtime ]]; then
        echo "Error: no default TPU runtime for ACCELERATOR_TYPE=$accelerator; set" \
             "RUNTIME_VERSION (see the Cloud TPU documentation's software versions)." >&2
        exit 1
    fi
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
        --accelerator-type="$accelerator" --version="$runtime"
fi

archive=$(mktemp -d)/ihdm_jax.tar.gz
trap 'rm -rf "$(dirname "$archive")"' EXIT
tar -czf "$archive" -C "$repo_dir" --exclude=.git --exclude=.venv --exclude=.cache \
    --exclude=runs --exclude='__pycache__' .
gcloud compute tpus tpu-vm scp "$archive" "$repo_dir/launch/tpu_worker.sh" "$name":~ \
    --zone="$zone" --worker=all

# Every argument quoted once for the worker's shell; no extra flags add nothing.
command="bash ~/tpu_worker.sh ~/ihdm_jax.tar.gz"
for arg in "$config" "$workdir" "$@"; do
    command+=" $(printf '%q' "$arg")"
done
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$command"
echo "Started on every worker of $name. Follow process 0's log with:"
echo "  gcloud compute tpus tpu-vm ssh $name --zone=$zone --worker=0 \\"
echo "      --command='tail -f ~/ihdm_jax_run/log'"
