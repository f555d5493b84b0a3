#!/usr/bin/env bash
# benches/xdp.sh: gnomon on AF_XDP against gnomon on io_uring and on mmsg and against chronyd,
# in one run, on the same veth pair between two network namespaces and with the same generator.
#
# Each server runs alone, pinned to SRV_CPU; gnomon-load runs in the other namespace pinned to
# GEN_CPU. On veth the receiver's kernel work runs on the sender's core by default, so both veth
# ends get a NAPI (GRO on) that runs as a kernel thread (threaded NAPI), each pinned to its own
# side's CPU, and TSO is off on both ends so that veth_xmit uses the peer's NAPI rather than
# the sender's backlog: the server core then carries everything the server costs, kernel
# included, and nothing of the generator's. For
# each server: a ramp finds the highest rate with loss under MAX_LOSS (the loss-free rate), then
# a run at the one fixed RATE measures the busy time of the server's core (from /proc/stat:
# wall time minus cpuSRV_CPU's idle and iowait, which NO_HZ measures exactly) per reply. Prints a table with the ratios
# against chrony. Needs root (namespaces, XDP). Addresses: 198.18.0.0/15 only (RFC 2544), on
# interfaces that exist only inside the namespaces, deleted at exit.
#
# Usage: sudo benches/xdp.sh
#   ONLY="xdp chrony"      a subset of: xdp uring mmsg chrony
#   RATE=100000            the fixed rate (requests/s) at which CPU per reply is compared
#   QUICK=1                short steps, for checking that the script works
#   PROFILE=debug          use target/debug binaries (checking the script without a release build)
#   COALESCE_US=50         interrupt coalescing on the server's veth end, for every server alike
#                          (napi_defer_hard_irqs + gro_flush_timeout: a NAPI run that found
#                          little waits this long for more instead of re-arming); default 0 (off):
#                          it delays T2 by up to that much, as rx-usecs does on a real NIC
#   T2=1                   instead of the cost: how late each server's T2 is against the request
#                          leaving the client's veth end (benches/t2-offset.py, T2_COUNT requests
#                          one at a time, T2_GAP_MS apart); gnomon's T3 - T2 histogram beside it
#   INJECT=xdp             the requests reach the server's veth end as XDP frames instead of
#                          skbs, for every server alike: the generator sends through a second
#                          veth pair in its namespace whose far end redirects each frame
#                          (examples/xdp_redirect.rs, bpf_redirect) into the server pair.
#                          A frame that arrives as an skb costs the server's NAPI a copy into
#                          a page before any XDP program sees it (veth_convert_skb_to_xdp_buff:
#                          a fifth of AF_XDP's core time); a real NIC has no such copy
#   GEN_XDP=1              gnomon-load sends and receives through AF_XDP on its veth end
#                          (--xdp): about half its cost per request through its kernel, so
#                          that the server, not the generator, ends the ramp
#   RAMP=0                 skip the ramp (only the fixed-rate run; the table's max rate is n/a)
#   REPEAT=5               every server that many times, in turn (xdp, uring, mmsg, chrony, xdp,
#                          ...), and a second table: each server's median core us/reply and the
#                          median of the ratios to chrony within a round. One round's figures
#                          move by up to 40% on a shared machine; the files in OUT are the last
#                          round's
#   PERF=1                 also `perf record -g -C SRV_CPU` over the fixed-rate run, into
#                          OUT/NAME.perf.data, with a `perf report` by symbol in OUT/NAME.perf.txt
#                          (perf's own sampling costs a little of the core: compare runs alike)
# Knobs below (MAX_LOSS, PORTS, RAMP_START, ...) have defaults. Run it on a quiet machine: the
# server core's busy time counts everything that runs there.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
GEN_CPU=${GEN_CPU:-0}
SRV_CPU=${SRV_CPU:-1}
ONLY=${ONLY:-"xdp uring mmsg chrony"}
RATE=${RATE:-100000}
FIXED=${FIXED:-10s}
MAX_LOSS=${MAX_LOSS:-0.1%}
PORTS=${PORTS:-64}
RAMP_START=${RAMP_START:-20k}
RAMP_FACTOR=${RAMP_FACTOR:-1.25}
STEP=${STEP:-2s}
REFINE=${REFINE:-3}
# A failing ramp step is measured again this often before it counts (one burst of loss on this
# shared VM ended ramps at a third of the rate a server held at the fixed rate).
RETRIES=${RETRIES:-1}
RAMP_BOUND=${RAMP_BOUND:-120s}
PROFILE=${PROFILE:-release}
RAMP=${RAMP:-1}
REPEAT=${REPEAT:-1}
REP=1
PERF=${PERF:-}
COALESCE_US=${COALESCE_US:-0}
INJECT=${INJECT:-}
T2=${T2:-}
T2_COUNT=${T2_COUNT:-2000}
T2_GAP_MS=${T2_GAP_MS:-1}
OUT=${OUT:-$ROOT/target/xdp-bench}
if [[ -n ${QUICK:-} ]]; then
    STEP=300ms
    REFINE=0
    FIXED=1s
    RAMP_FACTOR=2
    RAMP_BOUND=2s
fi
if [[ -n $PERF && ${FIXED%s} -lt 3 ]]; then
    echo "PERF=1 needs FIXED of at least 3s (the profile skips the first and last second)" >&2
    exit 1
fi
if [[ $(id -u) != 0 ]]; then
    echo "benches/xdp.sh needs root (network namespaces, XDP)" >&2
    exit 1
fi

. "$ROOT/benches/common.sh"
. "$ROOT/benches/veth.sh"
TMP=$(mktemp -d)
trap 'cleanup; veth_down; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

mkdir -p "$OUT"
echo "== building $PROFILE binaries" >&2
if [[ $PROFILE == release ]]; then
    cargo build --release -p gnomon --bin gnomon --example xdp_redirect >&2
    cargo build --release -p gnomon-load >&2
else
    cargo build -p gnomon --bin gnomon --example xdp_redirect >&2
    cargo build -p gnomon-load >&2
fi
LOAD=$ROOT/target/$PROFILE/gnomon-load
GNOMON=$ROOT/target/$PROFILE/gnomon
CHRONYD=$(command -v chronyd || echo /usr/sbin/chronyd)

veth_up

mapfile -t LOAD_FLAGS < <(gen_flags)
LOAD_FLAGS+=(--clients 1 --ports "$PORTS" --cpu "$GEN_CPU" --no-progress --json)
LOAD_IN="ip netns exec $NS_C"
# shellcheck disable=SC2086
load() { $LOAD_IN "$LOAD" "$SERVER:123" "${LOAD_FLAGS[@]}" "$@"; }

# SRV_CPU's clock ticks so far: "idle busy", idle with iowait, busy the other columns. With
# NO_HZ the kernel measures an idle CPU's idle time exactly, but (TICK_CPU_ACCOUNTING, the
# default) charges user, system and softirq time a whole tick at a time to whatever runs when
# the tick fires, which misreads a core that wakes for short bursts: here the same server's runs
# differed by 40% that way while their profiles did not. The cost is taken as wall time minus
# idle; the tick-sampled figure is logged beside it.
cpu_ticks() {
    awk -v c="cpu$SRV_CPU" '$1 == c {print $5 + $6, $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}
CLK_TCK=$(getconf CLK_TCK)


RESULTS=$TMP/results.tsv
: >"$RESULTS"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$REP" "$@" >>"$RESULTS"; }

# measure NAME: the ramp, then the fixed rate with the server core's busy time.
measure() {
    local name=$1
    local max=n/a ended=- busy t0 t1 i0 i1 s0 s1 perf_pid= perf_pids= p
    if [[ $RAMP != 0 ]]; then
        echo "== $name: ramp (loss under $MAX_LOSS)" >&2
        load --ramp --ramp-start "$RAMP_START" --ramp-factor "$RAMP_FACTOR" --step-duration "$STEP" \
            --max-loss "$MAX_LOSS" --refine "$REFINE" --ramp-retries "$RETRIES" --duration "$RAMP_BOUND" --max-packets 100M \
            >"$OUT/$name-ramp.json"
        max=$(json "$OUT/$name-ramp.json" "round(r['ramp']['max_rate'])")
        ended=$(json "$OUT/$name-ramp.json" "r['ramp']['ended_by']")
    fi
    echo "== $name: fixed rate $RATE/s for $FIXED" >&2
    if [[ -n $PERF ]]; then
        # Starts after the generator's first second and ends before it does (steady state only);
        # perf itself runs on the generator's core so that its writing is not counted as ours.
        (sleep 1 && exec taskset -c "$GEN_CPU" perf record -q -g -C "$SRV_CPU" -o "$OUT/$name.perf.data" -- \
            sleep "$(($(sed 's/s$//' <<<"$FIXED") - 2))") >/dev/null 2>&1 &
        perf_pid=$!
        # How often the server wakes and kicks: its syscalls and context switches.
        (sleep 1 && exec taskset -c "$GEN_CPU" perf stat -x, -o "$OUT/$name.perf-stat.txt" \
            -e syscalls:sys_enter_poll,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom \
            -e syscalls:sys_enter_recvmmsg,syscalls:sys_enter_sendmmsg,syscalls:sys_enter_io_uring_enter \
            -e syscalls:sys_enter_epoll_wait,syscalls:sys_enter_select,syscalls:sys_enter_pselect6 \
            -e sched:sched_switch -p "$SERVER_PID" -- sleep "$(($(sed 's/s$//' <<<"$FIXED") - 2))") \
            >/dev/null 2>&1 &
        perf_pids="$perf_pid $!"
    fi
    read -r i0 s0 < <(cpu_ticks)
    t0=$(date +%s.%N)
    load --rate "$RATE" --duration "$FIXED" --max-packets 100M >"$OUT/$name-fixed.json"
    read -r i1 s1 < <(cpu_ticks)
    t1=$(date +%s.%N)
    # Busy seconds: wall time minus idle (see cpu_ticks).
    busy=$(python3 -c "print(($t1 - $t0) - ($i1 - $i0) / $CLK_TCK)")
    python3 -c "print('   $name: core busy %.2f s by wall minus idle, %.2f s by tick samples, over %.2f s' % ($busy, ($s1 - $s0) / $CLK_TCK, $t1 - $t0))" >&2
    if [[ -n $perf_pid ]]; then
        for p in $perf_pids; do wait "$p" || true; done
        perf report -i "$OUT/$name.perf.data" --no-children --sort sym --stdio 2>/dev/null \
            >"$OUT/$name.perf.txt" || true
        # By area, in us per reply over the perf window (replies at the run's mean reply rate).
        perf script -i "$OUT/$name.perf.data" -F comm,pid,ip,sym 2>/dev/null |
            python3 "$ROOT/benches/perf-areas.py" "$SDEV" "$SERVER_PID" \
                "$(json "$OUT/$name-fixed.json" "r['reply_rate'] * ($(sed 's/s$//' <<<"$FIXED") - 2)")" \
                >"$OUT/$name.areas.txt" || true
        python3 - "$OUT/$name.perf-stat.txt" \
            "$(json "$OUT/$name-fixed.json" "r['reply_rate'] * ($(sed 's/s$//' <<<"$FIXED") - 2)")" \
            >>"$OUT/$name.areas.txt" <<'EOF' || true
import sys
replies = float(sys.argv[2])
print(f"per 1000 replies ({replies:.0f} in the window):")
for line in open(sys.argv[1]):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit() and float(f[0]) > 0:
        print(f"  {f[2]:<40} {1000 * float(f[0]) / max(replies, 1):10.1f}")
EOF
        cat "$OUT/$name.areas.txt" >&2
    fi
    row "$name" "$max" "$ended" \
        "$(json "$OUT/$name-fixed.json" "'%.0f' % r['reply_rate']")" \
        "$(json "$OUT/$name-fixed.json" "'%.3f' % r['loss_pct']")" \
        "$(json "$OUT/$name-fixed.json" "'%.1f' % r['rtt_us']['p99']")" \
        "$(python3 -c "r=__import__('json').load(open('$OUT/$name-fixed.json')); print('%.3f' % ($busy*1e6/max(r['replies'],1)))")" \
        "$(python3 -c "print('%.0f' % ($busy*100/($t1-$t0)))")"
}

# measure_t2 NAME: T2 - T_wire of single requests, and (gnomon) the worker's T3 - T2.
measure_t2() {
    local name=$1
    echo "== $name: T2 against the wire, $T2_COUNT requests" >&2
    ip netns exec "$NS_C" python3 "$ROOT/benches/t2-offset.py" "$CDEV" "$SERVER" "$T2_COUNT" \
        "$T2_GAP_MS" >"$OUT/$name-t2.txt"
    head -1 "$OUT/$name-t2.txt" >&2
    if [[ $name != chrony ]]; then
        ip netns exec "$NS_S" "$GNOMON" stats --json --control "$TMP/gnomon-$name.sock" \
            >"$OUT/$name-stats.json" 2>/dev/null || true
        json "$OUT/$name-stats.json" \
            "'gnomon T3 - T2 (us): p50 %.1f p99 %.1f max %.1f' % tuple(r['total']['latency'][k] / 1e3 for k in ('p50_ns', 'p99_ns', 'max_ns'))" \
            >>"$OUT/$name-t2.txt" 2>/dev/null || true
    fi
    row "$name" t2 - \
        "$(json <(tail -n +2 "$OUT/$name-t2.txt" | head -1) "'%.1f/%.1f/%.1f' % (r['p50_us'], r['p99_us'], r['min_us'])" 2>/dev/null || echo -)" \
        - - - -
}

# run_server NAME CMD...: starts CMD in the server namespace pinned to SRV_CPU, measures, stops.
run_server() {
    local name=$1
    shift
    echo "== starting $name: $*" >&2
    ip netns exec "$NS_S" taskset -c "$SRV_CPU" "$@" >"$OUT/$name.log" 2>&1 &
    SERVER_PID=$!
    if answering "$SERVER:123" --allow-remote --clients 1; then
        pin_napi "$SDEV" "$SRV_CPU"
        pin_napi "$CDEV" "$GEN_CPU"
        if [[ $INJECT == xdp ]]; then pin_napi "$RDEV" "$GEN_CPU"; fi
        if [[ $name == xdp ]] && ! grep -q "AF_XDP on $SDEV" "$OUT/$name.log"; then
            echo "!! gnomon did not use AF_XDP: $(grep -m1 'AF_XDP' "$OUT/$name.log" || echo '?')" >&2
            row "$name" n/a "no-xdp" - - - - -
        elif [[ -n $T2 ]]; then
            measure_t2 "$name"
        else
            measure "$name"
        fi
    else
        echo "!! $name did not answer on $SERVER:123; see $OUT/$name.log" >&2
        row "$name" n/a no-server - - - - -
    fi
    cleanup
}

gnomon_config() {
    cat <<EOF
listen = ["$SERVER:123"]
io = "$1"
workers = 1
# No cpus key: taskset leaves the process one CPU, and the worker is pinned to it.
local_stratum = 1
control_socket = "$TMP/gnomon-$1.sock"
EOF
    [[ $1 == xdp ]] && printf '[xdp]\ninterface = "%s"\nrequired = true\n' "$SDEV"
    true
}

for REP in $(seq "$REPEAT"); do
[[ $REPEAT -gt 1 ]] && echo "== round $REP of $REPEAT" >&2
for io in xdp uring mmsg; do
    if wants "$io"; then
        gnomon_config "$io" >"$TMP/gnomon-$io.toml"
        cp "$TMP/gnomon-$io.toml" "$OUT/"
        run_server "$io" "$GNOMON" serve --config "$TMP/gnomon-$io.toml"
    fi
done
if wants chrony; then
    cat >"$TMP/chrony.conf" <<EOF
port 123
bindaddress $SERVER
allow 198.18.0.0/15
local stratum 1
cmdport 0
pidfile $TMP/chronyd.pid
EOF
    cp "$TMP/chrony.conf" "$OUT/chrony.conf"
    # -x: never touch the system clock; -d: stay in the foreground (stopped by its pid).
    run_server chrony "$CHRONYD" -x -d -f "$TMP/chrony.conf"
fi
done

python3 - "$RESULTS" "$RATE" "$MAX_LOSS" <<'EOF'
import statistics, sys
all_rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
rounds = sorted({int(r[0]) for r in all_rows})
rows = [r[1:] for r in all_rows if int(r[0]) == rounds[-1]]
rate, loss = sys.argv[2], sys.argv[3]
def num(v):
    try:
        return float(v)
    except ValueError:
        return None
label = {"xdp": "gnomon AF_XDP", "uring": "gnomon io_uring", "mmsg": "gnomon mmsg", "chrony": "chronyd"}
chrony = next((r for r in rows if r[0] == "chrony"), None)
c_cost = num(chrony[6]) if chrony else None
c_rate = num(chrony[1]) if chrony else None
print()
print(f"{'server':<16} {'max rate/s (loss<' + loss + ')':>24} {'ended by':>9} | at {rate}/s: {'replies/s':>9} {'loss %':>7} {'p99 us':>8} {'core us/reply':>13} {'core busy %':>11} | {'chrony/this cost':>16} {'rate/chrony':>11}")
for name, mx, ended, rr, lp, p99, cost, busy in rows:
    cr = f"{c_cost / num(cost):.2f}" if c_cost and num(cost) else "-"
    rc = f"{num(mx) / c_rate:.2f}" if c_rate and num(mx) else "-"
    print(f"{label.get(name, name):<16} {mx:>24} {ended:>9} | {'':>{len(rate) + 6}}{rr:>9} {lp:>7} {p99:>8} {cost:>13} {busy:>11} | {cr:>16} {rc:>11}")
print("(core us/reply: busy time of the server's CPU (wall time minus its idle: the server, its")
print(" NAPI thread and anything else there) over the fixed-rate window, per reply; chrony/this")
print(" cost > 1 means cheaper than chrony, the target for AF_XDP is >= 3; 'generator' in ended by:")
print(" the generator, not the server, stopped the ramp, so that max is a floor)")
if len(rounds) > 1:
    print(f"(that table is round {rounds[-1]}; over all {len(rounds)} rounds:)")
    print(f"{'server':<16} {'core us/reply median':>21} {'min':>7} {'max':>7} | {'chrony/this cost, median of rounds':>35} {'min':>6} {'max':>6}")
    chrony_by_round = {int(r[0]): num(r[7]) for r in all_rows if r[1] == "chrony"}
    for name in dict.fromkeys(r[1] for r in all_rows):
        costs = [(int(r[0]), num(r[7])) for r in all_rows if r[1] == name and num(r[7])]
        if not costs:
            continue
        v = sorted(c for _, c in costs)
        ratios = sorted(chrony_by_round[k] / c for k, c in costs if chrony_by_round.get(k))
        rs = f"{statistics.median(ratios):>35.2f} {ratios[0]:>6.2f} {ratios[-1]:>6.2f}" if ratios else f"{'-':>35}"
        print(f"{label.get(name, name):<16} {statistics.median(v):>21.3f} {v[0]:>7.3f} {v[-1]:>7.3f} | {rs}")
EOF
echo
echo "reports and configs in $OUT"
