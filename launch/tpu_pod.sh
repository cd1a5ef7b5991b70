#!/usr/bin/env bash
# Creates a Cloud TPU VM (a pod slice or a single host), copies this repository to every worker,
# installs it and runs one training process per worker. The processes find each other through
# jax.distributed (--multihost).
#
# All workers must see the same WORKDIR: mount a Cloud Storage bucket with gcsfuse at the same
# path on every worker (done below when BUCKET is set) or use another shared file system.
#
# Usage: launch/tpu_pod.sh TPU_NAME CONFIG WORKDIR [flags for ihdm_jax.main ...]
# Environment:
#   ZONE              (default us-central2-b)
#   ACCELERATOR_TYPE  (default v4-32: 4 hosts x 4 chips)
#   RUNTIME_VERSION   TPU VM image (default tpu-ubuntu2204-base)
#   BUCKET            Cloud Storage bucket mounted at /mnt/$BUCKET on every worker (optional)
#   CREATE            set to 0 to reuse an existing TPU VM
# Example:
#   BUCKET=my-bucket launch/tpu_pod.sh ihdm configs/cifar10.py /mnt/my-bucket/runs/cifar10
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
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
repo_dir="$(cd "$(dirname "$0")/.." && pwd)"

if [[ ${CREATE:-1} != 0 ]]; then
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
        --accelerator-type="$accelerator" --version="$runtime"
fi

archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
tar -czf "$archive" -C "$repo_dir" --exclude=.git --exclude=.venv --exclude=.cache --exclude=runs \
    --exclude='__pycache__' .
gcloud compute tpus tpu-vm scp "$archive" "$name":ihdm_jax.tar.gz --zone="$zone" --worker=all

setup='rm -rf ~/ihdm_jax && mkdir ~/ihdm_jax && tar -xzf ~/ihdm_jax.tar.gz -C ~/ihdm_jax &&
       pip install -q -r ~/ihdm_jax/requirements.txt "jax[tpu]"'
if [[ -n ${BUCKET:-} ]]; then
    setup+=" && sudo mkdir -p /mnt/$BUCKET && sudo chown \$USER /mnt/$BUCKET &&
            (mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET)"
fi
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$setup"

printf -v flags ' %q' "$@"
run="cd ~/ihdm_jax && python3 -m ihdm_jax.main --multihost --config=$(printf %q "$config") \
     --workdir=$(printf %q "$workdir")$flags"
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$run"
