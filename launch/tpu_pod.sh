#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM slice (single host or pod): create it, set up every worker, train in the
# background on all workers, follow the log, stop (checkpoint) and delete. See `usage`.
#
# On TPU no launcher variables are needed: atst_jax.distributed sees the multi-host TPU environment and
# calls jax.distributed.initialize(), which finds the coordinator and process ids itself. Every worker runs
# the same command; each reads its share of the data and Orbax writes one checkpoint to the gs:// WORKDIR
# (pod workers share no filesystem, hence gs://). A rerun of `train` with the same WORKDIR resumes from
# the newest checkpoint, which is how a preempted (spot) slice continues: `delete`, then `up` again.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/tpu_pod.sh [OPTIONS] COMMAND [-- TRAIN_ARGS...]

Commands:
  create   create the TPU VM (or a queued resource with --queued) and wait until it is READY / ACTIVE
  setup    copy this checkout (or clone --repo) to every worker; make a Python 3.12 venv with
           requirements.txt, this package and jax[tpu] (same version as requirements.txt)
  train    start training on all workers in the background (nohup, survives the ssh session); refuses if
           a trainer is already running. Resumes from the newest checkpoint in WORKDIR.
  up       create + setup + train
  logs     follow the training log of worker LOG_WORKER (default 0; "all" for every worker)
  status   state of the TPU and of the trainer on every worker
  stop     SIGTERM the trainers (they finish the step, save a checkpoint, exit 0) and wait for them
  delete   delete the TPU (with --queued: the queued resource and its TPU)

Options (each also read from the environment variable in brackets):
  --project P        [PROJECT]          Google Cloud project (default: gcloud's configured project)
  --zone Z           [ZONE]             zone, e.g. us-east5-a (required)
  --name N           [TPU_NAME]         TPU (and queued resource) name (default: atst-$USER)
  --accelerator A    [ACCELERATOR]      e.g. v5p-64, v5litepod-16, v6e-8, v4-32 (required by create)
  --runtime V        [RUNTIME_VERSION]  TPU software version (default chosen from the accelerator)
  --queued           [QUEUED=1]         create through a queued resource (waits for capacity)
  --spot             [SPOT=1]           spot capacity: cheaper, can be preempted (--best-effort: same)
  --workdir gs://B/R [WORKDIR]          run directory, must be a gs:// path (required by train)
  --config SPEC      [CONFIG]           default configs/atst_frame.py:base
  --repo URL         [REPO_URL]         git-clone URL on the workers instead of copying this checkout
  --ref REF          [REPO_REF]         branch or tag to clone (default: the remote's default branch)
  --python VER       [PYTHON_VERSION]   Python for the workers' venv (default 3.12, installed by uv)
  --dry-run          [DRY_RUN=1]        print the gcloud commands instead of running them
  -h, --help
More environment: EXTRA_ARGS (trainer flags, whitespace-separated; TRAIN_ARGS after `--` are added),
REMOTE_DIR (checkout on the workers, relative to home; default atst_jax), LOG_WORKER, SSH_FLAGS (extra
flags for gcloud ssh/scp, e.g. --tunnel-through-iap), POLL_SECONDS (state polling, default 30).

Example:
  ZONE=us-east5-a ACCELERATOR=v5p-64 launch/tpu_pod.sh up --queued --spot \
      --workdir gs://my-bucket/atst_base -- --config.train.global_batch=1024
  launch/tpu_pod.sh logs --zone us-east5-a
EOF
}

log() { printf '[tpu_pod] %s\n' "$*" >&2; }
die() { # die STATUS MESSAGE
    log "error: $2"
    exit "$1"
}

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-atst-${USER:-user}}
ACCELERATOR=${ACCELERATOR:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
QUEUED=${QUEUED:-0}
SPOT=${SPOT:-0}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/atst_frame.py:base}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
DRY_RUN=${DRY_RUN:-0}
REMOTE_DIR=${REMOTE_DIR:-atst_jax}
LOG_WORKER=${LOG_WORKER:-0}
POLL_SECONDS=${POLL_SECONDS:-30}
# Arrays that may be empty are expanded as ${a[@]+"${a[@]}"}: bash before 4.4 (macOS ships 3.2) calls an
# empty "${a[@]}" unbound under set -u.
read -ra ssh_flags <<<"${SSH_FLAGS:-}"
read -ra train_args <<<"${EXTRA_ARGS:-}"

# ---------------------------------------------------------------------------------------------------
# Arguments: options anywhere, one command, trainer arguments after `--`
# ---------------------------------------------------------------------------------------------------
command=""
while (($#)); do
    arg=$1
    # --opt=value → --opt value
    if [[ $arg == --*=* ]]; then
        set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
        arg=$1
    fi
    case $arg in
    -h | --help)
        usage
        exit 0
        ;;
    --project | --zone | --name | --accelerator | --runtime | --workdir | --config | --repo | --ref | --python)
        (($# >= 2)) || die 2 "$arg needs a value"
        case $arg in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --name) TPU_NAME=$2 ;;
        --accelerator) ACCELERATOR=$2 ;;
        --runtime) RUNTIME_VERSION=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --config) CONFIG=$2 ;;
        --repo) REPO_URL=$2 ;;
        --ref) REPO_REF=$2 ;;
        --python) PYTHON_VERSION=$2 ;;
        esac
        shift 2
        ;;
    --queued) QUEUED=1 && shift ;;
    --spot | --best-effort) SPOT=1 && shift ;; # best-effort queued resources were superseded by spot
    --dry-run) DRY_RUN=1 && shift ;;
    --)
        shift
        train_args+=("$@")
        break
        ;;
    -*)
        usage >&2
        die 2 "unknown option $arg"
        ;;
    *)
        [[ -z $command ]] || die 2 "one command at a time (got '$command' and '$arg')"
        command=$arg
        shift
        ;;
    esac
done

case $command in
create | setup | train | up | logs | status | stop | delete) ;;
"")
    usage >&2
    die 2 "missing COMMAND"
    ;;
*)
    usage >&2
    die 2 "unknown command '$command'"
    ;;
esac

[[ -n $ZONE ]] || die 2 "set the zone: --zone Z or ZONE=Z"
[[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die 2 "TPU name '$TPU_NAME' must be lower-case letters, digits and dashes, starting with a letter"
[[ $POLL_SECONDS =~ ^[1-9][0-9]*$ ]] || die 2 "POLL_SECONDS must be a positive integer"

check_workdir() {
    [[ $WORKDIR =~ ^gs://[^/]+ ]] ||
        die 2 "WORKDIR must be a gs:// path (pod workers share no disk), got '${WORKDIR:-<unset>}'"
    [[ -n $CONFIG ]] || die 2 "CONFIG is empty"
}
# Validate before anything is created or copied: a typo should not cost a slice start-up.
case $command in train | up) check_workdir ;; esac

default_runtime() {
    case $ACCELERATOR in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
    esac
}
if [[ $command == create || $command == up ]]; then
    [[ -n $ACCELERATOR ]] || die 2 "set the accelerator: --accelerator v5p-64 or ACCELERATOR=v5p-64"
    if [[ -z $RUNTIME_VERSION ]]; then
        RUNTIME_VERSION=$(default_runtime) ||
            die 2 "no default runtime for accelerator '$ACCELERATOR': set --runtime / RUNTIME_VERSION"
    fi
fi

if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die 1 "gcloud not found: install the Google Cloud CLI (or use --dry-run to see the commands)"
fi

# ---------------------------------------------------------------------------------------------------
# gcloud helpers
# ---------------------------------------------------------------------------------------------------
where=(--zone "$ZONE")
if [[ -n $PROJECT ]]; then where+=(--project "$PROJECT"); fi

gc() { # gc ARGS...: gcloud ARGS..., or print it with --dry-run
    if [[ $DRY_RUN == 1 ]]; then
        printf '+ gcloud'
        printf ' %q' "$@"
        printf '\n'
    else
        gcloud "$@"
    fi
}

on_workers() { # on_workers WORKER SCRIPT: runs the bash SCRIPT on worker WORKER ("all" = every worker)
    local remote
    if [[ $DRY_RUN == 1 ]]; then
        printf '+ gcloud compute tpus tpu-vm ssh %q' "$TPU_NAME"
        printf ' %q' "${where[@]}" --worker="$1" ${ssh_flags[@]+"${ssh_flags[@]}"}
        printf ' --command "bash -c SCRIPT", SCRIPT:\n%s\n+ (end of SCRIPT)\n' "$2"
        return 0
    fi
    # The script travels as one %q-quoted word for the remote login shell, which hands it to `bash -c`:
    # no quoting of its own contents needed, whatever they hold.
    printf -v remote 'bash -c %q' "$2"
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="$1" ${ssh_flags[@]+"${ssh_flags[@]}"} --command "$remote"
}

tpu_state() {
    if [[ $QUEUED == 1 ]]; then
        gcloud compute tpus queued-resources describe "$TPU_NAME" "${where[@]}" --format='value(state.state)'
    else
        gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" --format='value(state)'
    fi
}

wait_ready() {
    local state last="" unknown=0
    if [[ $DRY_RUN == 1 ]]; then
        log "(dry run: would poll the state every ${POLL_SECONDS} s until READY / ACTIVE)"
        return 0
    fi
    while :; do
        if state=$(tpu_state); then unknown=0; else
            state="UNKNOWN (describe failed)"
            unknown=$((unknown + 1))
            ((unknown < 10)) || die 1 "cannot read the state of $TPU_NAME (10 tries)"
        fi
        if [[ $state != "$last" ]]; then log "$TPU_NAME: $state"; fi
        last=$state
        case $state in
        READY | ACTIVE) return 0 ;;
        FAILED | SUSPENDING | SUSPENDED | PREEMPTED | TERMINATED | DELETING)
            die 1 "$TPU_NAME is $state; delete it and create it again"
            ;;
        esac
        sleep "$POLL_SECONDS"
    done
}

# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------
cmd_create() {
    local capacity=() kind="on-demand"
    if [[ $SPOT == 1 ]]; then capacity=(--spot) kind="spot"; fi
    log "creating $TPU_NAME: $ACCELERATOR ($kind), runtime $RUNTIME_VERSION$([[ $QUEUED == 1 ]] && echo ', queued' || true)"
    if [[ $QUEUED == 1 ]]; then
        # The queued resource and its TPU node share the name, so every other command finds both.
        gc compute tpus queued-resources create "$TPU_NAME" "${where[@]}" --node-id "$TPU_NAME" \
            --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"}
    else
        gc compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
            --accelerator-type "$ACCELERATOR" --version "$RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"}
    fi
    wait_ready
}

cmd_setup() {
    local repo_root tarball fetch
    if [[ -n $REPO_URL ]]; then
        printf -v fetch 'if [ -d %q/.git ]; then git -C %q pull --ff-only; else git clone %s %q %q; fi' \
            "$REMOTE_DIR" "$REMOTE_DIR" "${REPO_REF:+--branch $(printf %q "$REPO_REF")}" "$REPO_URL" "$REMOTE_DIR"
    else
        # Ship this checkout as it is (uncommitted changes included), without the local venv, git
        # history, runs and caches.
        repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
        tarball=$(mktemp "${TMPDIR:-/tmp}/atst_src.XXXXXX")
        # shellcheck disable=SC2064  # expand now: the path is fixed, and the trap must see it after return
        trap "rm -f '$tarball'" EXIT
        tar -czf "$tarball" -C "$repo_root" --exclude=./.venv --exclude=./.git --exclude=./runs \
            --exclude='__pycache__' --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache .
        log "copying $repo_root ($(du -h "$tarball" | cut -f1)) to every worker"
        gc compute tpus tpu-vm scp "$tarball" "$TPU_NAME:atst_src.tgz" "${where[@]}" --worker=all \
            ${ssh_flags[@]+"${ssh_flags[@]}"}
        printf -v fetch 'mkdir -p %q && tar -xzf atst_src.tgz -C %q && rm -f atst_src.tgz' "$REMOTE_DIR" "$REMOTE_DIR"
    fi
    local script
    # uv provides a Python matching requires-python (the TPU images ship Ubuntu's 3.10) and installs
    # fast; jax[tpu] at the version requirements.txt pins brings the matching libtpu from PyPI; gcsfs
    # lets etils.epath (Orbax's paths) reach gs:// (tensorstore, for the arrays, needs nothing more).
    IFS= read -r -d '' script <<EOF || true
set -euo pipefail
cd ~
$fetch
cd $(printf %q "$REMOTE_DIR")
export PATH="\$HOME/.local/bin:\$PATH"
command -v uv >/dev/null || python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh
[ -x .venv/bin/python ] || uv venv -q --python $(printf %q "$PYTHON_VERSION") .venv
jax_version=\$(sed -n 's/^jax==//p' requirements.txt)
uv pip install -q --python .venv/bin/python -r requirements.txt -e . "jax[tpu]==\$jax_version" gcsfs
echo "\$(hostname): \$(.venv/bin/python -c 'import jax; print("jax", jax.__version__)') ready"
EOF
    log "installing on every worker (a few minutes)"
    on_workers all "$script"
}

cmd_train() {
    local trainer script
    # ATST_DISTRIBUTED=auto: every worker calls jax.distributed.initialize() with no arguments, which finds
    # the other hosts of the slice through the TPU metadata (single-host slices work the same way).
    printf -v trainer '%q ' env ATST_DISTRIBUTED=auto .venv/bin/python -m atst_jax.train --config "$CONFIG" --workdir "$WORKDIR" \
        ${train_args[@]+"${train_args[@]}"}
    # setsid + nohup: the trainer outlives the ssh session (no SIGHUP when it closes); the pid file is
    # written by the process that then becomes the trainer (exec), so `stop` signals the right one.
    IFS= read -r -d '' script <<EOF || true
set -euo pipefail
cd ~/$(printf %q "$REMOTE_DIR")
if [ -f train.pid ] && kill -0 "\$(cat train.pid)" 2>/dev/null; then
    echo "\$(hostname): a trainer is already running (pid \$(cat train.pid)); use stop first" >&2
    exit 1
fi
echo "=== \$(date -u '+%F %T') UTC: $trainer" >>train.log
nohup setsid bash -c 'echo \$\$ >train.pid; exec "\$@"' trainer $trainer >>train.log 2>&1 </dev/null &
echo "\$(hostname): started, log ~/$(printf %q "$REMOTE_DIR")/train.log"
EOF
    log "starting the trainer on every worker: workdir $WORKDIR"
    on_workers all "$script"
    log "follow it with: launch/tpu_pod.sh logs --zone $ZONE --name $TPU_NAME"
}

cmd_logs() {
    on_workers "$LOG_WORKER" "tail -n 200 -F ~/$(printf %q "$REMOTE_DIR")/train.log"
}

cmd_status() {
    if [[ $DRY_RUN == 1 ]]; then
        log "(dry run: would describe $TPU_NAME)"
    else
        log "$TPU_NAME: $(tpu_state || echo 'not found')"
    fi
    local script
    IFS= read -r -d '' script <<EOF || true
cd ~/$(printf %q "$REMOTE_DIR") 2>/dev/null || { echo "\$(hostname): not set up"; exit 0; }
if [ -f train.pid ] && kill -0 "\$(cat train.pid)" 2>/dev/null; then
    echo "\$(hostname): training (pid \$(cat train.pid)); last line: \$(tail -n 1 train.log)"
else
    echo "\$(hostname): no trainer running; last line: \$(tail -n 1 train.log 2>/dev/null)"
fi
EOF
    on_workers all "$script"
}

cmd_stop() {
    # All workers at once: the checkpoint of a multi-host run is written by every process together.
    local script
    IFS= read -r -d '' script <<EOF || true
cd ~/$(printf %q "$REMOTE_DIR") 2>/dev/null || exit 0
if [ -f train.pid ] && pid=\$(cat train.pid) && kill -0 "\$pid" 2>/dev/null; then
    kill -TERM "\$pid"
    echo "\$(hostname): SIGTERM sent, waiting for the checkpoint"
    while kill -0 "\$pid" 2>/dev/null; do sleep 5; done
    echo "\$(hostname): stopped: \$(tail -n 1 train.log)"
else
    echo "\$(hostname): no trainer running"
fi
EOF
    on_workers all "$script"
}

cmd_delete() {
    if [[ $QUEUED == 1 ]]; then
        gc compute tpus queued-resources delete "$TPU_NAME" "${where[@]}" --force --quiet
    else
        gc compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
    fi
}

case $command in
create) cmd_create ;;
setup) cmd_setup ;;
train) cmd_train ;;
up)
    cmd_create
    cmd_setup
    cmd_train
    ;;
logs) cmd_logs ;;
status) cmd_status ;;
stop) cmd_stop ;;
delete) cmd_delete ;;
esac
