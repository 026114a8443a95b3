#!/usr/bin/env bash
# Runs N cooperating JAX processes on this machine, the way a pod or a cluster would run one per host.
#
#   launch/local_multiprocess.sh N [TRAIN_ARGS...]      # N × ${PYTHON:-python} -m atst_jax.train TRAIN_ARGS...
#   launch/local_multiprocess.sh N -- COMMAND [ARGS...] # N × COMMAND ARGS... (any program, run verbatim)
#
# Each process gets ATST_COORDINATOR=127.0.0.1:PORT, ATST_NUM_PROCESSES=N and ATST_PROCESS_ID=i, which
# atst_jax.distributed.initialize() turns into jax.distributed.initialize (gloo collectives on CPU).
# See `usage` below for the environment variables, the output format, exit status and signals.
set -euo pipefail

# `wait -n`, `{fd}` redirections and empty arrays under `set -u` need bash 4.4 (macOS ships 3.2).
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "local_multiprocess.sh: needs bash >= 4.4, this is $BASH_VERSION" >&2
    exit 2
fi

usage() {
    cat >&2 <<'EOF'
usage: launch/local_multiprocess.sh N [TRAIN_ARGS...]
       launch/local_multiprocess.sh N -- COMMAND [ARGS...]

Starts N processes (N a positive integer) on this host: `${PYTHON:-python} -m atst_jax.train TRAIN_ARGS...`,
or COMMAND verbatim after `--`. Each gets ATST_COORDINATOR=127.0.0.1:PORT, ATST_NUM_PROCESSES=N and
ATST_PROCESS_ID=0..N-1. Runs in the caller's working directory.

Environment:
  ATST_PORT=P         coordinator port (default: a free port picked at start-up)
  ATST_CPU_DEVICES=K  simulate K CPU devices per process: sets JAX_PLATFORMS=cpu and
                      XLA_FLAGS+=--xla_force_host_platform_device_count=K (replacing an earlier count)
  ATST_KILL_GRACE=S   seconds between SIGTERM and SIGKILL when the others are stopped after a failure (5)
  PYTHON              interpreter for the default command and the port probe (default: python)

Output: every line of process i is prefixed "[i] " (stdout stays stdout, stderr stays stderr); the
launcher's own messages go to stderr prefixed "[launch] ".
Exit status: 0 if every process exits 0, otherwise the first non-zero status seen; once one process
fails the others are stopped (SIGTERM to their process groups, SIGKILL after ATST_KILL_GRACE), since
they would otherwise wait forever at the next collective. 2 for a usage error.
Signals: SIGTERM, SIGINT or SIGHUP is forwarded to every process as SIGTERM (the trainer saves a
checkpoint and exits 0), then the launcher waits for them; a second signal kills them.
EOF
}

log() { printf '[launch] %s\n' "$*" >&2; }
die_usage() {
    log "error: $*"
    usage
    exit 2
}
is_posint() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# ---------------------------------------------------------------------------------------------------
# Arguments and environment
# ---------------------------------------------------------------------------------------------------
if [[ $# -lt 1 ]]; then
    die_usage "missing N (the number of processes)"
fi
case $1 in -h | --help)
    usage
    exit 0
    ;;
esac
is_posint "$1" || die_usage "N must be a positive integer, got '$1'"
num_procs=$1
shift

if [[ ${1:-} == "--" ]]; then
    shift
    [[ $# -gt 0 ]] || die_usage "no command after '--'"
    cmd=("$@")
else
    cmd=("${PYTHON:-python}" -m atst_jax.train "$@")
fi

grace=${ATST_KILL_GRACE:-5}
[[ $grace =~ ^[0-9]+$ ]] || die_usage "ATST_KILL_GRACE must be a whole number of seconds, got '$grace'"

free_port() {
    # Bind port 0 and report what the kernel picked. The port is released before JAX binds it again, a
    # tiny race that is harmless on a test machine; set ATST_PORT to pin it.
    local py out
    for py in "${PYTHON:-python}" python3 python; do
        command -v "$py" >/dev/null 2>&1 || continue
        out=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
            2>/dev/null) || continue
        if [[ $out =~ ^[0-9]+$ ]]; then
            printf '%s\n' "$out"
            return 0
        fi
    done
    return 1
}

if [[ -n ${ATST_PORT:-} ]]; then
    if ! [[ $ATST_PORT =~ ^[1-9][0-9]{0,4}$ ]] || ((ATST_PORT > 65535)); then
        die_usage "ATST_PORT must be a port number (1-65535), got '$ATST_PORT'"
    fi
    port=$ATST_PORT
else
    port=$(free_port) || {
        log "error: could not pick a free port (no python found); set ATST_PORT"
        exit 2
    }
fi

if [[ -n ${ATST_CPU_DEVICES:-} ]]; then
    is_posint "$ATST_CPU_DEVICES" || die_usage "ATST_CPU_DEVICES must be a positive integer, got '$ATST_CPU_DEVICES'"
    # Drop a device count the caller's XLA_FLAGS may already carry (e.g. pytest's 8), so that exactly one
    # count reaches XLA whatever its rule for repeated flags.
    kept=()
    read -ra words <<<"${XLA_FLAGS:-}"
    for w in "${words[@]}"; do
        [[ $w == --xla_force_host_platform_device_count=* ]] || kept+=("$w")
    done
    kept+=("--xla_force_host_platform_device_count=$ATST_CPU_DEVICES")
    export XLA_FLAGS="${kept[*]}"
    export JAX_PLATFORMS=cpu
fi

export ATST_COORDINATOR="127.0.0.1:$port"
export ATST_NUM_PROCESSES="$num_procs"
# Output goes through pipes; without this Python would block-buffer it and lines would arrive late.
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"

# ---------------------------------------------------------------------------------------------------
# State and clean-up
# ---------------------------------------------------------------------------------------------------
pids=()          # pids[i]: process i, leader of its own process group (see `set -m` below); "" once reaped
prefixer_pids=() # the readers that prefix each process's stdout / stderr
timer_fds=()     # pending delayed signals (start_timer)
first_rc=0
signals=0
fifo_dir=$(mktemp -d "${TMPDIR:-/tmp}/atst_launch.XXXXXX")

# start_timer SECONDS SIGNAL TARGET...: sends SIGNAL to the kill(1) targets after SECONDS, in the
# background, so the caller keeps reaping with `wait` meanwhile (polling `kill -0` would count a dead but
# not yet reaped process as alive). cancel_timers disarms the pending ones by writing a byte to them
# rather than killing them: a signal that lands in a just-forked subshell can run this script's traps.
timers=0
start_timer() {
    local secs=$1 sig=$2 fifo="$fifo_dir/timer.$timers" fd
    shift 2
    timers=$((timers + 1))
    mkfifo "$fifo"
    exec {fd}<>"$fifo" # opened here, before the fork, so a cancel can never be lost
    (
        # `read` is a builtin: the timer leaves no `sleep` child behind. A byte means "cancelled".
        if ! read -r -n 1 -t "$secs" _ <&"$fd"; then
            kill "-$sig" -- "$@" 2>/dev/null || true
        fi
    ) >/dev/null 2>&1 & # not holding our stdout/stderr, which a caller may be reading to EOF
    timer_fds+=("$fd")
}
cancel_timers() {
    local fd
    for fd in "${timer_fds[@]}"; do
        printf x >&"$fd"
        exec {fd}>&-
    done
    timer_fds=()
}

# Stops the process group of every process still running: SIGTERM now, SIGKILL after `grace` seconds
# (a process blocked in a collective never reaches the step boundary where the trainer acts on SIGTERM).
# Whole groups, so helpers a process started (e.g. Grain workers) go too. The prefixers are not in those
# groups (they live in the launcher's) and end by themselves at EOF once the writers are gone.
stop_all() {
    local groups=() pid
    for pid in "${pids[@]}"; do
        if [[ -n $pid ]]; then groups+=("-$pid"); fi
    done
    if ((${#groups[@]})); then
        kill -TERM -- "${groups[@]}" 2>/dev/null || true
        start_timer "$grace" KILL "${groups[@]}"
    fi
}

# Only each process itself, not its group: the trainer finishes its step and saves a checkpoint, which may
# need its helpers alive. No time limit: a large checkpoint can take minutes.
forward_term() {
    local pid
    for pid in "${pids[@]}"; do
        if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
}

# Trap handlers run in the middle of `wait -n`, so they use no command substitution: bash would then
# race its own wait for the substitution's child ("wait_for: No record of process ...").
# shellcheck disable=SC2329  # called from the traps below, which shellcheck does not follow
on_signal() {
    signals=$((signals + 1))
    local pid
    if ((signals == 1)); then
        log "received SIG$1: sending SIGTERM to the processes and waiting for them (signal again to kill)"
        forward_term
    else
        log "received SIG$1 again: killing the processes"
        for pid in "${pids[@]}"; do
            if [[ -n $pid ]]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
        done
    fi
}

# Gives the prefixers up to 5 s to print what is left in their pipes, so the launcher exits after the
# output. They end at EOF, i.e. once every writer has closed the pipe; a stray grandchild that keeps it
# open must not hang the launcher, hence the limit.
drain_prefixers() {
    start_timer 5 KILL "${prefixer_pids[@]}"
    wait "${prefixer_pids[@]}" 2>/dev/null || true
    cancel_timers
}

# shellcheck disable=SC2329  # called from the EXIT trap, which shellcheck does not follow
cleanup() {
    local pid
    # Normally nothing is left; after an unexpected error in this script, leave no orphans behind.
    for pid in "${pids[@]}"; do
        if [[ -n $pid ]]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    done
    cancel_timers
    rm -rf -- "$fifo_dir"
}
trap cleanup EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# ---------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------
prefix_lines() { # prefix_lines TAG: copies stdin to stdout, "[TAG] " before each line, line by line
    # Ignore the signals meant for the processes: a reader that died first would turn their last words
    # (the checkpoint messages after SIGTERM) into SIGPIPE.
    trap '' INT TERM HUP
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        printf '[%s] %s\n' "$1" "$line"
    done
}

log "starting $num_procs processes, coordinator $ATST_COORDINATOR: ${cmd[*]}"

# The readers first, in the launcher's own process group (so `stty tostop` terminals never stop them).
for ((i = 0; i < num_procs; i++)); do
    mkfifo "$fifo_dir/$i.out" "$fifo_dir/$i.err"
    prefix_lines "$i" <"$fifo_dir/$i.out" &
    prefixer_pids+=($!)
    prefix_lines "$i" <"$fifo_dir/$i.err" >&2 &
    prefixer_pids+=($!)
done

# Job control: each process becomes the leader of its own process group, so that (1) stop_all can take
# down a process with all its helpers, and (2) a Ctrl-C on the terminal reaches only this launcher,
# which turns it into the SIGTERM the trainer handles, instead of a raw SIGINT to every process.
set -m
for ((i = 0; i < num_procs; i++)); do
    # stdin from /dev/null: background process groups reading the terminal would be stopped (SIGTTIN).
    ATST_PROCESS_ID=$i "${cmd[@]}" </dev/null >"$fifo_dir/$i.out" 2>"$fifo_dir/$i.err" &
    pids[i]=$!
done
# Job control off again: the groups stay, and bash stops printing "[1]+ Terminated ..." job notices.
set +m
# A signal that came while the processes were being started reached only those started before it.
if ((signals == 1)); then forward_term; fi

# ---------------------------------------------------------------------------------------------------
# Wait: `wait -n` wakes on any child's exit (or a trapped signal); then reap whichever processes ended.
# ---------------------------------------------------------------------------------------------------
remaining=$num_procs
while ((remaining > 0)); do
    wait -n 2>/dev/null || true
    for i in "${!pids[@]}"; do
        pid=${pids[i]}
        [[ -n $pid ]] || continue
        kill -0 "$pid" 2>/dev/null && continue
        rc=0
        wait "$pid" 2>/dev/null || rc=$? # bash keeps the status of a reaped child for `wait PID`
        pids[i]=""
        remaining=$((remaining - 1))
        if ((rc != 0)); then
            log "process $i exited with status $rc"
            if ((first_rc == 0)); then
                first_rc=$rc
                if ((remaining > 0 && signals < 2)); then
                    log "stopping the other processes (SIGKILL after ${grace} s)"
                    stop_all
                fi
            fi
        fi
    done
done
cancel_timers

drain_prefixers
exit "$first_rc"
