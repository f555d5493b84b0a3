#!/usr/bin/env bash
# benches/metrics-cost.sh: what the Prometheus endpoint costs the server under load. One gnomon
# (one worker, pinned to SRV_CPU, [metrics] on) serves gnomon-load (pinned to GEN_CPU) at a
# fixed rate; rounds alternate between no scrape and a scrape of /metrics every SCRAPE_EVERY
# seconds (curl, pinned with the generator), in the same run. Each round reports server CPU
# time (all threads, utime + stime) per reply; the script prints the medians and their ratio.
# Under load that ratio is within the noise of a shared machine, so the script also measures
# one scrape's CPU cost on the idle server beforehand and converts it to ns per reply.
#
# Usage: benches/metrics-cost.sh
#   RATE=40000 ROUNDS=5 ROUND=10s IO=mmsg SCRAPE_EVERY=1   (defaults)
#   QUICK=1                                               (short rounds, to check the script)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
GEN_CPU=${GEN_CPU:-0}
SRV_CPU=${SRV_CPU:-1}
PORT=${PORT:-12480}
MPORT=${MPORT:-12481}
RATE=${RATE:-40000}
ROUNDS=${ROUNDS:-5}
ROUND=${ROUND:-10s}
IO=${IO:-mmsg}
CLIENTS=${CLIENTS:-1000}
SCRAPE_EVERY=${SCRAPE_EVERY:-1}
OUT=${OUT:-$ROOT/target/metrics-cost}
if [[ -n ${QUICK:-} ]]; then
    ROUNDS=2
    ROUND=2s
fi
LOAD=$ROOT/target/release/gnomon-load
GNOMON=${GNOMON:-$ROOT/target/release/gnomon}
TMP=$(mktemp -d)
SERVER_PID=
SCRAPER_PID=

. "$ROOT/benches/common.sh"
cleanup() {
    stop_pids "$SCRAPER_PID" "$SERVER_PID"
    SCRAPER_PID=
    SERVER_PID=
}
trap 'cleanup; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

command -v curl >/dev/null || { echo "curl is needed for the scrapes" >&2; exit 1; }
mkdir -p "$OUT"
echo "== load before: $(uptime)" | tee "$OUT/uptime.txt" >&2
echo "== building release binaries" >&2
cargo build --release -p gnomon --bin gnomon >&2
cargo build --release -p gnomon-load >&2

cat >"$TMP/gnomon.toml" <<EOF
listen = ["127.0.0.1:$PORT"]
workers = 1
io = "$IO"
local_stratum = 1
control_socket = "$TMP/gnomon.sock"
[metrics]
listen = "127.0.0.1:$MPORT"
EOF

CLK_TCK=$(getconf CLK_TCK)

taskset -c "$SRV_CPU" "$GNOMON" serve --config "$TMP/gnomon.toml" >"$OUT/gnomon.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 50); do
    curl -sf "http://127.0.0.1:$MPORT/metrics" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/gnomon.log" >&2; exit 1; }
    sleep 0.2
done
curl -sf "http://127.0.0.1:$MPORT/metrics" >"$OUT/sample.prom"
echo "== one scrape is $(wc -c <"$OUT/sample.prom") bytes" >&2

# The cost of one scrape on its own, resolved well below a clock tick: the idle server's CPU
# over SCRAPES back-to-back scrapes, less its idle CPU over as long a time without them.
SCRAPES=${SCRAPES:-2000}
scrape_loop() {
    taskset -c "$GEN_CPU" python3 -c "
import sys, time, urllib.request
t = time.monotonic()
for _ in range(int(sys.argv[1])):
    urllib.request.urlopen('http://127.0.0.1:$MPORT/metrics').read()
print(time.monotonic() - t)" "$1"
}
c0=$(proc_ticks "$SERVER_PID")
wall=$(scrape_loop "$SCRAPES")
c1=$(proc_ticks "$SERVER_PID")
sleep "$wall"
c2=$(proc_ticks "$SERVER_PID")
PER_SCRAPE_US=$(python3 -c "print('%.1f' % ((($c1 - $c0) - ($c2 - $c1)) / $CLK_TCK * 1e6 / $SCRAPES))")
echo "== one scrape costs the idle server ${PER_SCRAPE_US} us of CPU ($SCRAPES scrapes in ${wall} s)" >&2

RESULTS=$TMP/results.tsv
: >"$RESULTS"
# round MODE N: one fixed-rate run; MODE is "none" or "scrape".
round() {
    local mode=$1 n=$2 cpu0 cpu1
    if [[ $mode == scrape ]]; then
        taskset -c "$GEN_CPU" bash -c "while :; do curl -sf -o /dev/null http://127.0.0.1:$MPORT/metrics; sleep $SCRAPE_EVERY; done" &
        SCRAPER_PID=$!
    fi
    cpu0=$(proc_ticks "$SERVER_PID")
    "$LOAD" "127.0.0.1:$PORT" --cpu "$GEN_CPU" --clients "$CLIENTS" --rate "$RATE" --duration "$ROUND" \
        --max-packets 100M --no-progress --json >"$OUT/$mode-$n.json"
    cpu1=$(proc_ticks "$SERVER_PID")
    if [[ -n $SCRAPER_PID ]]; then
        kill "$SCRAPER_PID" 2>/dev/null || true
        wait "$SCRAPER_PID" 2>/dev/null || true
        SCRAPER_PID=
    fi
    local replies
    replies=$(json "$OUT/$mode-$n.json" "r['replies']")
    python3 -c "print('%s\t%d\t%.4f\t%s\t%.3f' % ('$mode', $n, ($cpu1 - $cpu0) / $CLK_TCK * 1e6 / max($replies, 1), $replies, $(json "$OUT/$mode-$n.json" "r['loss_pct']")))" >>"$RESULTS"
    echo "   $(tail -1 "$RESULTS")" >&2
}

for n in $(seq 1 "$ROUNDS"); do
    # Alternate which goes first, so a drift in machine load falls on both alike.
    if ((n % 2)); then order="none scrape"; else order="scrape none"; fi
    for mode in $order; do
        echo "== round $n: $mode" >&2
        round "$mode" "$n"
    done
done
echo "== load after: $(uptime)" | tee -a "$OUT/uptime.txt" >&2
cp "$RESULTS" "$OUT/results.tsv"

python3 - "$RESULTS" "$RATE" "$SCRAPE_EVERY" "$PER_SCRAPE_US" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {"none": [], "scrape": []}
for mode, n, us, replies, loss in rows:
    by[mode].append(float(us))
print()
print(f"server CPU per reply at {sys.argv[2]}/s, one worker (us, all threads), rounds alternating:")
for mode, label in (("none", "no scrape"), ("scrape", f"scrape every {sys.argv[3]} s")):
    v = by[mode]
    print(f"  {label:<20} median {statistics.median(v):.4f}   rounds {' '.join('%.4f' % x for x in v)}")
a, b = statistics.median(by["none"]), statistics.median(by["scrape"])
print(f"  ratio scrape/none: {b / a:.4f}   ({(b - a) * 1000:+.1f} ns per reply)")
per_scrape, rate, every = float(sys.argv[4]), float(sys.argv[2]), float(sys.argv[3])
print(f"one scrape on the idle server: {per_scrape:.1f} us of CPU, i.e. "
      f"{per_scrape / (rate * every) * 1000:.2f} ns per reply at {rate:.0f}/s with a scrape every {every:g} s "
      f"({per_scrape / (rate * every) / a * 100:.3f} % of the no-scrape median)")
EOF
