# benches/common.sh: what the bench scripts share (sourced, not run): stopping only what they
# started, by PID, and picking the servers a run measures from ONLY.

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
