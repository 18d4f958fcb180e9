#!/usr/bin/env bash
# Start N processes of one command on this machine as one multihost JAX run.
#
#   launch/local.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [--cpu] -- COMMAND...
#
# Process i gets EMIT_COORDINATOR=127.0.0.1:PORT, EMIT_NUM_PROCESSES=N and EMIT_PROCESS_ID=i,
# which emit_jax.parallel.initialize turns into jax.distributed.initialize(...). With --cpu each
# process also gets JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D
# (D simulated CPU devices; collectives go through gloo); without it, CUDA_VISIBLE_DEVICES is
# process i's slice of D GPUs (GPUs i*D .. i*D+D-1 of those visible to this script).
#
# Process i writes stdout and stderr to ${LOG_DIR:-launch_logs}/proc_i.log; process 0's log is
# also shown here. When one process fails the others are stopped (SIGTERM, then SIGKILL after
# KILL_GRACE seconds, default 30); Ctrl-C, SIGTERM, SIGHUP or SIGUSR1 stops them all (a second
# signal is passed on as a second SIGTERM). The exit status is the first non-zero
# status of a process (0 when all succeed).
#
# Example: two processes with four simulated CPU devices each (a mesh over 8 devices):
#   launch/local.sh -n 2 -d 4 --cpu -- python -m emit_jax.train --config configs/grpo.py \
#       --workdir runs/mh
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/local.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [--cpu] -- COMMAND...

Runs NUM_PROCESSES copies of COMMAND on this machine as one multihost JAX run.

  -n, --num-processes N   processes to start (default 2)
  -d, --devices D         devices per process (default 1): simulated CPU devices with --cpu,
                          else GPUs (process i gets GPUs i*D .. i*D+D-1 of CUDA_VISIBLE_DEVICES,
                          or of 0,1,2,... when it is unset)
  -p, --port PORT         coordinator port on 127.0.0.1 (default: a free port)
      --cpu               JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D
  -h, --help              this text

Each process gets EMIT_COORDINATOR=127.0.0.1:PORT, EMIT_NUM_PROCESSES=N, EMIT_PROCESS_ID=i.
Logs: ${LOG_DIR:-launch_logs}/proc_i.log (process 0's also on the terminal; an earlier run's
are kept as proc_i.prev.log). If one process fails the others are stopped; the exit status is
the first non-zero one (0 if all succeed).
Environment: LOG_DIR (log folder), KILL_GRACE (seconds between SIGTERM and SIGKILL, default 30).

example:
  launch/local.sh -n 2 -d 4 --cpu -- python -m emit_jax.train --config configs/grpo.py --workdir runs/mh
EOF
}

die() {
    echo "local.sh: $*" >&2
    echo "(launch/local.sh -h for usage)" >&2
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

num=2
devices=1
port=""
cpu=0
while (($# > 0)); do
    case "$1" in
        -n | --num-processes) (($# >= 2)) || die "$1 needs a value"; num=$2; shift 2 ;;
        -d | --devices) (($# >= 2)) || die "$1 needs a value"; devices=$2; shift 2 ;;
        -p | --port) (($# >= 2)) || die "$1 needs a value"; port=$2; shift 2 ;;
        --cpu) cpu=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument '$1' (the command goes after --)" ;;
    esac
done
(($# > 0)) || die "no command given (put it after --)"
if ! is_uint "$num" || ((num < 1)); then die "-n wants a positive integer, got '$num'"; fi
if ! is_uint "$devices" || ((devices < 1)); then
    die "-d wants a positive integer, got '$devices'"
fi
kill_grace=${KILL_GRACE:-30}
is_uint "$kill_grace" || die "KILL_GRACE wants a whole number of seconds, got '$kill_grace'"

if [[ -z $port ]]; then
    py=$(command -v python3 || command -v python || true)
    [[ -n $py ]] || die "no python to pick a free port with; pass -p PORT"
    port=$("$py" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()')
fi
if ! is_uint "$port" || ((port < 1 || port > 65535)); then
    die "-p wants a port number, got '$port'"
fi

gpus=()
if ((cpu == 0)); then
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
    else
        for ((g = 0; g < num * devices; g++)); do gpus+=("$g"); done
    fi
    ((${#gpus[@]} >= num * devices)) ||
        die "$num processes x $devices GPUs need $((num * devices)) GPUs, but CUDA_VISIBLE_DEVICES lists ${#gpus[@]}"
fi

log_dir=${LOG_DIR:-launch_logs}
# one line naming LOG_DIR (before: mkdir's own "File exists" for a file there)
mkdir -p -- "$log_dir" 2>/dev/null ||
    die "LOG_DIR $log_dir: cannot make the log folder there (a file in its place, or not writable)"
[[ -w $log_dir ]] || die "LOG_DIR $log_dir: the log folder is not writable"
coordinator="127.0.0.1:$port"

pids=()       # process i's pid
finished=()   # process i's exit status once reaped
tail_pid=""

alive() { [[ -z ${finished[$1]:-} ]] && kill -0 "${pids[$1]}" 2>/dev/null; }

hurry=0       # a second signal arrived while the processes were being stopped

# SIGTERM to every running process, then SIGKILL to those still there after KILL_GRACE seconds
# (a process blocked in a collective may not get to run its SIGTERM handler). A second signal to
# local.sh meanwhile is passed on as a second SIGTERM (the trainer's "stop at once").
stop_children() {
    local i t any passed=0
    for i in "${!pids[@]}"; do
        if alive "$i"; then kill -TERM "${pids[$i]}" 2>/dev/null || true; fi
    done
    for ((t = 0; t < kill_grace * 10; t++)); do
        any=0
        for i in "${!pids[@]}"; do
            if alive "$i"; then any=1; fi
        done
        ((any)) || break
        if ((hurry && !passed)); then
            passed=1
            for i in "${!pids[@]}"; do
                if alive "$i"; then kill -TERM "${pids[$i]}" 2>/dev/null || true; fi
            done
        fi
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if alive "$i"; then
            echo "local.sh: process $i did not stop after ${kill_grace}s; SIGKILL" >&2
            kill -KILL "${pids[$i]}" 2>/dev/null || true
            # reap it here, quietly (bash would print a "Killed" job notice), keeping its status
            local status=0
            wait "${pids[$i]}" 2>/dev/null || status=$?
            finished[i]=$status
        fi
    done
}

stop_tail() {
    if [[ -n $tail_pid ]]; then
        kill "$tail_pid" 2>/dev/null || true
        wait "$tail_pid" 2>/dev/null || true
        tail_pid=""
    fi
}

# shellcheck disable=SC2329  # called by the traps below
on_exit() {
    trap - EXIT INT TERM HUP USR1
    stop_children
    stop_tail
}
# shellcheck disable=SC2329
on_second_signal() {
    if ((!hurry)); then
        hurry=1
        echo "local.sh: $1 again; telling the processes to stop at once" >&2
    fi
}
# shellcheck disable=SC2329
on_signal() {
    # a second signal while the processes stop: passed on, and the summary still comes (before,
    # local.sh ended at once without it, its processes still running; 28th probe P3)
    trap 'on_second_signal interrupted' INT
    trap 'on_second_signal terminated' TERM
    trap 'on_second_signal "hung up"' HUP
    trap 'on_second_signal SIGUSR1' USR1
    trap - EXIT
    echo "local.sh: $1; stopping all $num processes" >&2
    stop_children
    stop_tail
    local i status summary=""
    for i in "${!pids[@]}"; do
        if [[ -z ${finished[i]:-} ]]; then
            status=0
            wait "${pids[i]}" 2>/dev/null || status=$?
            finished[i]=$status
        fi
        summary+=" $i:${finished[i]}"
    done
    trap - INT TERM HUP USR1
    echo "local.sh: stopped (exit statuses$summary)" >&2
    exit "$2"
}
trap on_exit EXIT
trap 'on_signal interrupted 130' INT
trap 'on_signal terminated 143' TERM
# a closed terminal, and SLURM's pre-emption warning (sbatch --signal=B:USR1): the processes
# are stopped as for SIGTERM, with the same lines (before: no line; 28th probe P2)
trap 'on_signal "hung up" 129' HUP
trap 'on_signal "SIGUSR1 (a pre-emption warning)" 138' USR1

kind="GPUs (of $(IFS=,; echo "${gpus[*]:0:num*devices}"))"
if ((cpu)); then kind="simulated CPU devices"; fi
echo "local.sh: $num processes x $devices $kind, coordinator $coordinator, logs in $log_dir/proc_*.log" >&2

# an earlier run's logs (the one that says why it failed) are kept one run back, as
# proc_i.prev.log, not emptied (twenty-seventh probe LA10: a file of that name was truncated)
kept=()
for ((i = 0; i < num; i++)); do
    log="$log_dir/proc_$i.log"
    if [[ -s $log || -L $log ]]; then
        mv -f -- "$log" "$log_dir/proc_$i.prev.log" && kept+=("proc_$i.log")
    fi
done
if ((${#kept[@]})); then
    echo "local.sh: the earlier ${kept[*]} in $log_dir kept as proc_*.prev.log" >&2
fi
for ((i = 0; i < num; i++)); do
    log="$log_dir/proc_$i.log"
    : >"$log"
    (
        export EMIT_COORDINATOR="$coordinator" EMIT_NUM_PROCESSES="$num" EMIT_PROCESS_ID="$i"
        if ((cpu)); then
            export JAX_PLATFORMS=cpu
            export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
        else
            slice=("${gpus[@]:i*devices:devices}")
            CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${slice[*]}")
            export CUDA_VISIBLE_DEVICES
        fi
        exec "$@" </dev/null >>"$log" 2>&1
    ) &
    pids[i]=$!
done

# process 0 on the terminal; GNU tail stops by itself (after a last read) when process 0 ends
if tail --version >/dev/null 2>&1; then
    tail -n +1 -s 0.2 -f --pid="${pids[0]}" "$log_dir/proc_0.log" &
else
    tail -n +1 -f "$log_dir/proc_0.log" &
fi
tail_pid=$!

first_status=0
first_failed=""
failed=()     # processes found failed before one was named the first failure
looked=0      # looks taken since the first of them

# Name the first failure among ``failed``: a process killed by a signal (status > 128) before
# one that ended because it lost that peer (status 2), which can end, or be found, a moment
# sooner (before: a kill -9 of process 1 was reported as "first failure: process 0, status 2",
# pointing at the wrong log; 28th probe P1).
name_first_failure() {
    local i pick=""
    for i in "${failed[@]}"; do
        if [[ -z $pick ]] || ((finished[i] > 128 && finished[pick] <= 128)); then pick=$i; fi
    done
    first_status=${finished[pick]}
    first_failed=$pick
    echo "local.sh: process $first_failed exited with status $first_status; stopping the others" >&2
    stop_children
}

while :; do
    remaining=0
    for ((i = 0; i < num; i++)); do
        [[ -z ${finished[i]:-} ]] || continue
        if kill -0 "${pids[i]}" 2>/dev/null; then
            remaining=$((remaining + 1))
            continue
        fi
        status=0
        wait "${pids[i]}" 2>/dev/null || status=$?
        finished[i]=$status
        if ((status != 0)); then failed+=("$i"); fi
    done
    if ((first_status == 0 && ${#failed[@]} > 0)); then
        # one look more (0.2 s) for a peer killed by a signal, unless one is among them
        signalled=0
        for i in "${failed[@]}"; do ((finished[i] <= 128)) || signalled=1; done
        if ((signalled || looked >= 1 || remaining == 0)); then
            name_first_failure
        else
            looked=$((looked + 1))
        fi
    fi
    ((remaining > 0)) || break
    sleep 0.2
done

# let tail print process 0's last lines before the summary
for ((t = 0; t < 30; t++)); do
    kill -0 "$tail_pid" 2>/dev/null || break
    sleep 0.1
done
stop_tail
trap - EXIT INT TERM HUP USR1

summary=""
for ((i = 0; i < num; i++)); do summary+=" $i:${finished[i]}"; done
if ((first_status == 130 || first_status == 143)); then
    # an interrupted process (a signal it handled): a stop, not a failure (29th probe U1)
    echo "local.sh: stopped (process $first_failed was interrupted first, status $first_status); exit statuses$summary; see $log_dir/proc_$first_failed.log" >&2
elif ((first_status != 0)); then
    echo "local.sh: failed (first failure: process $first_failed, status $first_status); exit statuses$summary; see $log_dir/proc_$first_failed.log" >&2
else
    echo "local.sh: all $num processes finished (exit statuses$summary)" >&2
fi
exit "$first_status"
