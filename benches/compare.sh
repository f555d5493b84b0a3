#!/usr/bin/env bash
# benches/compare.sh: gnomon against a bare UDP echo (same worker loop and I/O backend: the
# ceiling) and against Debian's chrony (the usual choice), measured in one run on loopback.
#
# The generator (gnomon-load) is pinned to GEN_CPU, each server to SRV_CPU, one at a time.
# For each server: a ramp finds the highest offered rate at < MAX_LOSS loss, then a fixed-rate
# run at half that rate gives p50/p99 RTT. Prints a table and the ratios gnomon/echo and
# gnomon/chrony; the JSON reports, .hgrm files and ramp plots (SVG) go to OUT.
#
# Usage: benches/compare.sh            (everything)
#   ONLY="chrony" benches/compare.sh   (a subset of: gnomon echo chrony)
#   IOS="mmsg uring"                   backends for gnomon and echo (default both)
#   GNOMON_ARGS="..."                  extra arguments for `gnomon serve`
#   QUICK=1                            short steps, for checking that the script works
#   FIXED_RATE=150000                  the fixed run at this rate instead of half the maximum
#   LOAD_ARGS="..."                    extra gnomon-load flags for gnomon's runs (--nts ...:
#                                      benches/nts-e2e.sh); the readiness probe stays plain
# Environment knobs below (PORT, CLIENTS, RAMP_START, ...) have defaults.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
GEN_CPU=${GEN_CPU:-0}
SRV_CPU=${SRV_CPU:-1}
ONLY=${ONLY:-"gnomon echo chrony"}
IOS=${IOS:-"mmsg uring"}
PORT=${PORT:-12400}
CLIENTS=${CLIENTS:-1000}
MAX_LOSS=${MAX_LOSS:-1%}
RAMP_START=${RAMP_START:-20k}
RAMP_FACTOR=${RAMP_FACTOR:-1.25}
STEP=${STEP:-2s}
REFINE=${REFINE:-3}
# A failing ramp step is measured again this often before it counts (gnomon-load --ramp-retries):
# on this shared VM a single burst of loss could end a ramp well below the rate a server holds.
RETRIES=${RETRIES:-1}
RAMP_BOUND=${RAMP_BOUND:-120s}
FIXED=${FIXED:-10s}
GNOMON_ARGS=${GNOMON_ARGS:-}
OUT=${OUT:-$ROOT/target/compare}
if [[ -n ${QUICK:-} ]]; then
    STEP=300ms
    REFINE=1
    FIXED=2s
    RAMP_FACTOR=1.6
fi

LOAD=$ROOT/target/release/gnomon-load
# GNOMON may point at another build (or a stand-in) to check the script.
GNOMON=${GNOMON:-$ROOT/target/release/gnomon}
TMP=$(mktemp -d)
. "$ROOT/benches/common.sh"
trap 'cleanup; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

mkdir -p "$OUT"
echo "== building release binaries" >&2
if wants gnomon || wants echo; then
    cargo build --release -p gnomon --bin gnomon >&2
fi
cargo build --release -p gnomon-load >&2

if wants chrony && ! command -v chronyd >/dev/null; then
    echo "== installing chrony" >&2
    apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chrony >&2
fi
CHRONYD=$(command -v chronyd || echo /usr/sbin/chronyd)

# The generator's common flags: pinned, many clients, no progress bar, JSON out.
LOAD_FLAGS=(--cpu "$GEN_CPU" --clients "$CLIENTS" --no-progress --json)


RESULTS=$TMP/results.tsv
: >"$RESULTS"

# measure NAME IO ECHOFLAG: ramp, then a fixed run at half the found rate.
measure() {
    local name=$1 io=$2 echo_flag=$3 tag="$1-$2"
    [[ $io == - ]] && tag=$name
    local extra=()
    # shellcheck disable=SC2206
    [[ $name == gnomon && -n ${LOAD_ARGS:-} ]] && extra=($LOAD_ARGS)
    echo "== $name ($io): ramp" >&2
    "$LOAD" "127.0.0.1:$PORT" $echo_flag "${LOAD_FLAGS[@]}" ${extra[@]+"${extra[@]}"} --ramp --ramp-start "$RAMP_START" \
        --ramp-factor "$RAMP_FACTOR" --step-duration "$STEP" --max-loss "$MAX_LOSS" --refine "$REFINE" --ramp-retries "$RETRIES" \
        --duration "$RAMP_BOUND" --max-packets 100M --plot "$OUT/$tag-ramp.svg" >"$OUT/$tag-ramp.json"
    local max ended half
    max=$(json "$OUT/$tag-ramp.json" "round(r['ramp']['max_rate'])")
    ended=$(json "$OUT/$tag-ramp.json" "r['ramp']['ended_by']")
    half=$((max / 2))
    # A common rate, when two runs' CPU per reply are to be compared: it depends on the rate
    # (batch sizes), and half of a generator-bound maximum differs from run to run.
    [[ -n ${FIXED_RATE:-} && $max -gt 0 ]] && half=$FIXED_RATE
    if [[ $half -lt 1 ]]; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$io" 0 - - - - "$ended" - - >>"$RESULTS"
        return
    fi
    echo "== $name ($io): fixed rate $half/s" >&2
    # Server-side view of the same window: CPU time the server process spends (all threads),
    # and for gnomon its own receive-timestamp-to-T3 histogram, emptied just before.
    if [[ $name == gnomon && -n $GNOMON_CONTROL ]]; then
        "$GNOMON" stats --reset --control "$GNOMON_CONTROL" >/dev/null 2>&1 || true
    fi
    local cpu0 cpu1
    cpu0=$(proc_ticks "$SERVER_PID")
    "$LOAD" "127.0.0.1:$PORT" $echo_flag "${LOAD_FLAGS[@]}" ${extra[@]+"${extra[@]}"} --rate "$half" --duration "$FIXED" \
        --max-packets 100M --hgrm "$OUT/$tag-half.hgrm" >"$OUT/$tag-half.json"
    cpu1=$(proc_ticks "$SERVER_PID")
    local srv_p99=-
    if [[ $name == gnomon && -n $GNOMON_CONTROL ]]; then
        "$GNOMON" stats --json --control "$GNOMON_CONTROL" >"$OUT/$tag-half-stats.json" 2>/dev/null &&
            srv_p99=$(json "$OUT/$tag-half-stats.json" "'%.1f' % (r['total']['latency']['p99_ns'] / 1000)")
    fi
    local us_per_reply
    us_per_reply=$(python3 -c "import json,sys; r=json.load(open('$OUT/$tag-half.json')); t=($cpu1-$cpu0)/$CLK_TCK; print('%.2f' % (t*1e6/max(r['replies'],1)))")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$io" "$max" \
        "$(json "$OUT/$tag-half.json" "'%.0f' % r['reply_rate']")" \
        "$(json "$OUT/$tag-half.json" "'%.1f' % r['rtt_us']['p50']")" \
        "$(json "$OUT/$tag-half.json" "'%.1f' % r['rtt_us']['p99']")" \
        "$(json "$OUT/$tag-half.json" "'%.3f' % r['loss_pct']")" "$ended" "$us_per_reply" "$srv_p99" >>"$RESULTS"
}

CLK_TCK=$(getconf CLK_TCK)
# The control socket of the gnomon under test, from its --config (for `gnomon stats`).
GNOMON_CONTROL=
if [[ $GNOMON_ARGS =~ --config[[:space:]]+([^[:space:]]+) ]]; then
    GNOMON_CONTROL=$(sed -n 's/^control_socket *= *"\(.*\)"/\1/p' "${BASH_REMATCH[1]}" | head -1)
fi

# run_server NAME IO ECHOFLAG CMD...: starts CMD pinned to SRV_CPU, measures, stops it.
run_server() {
    local name=$1 io=$2 echo_flag=$3
    shift 3
    echo "== starting $name ($io): $*" >&2
    taskset -c "$SRV_CPU" "$@" >"$OUT/$name-$io.log" 2>&1 &
    SERVER_PID=$!
    if answering "$PORT" $echo_flag; then
        measure "$name" "$io" "$echo_flag"
    else
        echo "!! $name ($io) did not answer on 127.0.0.1:$PORT; see $OUT/$name-$io.log" >&2
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$io" n/a - - - - "no-server" - - >>"$RESULTS"
    fi
    cleanup
    PORT=$((PORT + 1))
}

for io in $IOS; do
    if wants gnomon; then
        # shellcheck disable=SC2086
        run_server gnomon "$io" "" "$GNOMON" serve --listen "127.0.0.1:$PORT" --workers 1 --io "$io" $GNOMON_ARGS
    fi
    if wants echo; then
        run_server echo "$io" --echo "$GNOMON" bench-echo --listen "127.0.0.1:$PORT" --workers 1 --io "$io"
    fi
done
if wants chrony; then
    cat >"$TMP/chrony.conf" <<EOF
port $PORT
bindaddress 127.0.0.1
allow 127.0.0.0/8
local stratum 1
cmdport 0
pidfile $TMP/chronyd.pid
EOF
    cp "$TMP/chrony.conf" "$OUT/chrony.conf"
    # -x: never touch the system clock; -d: stay in the foreground (killable by pid).
    run_server chrony - "" "$CHRONYD" -x -d -f "$TMP/chrony.conf"
fi
cp "$RESULTS" "$OUT/results.tsv"

python3 - "$RESULTS" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print()
print(f"{'server':<8} {'io':<6} {'max rate/s (<1% loss)':>22} {'at half: replies/s':>19} {'p50 us':>8} {'p99 us':>8} {'loss %':>7} {'ended by':>9} {'srv us/reply':>12} {'srv p99 us':>10}")
for name, io, mx, rr, p50, p99, loss, ended, cpu, sp99 in rows:
    print(f"{name:<8} {io:<6} {mx:>22} {rr:>19} {p50:>8} {p99:>8} {loss:>7} {ended:>9} {cpu:>12} {sp99:>10}")
print("(p50/p99: round trip seen by the generator; srv us/reply: server CPU time per reply in the")
print(" half-rate window, all threads, so 1e6/that is what one core could answer; srv p99: gnomon's")
print(" own receive-timestamp-to-T3 histogram in that window; 'generator' = the generator, not the")
print(" server, stopped the ramp, so that max is a floor)")
def num(v):
    try:
        return float(v)
    except ValueError:
        return None
rate = {(r[0], r[1]): num(r[2]) for r in rows}
cost = {(r[0], r[1]): num(r[8]) for r in rows}
print()
chrony_cost = cost.get(("chrony", "-"))
for (name, io), v in sorted(cost.items()):
    if name != "gnomon" or not v:
        continue
    echo = cost.get(("echo", io))
    if echo:
        print(f"server CPU per reply, echo/gnomon ({io}): {echo / v:.3f}   (capacity ratio gnomon/echo)")
    if chrony_cost:
        print(f"server CPU per reply, chrony/gnomon ({io}): {chrony_cost / v:.3f}   (capacity ratio gnomon/chrony)")
chrony = rate.get(("chrony", "-"))
for (name, io), v in sorted(rate.items()):
    if name != "gnomon" or not v:
        continue
    echo = rate.get(("echo", io))
    if echo:
        print(f"gnomon/echo   ({io}): {v / echo:.3f}")
    if chrony:
        print(f"gnomon/chrony ({io}): {v / chrony:.3f}")
EOF
echo
echo "reports, .hgrm and ramp plots in $OUT"
