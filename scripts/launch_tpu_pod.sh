#!/usr/bin/env bash
# Run one dreamr-jax training command on every worker of a Cloud TPU pod slice at once.
#
#   scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--repo DIR] [--setup] \
#       [--dry-run] -- python train/sapo.py --config configs/sapo_qwen3vl-2b_qwen3vl-32b.yaml steps=2000
#
# The command is any training job: `python train/sapo.py ...`, `python train/sft.py ...` (the
# launchers of `dreamr train sapo|sft`), or `dreamr train ...` where the workers have it on PATH.
# Every worker runs the same command (SPMD). DREAMR_MULTIHOST=1 makes the job call
# jax.distributed.initialize() (dreamr_jax.distributed), which finds the slice's coordinator and
# this worker's process id by itself; each process then trains on its own slice of every prompt
# batch, and the draft's update runs data parallel over the draft devices of all workers.
#   --repo DIR  the checkout on the workers (default: ~/dreamr-jax; it must exist there, with
#               the same files on every worker, e.g. cloned from the same commit)
#   --setup     first `pip install -e ".[tpu]"` in it on every worker
#   --dry-run   print the gcloud command instead of running it
# output_dir should be on storage every worker sees (a GCS-fuse mount or NFS): orbax writes
# one checkpoint from all processes, and each process saves its own data-iterator file.
# Worker logs: gcloud prefixes each line with the worker; they also go to
# /tmp/dreamr-train.log on each worker.
set -euo pipefail

tpu="" zone="" project="" repo="~/dreamr-jax" setup=0 dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --setup) setup=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (the training command goes after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "$tpu" || -z "$zone" || $# -eq 0 ]]; then
  echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--repo DIR] [--setup] [--dry-run] -- COMMAND ..." >&2
  exit 2
fi

printf -v train_cmd '%q ' "$@"
remote="set -eo pipefail; cd $repo"
if [[ $setup -eq 1 ]]; then
  remote+="; python -m pip install --quiet -e '.[tpu]'"
fi
remote+="; export DREAMR_MULTIHOST=1; $train_cmd 2>&1 | tee /tmp/dreamr-train.log"

args=(compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
[[ -n "$project" ]] && args+=(--project "$project")
if [[ $dry -eq 1 ]]; then
  printf 'gcloud'; printf ' %q' "${args[@]}"; printf '\n'
else
  exec gcloud "${args[@]}"
fi
