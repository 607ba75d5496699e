#!/usr/bin/env bash
# lladav-train on a Cloud TPU VM slice, or on a queued resource of one or several slices.
# Every worker gets the same code, environment and command (jax.distributed finds its peers
# from the TPU metadata). The workdir is a bucket URL (gs://BUCKET/runs/stage2a), one place
# that every host sees, as Orbax's multi-host checkpoints need: the trainer writes it directly.
# gcsfuse, optional (setup --bucket), mounts the bucket for data that needs a file system
# (ArrayRecord shards).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=launch/tpu.sh
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu.sh COMMAND [flags] [-- lladav-train overrides]

commands:
  create   create the slice: a TPU VM, or a queued resource (--queued, --slices N),
           waiting until it is ACTIVE
  setup    on every worker: copy or clone the code, install ".[tpu]", mount the bucket
           with gcsfuse if --bucket is given
  train    start lladav-train on every worker in the background (rerun to resume)
  logs     follow the training log of worker 0 (--worker all: of every worker)
  stop     SIGTERM the training on every worker (it checkpoints, then exits)
  status   describe the TPU VM or queued resource
  delete   delete the TPU VM or queued resource and its nodes
  all      create, setup, train

flags:
  --name NAME             TPU VM or queued resource name (always required)
  --zone ZONE             e.g. us-east5-a (always required)
  --project PROJECT       default: gcloud's configured project
  --accelerator TYPE      v5p-N, v5litepod-N, v6e-N, v4-N, v3-N or v2-N, e.g. v5p-64 (create)
  --runtime-version V     TPU software version (default per generation, e.g. v5p:
                          v2-alpha-tpuv5)
  --queued                a queued resource: waits for capacity instead of failing
  --slices N              N slices over the data-centre network (multislice): a queued
                          resource with --node-count N; train adds --config.mesh.slices=N
                          --config.mesh.data=N (override data after --)
  --spot | --reserved     spot capacity, or the project's reservation (create)
  --source PATH|GIT_URL   the code: a local checkout, copied (default: this one), or a git
                          URL, cloned on every worker
  --ref REF               branch, tag or commit to check out (with a git URL)
  --bucket BUCKET         GCS bucket of the run: setup mounts it with gcsfuse on every worker
                          (for data that needs a file system); train's default --workdir is
                          gs://BUCKET/runs/CONFIG (CONFIG: the config file's name, no .py)
  --mount DIR             where the bucket is mounted (default /mnt/gcs)
  --python VERSION        Python of the workers' virtual environment (default 3.12)
  --config FILE           training config, relative to the repository (train)
  --workdir URL|DIR       training workdir: a bucket URL, gs://BUCKET/runs/NAME, or a
                          directory under --mount (train)
  --env KEY=VALUE         more environment for lladav-train (repeatable)
  --worker W              logs: a worker index, or all (default 0)
  --dry-run               print every command, prefixed "+ ", and run nothing (or DRY_RUN=1)
  -h, --help              this help

Give status, stop and delete the same --queued / --slices as create.
EOF
}

NAME='' ZONE='' PROJECT='' ACCEL='' RUNTIME='' QUEUED=0 SLICES=1 SPOT=0 RESERVED=0
SOURCE=$(dirname "$HERE") REF='' BUCKET='' MOUNT=/mnt/gcs PYTHON_VERSION=3.12
CONFIG='' WORKDIR='' WORKER=0
ENVS=() TRAIN_ARGS=()

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
CMD=$1
shift
case $CMD in
  -h | --help) usage; exit 0 ;;
  create | setup | train | logs | stop | status | delete | all) ;;
  *) die "unknown command '$CMD': choose create, setup, train, logs, stop, status, delete or all" ;;
esac

while (($#)); do
  case $1 in
    --) shift; TRAIN_ARGS=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;  # --flag=value as --flag value
    --name) NAME=$(value "$@"); shift 2 ;;
    --zone) ZONE=$(value "$@"); shift 2 ;;
    --project) PROJECT=$(value "$@"); shift 2 ;;
    --accelerator) ACCEL=$(value "$@"); shift 2 ;;
    --runtime-version) RUNTIME=$(value "$@"); shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --slices) SLICES=$(value "$@"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --source) SOURCE=$(value "$@"); shift 2 ;;
    --ref) REF=$(value "$@"); shift 2 ;;
    --bucket) BUCKET=$(value "$@"); shift 2 ;;
    --mount) MOUNT=$(value "$@"); shift 2 ;;
    --python) PYTHON_VERSION=$(value "$@"); shift 2 ;;
    --config) CONFIG=$(value "$@"); shift 2 ;;
    --workdir) WORKDIR=$(value "$@"); shift 2 ;;
    --env) ENVS+=("$(value "$@")"); shift 2 ;;
    --worker) WORKER=$(value "$@"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --config.*) die "unknown flag $1: lladav-train overrides go after --" ;;
    *) die "unknown flag $1" ;;
  esac
done

# --- checks: every usage error before anything runs ----------------------------------------

require() {  # require VAR --flag
  [[ -n ${!1} ]] || die "$2 is required for '$CMD'"
}
require NAME --name
require ZONE --zone
[[ $SLICES =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, not '$SLICES'"
((SLICES == 1)) || QUEUED=1  # only a queued resource provisions several slices together
((SPOT + RESERVED < 2)) || die "--spot and --reserved exclude each other"
[[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker index or all, not '$WORKER'"

if [[ $CMD == create || $CMD == all ]]; then
  require ACCEL --accelerator
  [[ $ACCEL =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$ ]] ||
    die "unknown accelerator type '$ACCEL': expected v5p-N, v5litepod-N, v6e-N, v4-N, v3-N or v2-N (e.g. v5p-64)"
  if [[ -z $RUNTIME ]]; then
    case ${BASH_REMATCH[1]} in  # the base image of each generation (Cloud TPU docs)
      v2 | v3 | v4) RUNTIME=tpu-ubuntu2204-base ;;
      v5litepod) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p) RUNTIME=v2-alpha-tpuv5 ;;
      v6e) RUNTIME=v2-alpha-tpuv6e ;;
    esac
  fi
fi

BUCKET=${BUCKET#gs://}
BUCKET=${BUCKET%/}
[[ $BUCKET != */* ]] || die "--bucket takes a bucket name, not a path: '$BUCKET'"
GIT_SOURCE=0
if [[ $CMD == setup || $CMD == all ]]; then
  if [[ $SOURCE =~ ^(https?|ssh|git)://|^[^/]+@[^/:]+:|\.git$ ]]; then
    GIT_SOURCE=1
  elif [[ -f $SOURCE/setup.py ]]; then
    SOURCE=$(cd "$SOURCE" && pwd)
    [[ -z $REF ]] || die "--ref needs a git URL as --source"
  else
    die "--source '$SOURCE' is neither a git URL nor a checkout (no setup.py)"
  fi
fi

[[ $MOUNT == /* ]] || die "--mount must be an absolute path, not '$MOUNT'"
MOUNT=${MOUNT%/}
if [[ $CMD == train || $CMD == all ]]; then
  require CONFIG --config
  if [[ -z $WORKDIR && -n $BUCKET ]]; then
    WORKDIR=gs://$BUCKET/runs/$(basename "$CONFIG" .py)
  fi
  [[ -n $WORKDIR ]] || die "--workdir is required for '$CMD' (or --bucket: gs://BUCKET/runs/CONFIG)"
  WORKDIR=${WORKDIR%/}
  # A workdir elsewhere would be each host's own disk: checkpoints would be split across
  # hosts, and lost with the VM on preemption.
  [[ $WORKDIR =~ ^gs://[^/]+/. || $WORKDIR == "$MOUNT"/?* ]] ||
    die "--workdir '$WORKDIR' must be a bucket URL (gs://BUCKET/runs/stage2a) or lie under the shared mount $MOUNT"
fi
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, not '$kv'"
done

# --- gcloud: where commands go -------------------------------------------------------------

LOC=(--zone="$ZONE")
[[ -z $PROJECT ]] || LOC+=(--project="$PROJECT")
if ((SLICES > 1)); then
  # Several slices are one queued resource's nodes: address every node and worker at once.
  SSH=(gcloud compute tpus queued-resources ssh "$NAME" "${LOC[@]}")
  SCP=(gcloud compute tpus queued-resources scp)
  ALL=(--node=all --worker=all)
else
  # One slice: the TPU VM, named NAME also when a queued resource made it (--node-id).
  SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}")
  SCP=(gcloud compute tpus tpu-vm scp)
  ALL=(--worker=all)
fi

on_all() {  # one shell command line, run on every worker of every slice
  run "${SSH[@]}" "${ALL[@]}" --command "$1"
}

# Remote paths, in the worker's home (the same on every worker); $HOME expands there.
# shellcheck disable=SC2016
R_CODE='"$HOME/lladav-jax"' R_VENV='"$HOME/lladav-venv"' R_UV='"$HOME/.local/bin/uv"' \
  R_LOG='"$HOME/lladav-train.log"' R_PID='"$HOME/lladav-train.pid"'
TARBALL=lladav-src.tar.gz
MOUNT_Q=$(printf %q "$MOUNT")
# Two trainers cannot share the TPU, and replacing the code under a running one breaks it.
IF_RUNNING="if [ -f $R_PID ] && kill -0 \"\$(cat $R_PID)\" 2>/dev/null; then"
NOT_RUNNING="$IF_RUNNING echo \"lladav-train is running on \$(hostname): launch/tpu.sh stop first\" >&2; exit 1; fi"

join() {  # join SEP WORDS...
  local sep=$1 out=$2
  shift 2
  local w
  for w in "$@"; do out+="$sep$w"; done
  printf '%s' "$out"
}

# --- commands -------------------------------------------------------------------------------

do_create() {
  local spot=()
  ((SPOT == 0)) || spot=(--spot)
  ((RESERVED == 0)) || spot=(--reserved)
  if ((QUEUED == 0)); then
    # Synchronous: gcloud returns once the VMs are READY.
    run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" \
      --version="$RUNTIME" ${spot[@]+"${spot[@]}"}
    return
  fi
  local nodes=(--node-id="$NAME")
  ((SLICES == 1)) || nodes=(--node-count="$SLICES" --node-prefix="$NAME")
  run gcloud compute tpus queued-resources create "$NAME" "${LOC[@]}" \
    --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" "${nodes[@]}" \
    ${spot[@]+"${spot[@]}"}
  # The request is queued; the nodes exist once it is ACTIVE (minutes, or hours for capacity).
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}"
    --format='value(state.state)')
  show "${describe[@]}"
  [[ $DRY_RUN == 0 ]] || return 0
  echo "waiting for $NAME to become ACTIVE (Ctrl-C is safe: the request stays queued)" >&2
  local state
  while :; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDED) fail "queued resource $NAME is $state (launch/tpu.sh status ...)" ;;
    esac
    sleep 30
  done
}

do_setup() {
  local steps=("set -eo pipefail" "$NOT_RUNNING")
  if [[ -n $BUCKET ]]; then
    # gcsfuse comes from Google's apt repository, not Ubuntu's. Fresh VMs run unattended
    # upgrades at boot: wait for the dpkg lock instead of failing.
    local apt='sudo apt-get -o DPkg::Lock::Timeout=600 -q'
    steps+=("if ! command -v gcsfuse >/dev/null; then curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; $apt update; $apt install -y gcsfuse; fi")
    # Mounted as the user (root could not enter it later). --rename-dir-limit: a workdir
    # under the mount gets checkpoints that Orbax writes to a temporary directory and renames.
    steps+=("if ! mountpoint -q $MOUNT_Q; then sudo mkdir -p $MOUNT_Q; sudo chown \"\$(id -u):\$(id -g)\" $MOUNT_Q; gcsfuse --implicit-dirs --rename-dir-limit=200000 $(printf %q "$BUCKET") $MOUNT_Q; fi")
  fi
  if ((GIT_SOURCE)); then
    steps+=("rm -rf $R_CODE" "git clone -q $(printf %q "$SOURCE") $R_CODE")
    [[ -z $REF ]] || steps+=("git -C $R_CODE checkout -q $(printf %q "$REF")")
  else
    # Uncommitted changes travel too: the workers run what is checked out here.
    local tarball=${TMPDIR:-/tmp}/lladav-src-$NAME.tar.gz
    run tar -C "$SOURCE" --exclude-vcs --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.venv --exclude=.pytest_cache --exclude=.ruff_cache -czf "$tarball" .
    run "${SCP[@]}" "$tarball" "$NAME:$TARBALL" "${LOC[@]}" "${ALL[@]}"
    steps+=("rm -rf $R_CODE" "mkdir -p $R_CODE" "tar -xzf \"\$HOME/$TARBALL\" -C $R_CODE")
  fi
  # JAX needs a newer Python than the TPU images ship: uv fetches one into a virtualenv.
  steps+=("if [ ! -x $R_UV ]; then curl -fsSL https://astral.sh/uv/install.sh -o /tmp/uv-install.sh; UV_INSTALL_DIR=\"\$HOME/.local/bin\" UV_NO_MODIFY_PATH=1 sh /tmp/uv-install.sh; fi")
  steps+=("if [ ! -x $R_VENV/bin/python ]; then $R_UV venv -q --python $(printf %q "$PYTHON_VERSION") $R_VENV; fi")
  steps+=("$R_UV pip install -q --python $R_VENV/bin/python -e \"\$HOME/lladav-jax[tpu]\"")
  steps+=("echo \"\$(hostname): ready\"")
  on_all "$(join '; ' "${steps[@]}")"
}

do_train() {
  local args=(--config "$CONFIG" --workdir "$WORKDIR")
  # The data axis spans the slices; data=N is the smallest valid choice (fsdp stays in a slice).
  ((SLICES == 1)) || args+=("--config.mesh.slices=$SLICES" "--config.mesh.data=$SLICES")
  args+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  # Unbuffered, so the log shows progress as it happens; the compilation cache sits in the
  # workdir's bucket (JAX writes gs:// itself), so a resumed run (a new VM after preemption)
  # skips recompiling.
  # LLADAV_DISTRIBUTED: gcloud's TPU VMs do not set the variables jax.distributed's
  # auto-detection is keyed on here (those are GKE's); this tells the trainer to start it.
  local cache=$MOUNT/jax-cache
  [[ $WORKDIR != gs://* ]] || cache=$(cut -d/ -f1-3 <<<"$WORKDIR")/jax-cache
  local env=(PYTHONUNBUFFERED=1 LLADAV_DISTRIBUTED=1 "JAX_COMPILATION_CACHE_DIR=$cache")
  env+=(${ENVS[@]+"${ENVS[@]}"})
  local quoted_env quoted_args
  quoted_env=$(printf '%q ' "${env[@]}")
  quoted_args=$(printf ' %q' "${args[@]}")
  local steps=("set -eo pipefail" "$NOT_RUNNING")
  # The mount must be there when the command names a path under it (workdir, data, cache).
  if [[ " ${env[*]} ${args[*]} " == *[=\ ]"$MOUNT"/* ]]; then
    steps+=("if ! mountpoint -q $MOUNT_Q; then echo \"$MOUNT_Q is not mounted on \$(hostname): run launch/tpu.sh setup --bucket BUCKET\" >&2; exit 1; fi")
  fi
  steps+=("cd $R_CODE")
  # nohup, all three streams redirected and `&`: ssh returns while the training goes on.
  steps+=("${quoted_env}nohup $R_VENV/bin/lladav-train$quoted_args >> $R_LOG 2>&1 < /dev/null & echo \$! > $R_PID")
  steps+=("echo \"\$(hostname): lladav-train started, pid \$(cat $R_PID)\"")
  on_all "$(join '; ' "${steps[@]}")"
}

do_logs() {
  local target=(--worker="$WORKER")
  ((SLICES == 1)) || target=(--node=0 --worker="$WORKER")
  if [[ $WORKER == all ]]; then
    target=("${ALL[@]}")
    # Lines of many workers interleave: label each with its host.
    run "${SSH[@]}" "${target[@]}" --command "tail -n 20 -F $R_LOG | sed -u \"s/^/[\$(hostname)] /\""
  else
    run "${SSH[@]}" "${target[@]}" --command "tail -n 100 -F $R_LOG"
  fi
}

do_stop() {
  on_all "$IF_RUNNING kill -TERM \"\$(cat $R_PID)\"; echo \"\$(hostname): SIGTERM sent\"; else echo \"\$(hostname): not running\"; fi"
}

do_status() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}"
  fi
}

do_delete() {
  if ((QUEUED)); then
    # --force deletes the nodes with the request.
    run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

case $CMD in
  all)
    do_create
    do_setup
    do_train
    echo "follow the log: $PROG logs --name $NAME --zone $ZONE${PROJECT:+ --project $PROJECT} --slices $SLICES" >&2
    ;;
  *) "do_$CMD" ;;
esac
