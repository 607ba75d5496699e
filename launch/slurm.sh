#!/usr/bin/env bash
# Submits launch/slurm_gpu.sbatch with the arguments checked first: a missing flag fails here,
# not after hours in the queue.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PROG=launch/slurm.sh
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
  cat <<'EOF'
usage: launch/slurm.sh submit [flags] -- LLADAV_TRAIN_ARGS

Queues lladav-train on GPU nodes, one process per GPU (launch/slurm_gpu.sbatch). The
lladav-train arguments must include --config and --workdir (on a filesystem all nodes share).

flags:
  --nodes N            nodes (default 1)
  --gpus-per-node G    GPUs, and so processes, per node (default 8)
  --time T             time limit, e.g. 2-00:00:00 (default: the partition's)
  --partition P        --account A        --qos Q        --job-name J (default lladav)
  --dry-run            print every command, prefixed "+ ", and run nothing (or DRY_RUN=1)
  -h, --help           this help

The log goes to launch/logs/JOBNAME-JOBID.log.
EOF
}

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
case $1 in
  -h | --help) usage; exit 0 ;;
  submit) shift ;;
  *) die "unknown command '$1': the command is submit" ;;
esac

NODES=1 GPUS=8 TIME='' PARTITION='' ACCOUNT='' QOS='' JOB=lladav
TRAIN_ARGS=()
while (($#)); do
  case $1 in
    --) shift; TRAIN_ARGS=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;  # --flag=value as --flag value
    --nodes) NODES=$(value "$@"); shift 2 ;;
    --gpus-per-node) GPUS=$(value "$@"); shift 2 ;;
    --time) TIME=$(value "$@"); shift 2 ;;
    --partition) PARTITION=$(value "$@"); shift 2 ;;
    --account) ACCOUNT=$(value "$@"); shift 2 ;;
    --qos) QOS=$(value "$@"); shift 2 ;;
    --job-name) JOB=$(value "$@"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --config | --workdir | --config.*) die "unknown flag $1: lladav-train's arguments go after --" ;;
    *) die "unknown flag $1" ;;
  esac
done

[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, not '$NODES'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, not '$GPUS'"
has_flag() {  # has_flag --flag: --flag VALUE or --flag=VALUE among the training arguments
  local a
  for a in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do [[ $a == "$1" || $a == "$1"=* ]] && return 0; done
  return 1
}
has_flag --config || die "--config is required after -- (e.g. -- --config configs/stage2a.py)"
has_flag --workdir || die "--workdir is required after -- (on a filesystem every node shares)"

opts=(--nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS" --job-name="$JOB"
  --chdir="$REPO" --output="$REPO/launch/logs/%x-%j.log" --export="ALL,LLADAV_REPO=$REPO")
[[ -z $TIME ]] || opts+=(--time="$TIME")
[[ -z $PARTITION ]] || opts+=(--partition="$PARTITION")
[[ -z $ACCOUNT ]] || opts+=(--account="$ACCOUNT")
[[ -z $QOS ]] || opts+=(--qos="$QOS")

run mkdir -p "$REPO/launch/logs"  # SLURM does not create the log's directory
run sbatch "${opts[@]}" "$REPO/launch/slurm_gpu.sbatch" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
