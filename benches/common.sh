# benches/common.sh: what the bench scripts share (sourced, not run): stopping only what they
# started, by PID, picking the servers a run measures from ONLY, reading gnomon-load's reports,
# a process's CPU time, and waiting for a server on loopback to answer.

SERVER_PID=

# stop_pids PID...: each of these processes that still runs is stopped and waited for.
stop_pids() {
    local pid
    for pid in "$@"; do
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
}

# The server under measurement, stopped (scripts with more processes define their own).
cleanup() {
    stop_pids "$SERVER_PID"
    SERVER_PID=
}

# wants NAME: whether ONLY (a space-separated list) names it.
wants() { [[ " $ONLY " == *" $1 "* ]]; }

# json FILE EXPR: evaluates a Python expression on the parsed report `r`.
json() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print($2)" "$1"; }

# proc_ticks PID: the CPU time of a process so far (utime + stime, all threads, exited ones
# included), in clock ticks; 0 once it has gone.
proc_ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}

# answering TARGET [FLAGS...]: waits until the server at TARGET (a port on 127.0.0.1, or
# HOST:PORT) answers gnomon-load ($LOAD, run under $LOAD_IN if set, such as `ip netns exec NS`,
# with FLAGS, such as --echo), 50 probes of about a second each at most; false at once if
# SERVER_PID has died.
answering() {
    local target=$1 probe i
    shift
    [[ $target == *:* ]] || target=127.0.0.1:$target
    probe=$(mktemp)
    for i in $(seq 1 50); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        # shellcheck disable=SC2086
        if ${LOAD_IN:-} "$LOAD" "$target" "$@" --rate 200 --max-packets 20 --duration 1s --drain 100ms \
            --no-progress --json >"$probe" 2>/dev/null &&
            [[ $(json "$probe" "r['replies']") -gt 0 ]]; then
            rm -f "$probe"
            return 0
        fi
        sleep 0.2
    done
    rm -f "$probe"
    return 1
}
