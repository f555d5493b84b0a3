#!/usr/bin/env bash
# benches/nts-e2e.sh: NTS against plain NTP on the same pinned core, side by side in one run.
# One gnomon config with [nts] (a test certificate made here), measured twice by
# benches/compare.sh: with plain gnomon-load, then with `gnomon-load --nts` (key exchanges first,
# cookies shared by the clients, every reply's authenticator checked). Prints each loss-free
# maximum (< MAX_LOSS, default 1%) and the ratio NTS/plain (issue 15 asks for >= 0.8), and the
# server's CPU time per reply in both at one common rate (FIXED_RATE, default 100000/s) with
# its ratio plain/NTS: what one core could answer of each, also when the generator, which on two
# cores costs about as much per request as the server, stops a ramp first.
#
# Usage: benches/nts-e2e.sh             IOS="mmsg uring" for both backends (default mmsg)
#   QUICK=1 benches/nts-e2e.sh          short steps, to check that the script works
#   REPEAT=5 benches/nts-e2e.sh         five plain/NTS pairs, one after the other, each pair's
#                                       ratios and their medians: on a shared machine one pair's
#                                       figures move by a quarter from run to run
#   PAIRED=1 benches/nts-e2e.sh         one server, plain and NTS slices in turn (SLICE, default
#                                       3s) at each of RATES, ROUNDS times: per-pair core time ratios
#                                       and the loss at each rate, free of the VM's slow drift
#   PAIRED=1 VETH=1 benches/nts-e2e.sh  the same across a veth pair between two namespaces
#                                       (benches/veth.sh, as benches/xdp.sh; needs root): the
#                                       server's receive work runs in its veth end's NAPI thread
#                                       on SRV_CPU, counted in its core time, where on loopback
#                                       the sender's core does it; the generator keeps its own.
#                                       GEN_XDP=1: gnomon-load through AF_XDP (--xdp), cheap
#                                       enough per request to drive the server to its limit;
#                                       IOS=xdp: the server on AF_XDP on its veth end too, where
#                                       what is left per reply is mostly gnomon's own work
#   Other knobs (GEN_CPU, SRV_CPU, CLIENTS, RAMP_START, STEP, ...) as in benches/compare.sh;
#   NTS_SESSIONS (default 16) key exchanges made by gnomon-load before each run.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/nts-e2e}
IOS=${IOS:-mmsg}
KE_PORT=${KE_PORT:-14460}
NTS_SESSIONS=${NTS_SESSIONS:-16}
REPEAT=${REPEAT:-1}
export FIXED_RATE=${FIXED_RATE:-100000}
mkdir -p "$OUT"
KE_HOST=127.0.0.1
if [[ -n ${PAIRED:-} && -n ${VETH:-} ]]; then
    [[ $(id -u) == 0 ]] || { echo "VETH=1 needs root (network namespaces)" >&2; exit 1; }
    # No INJECT=xdp here: its redirector is built by benches/xdp.sh only.
    PROFILE=release INJECT=
    source benches/veth.sh
    KE_HOST=$SERVER
fi

# A self-signed P-256 certificate for localhost and 127.0.0.1, as tests/nts.rs makes
# (gnomon-load checks it against the name localhost, wherever the server is).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" -days 30 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
    >/dev/null 2>&1
cat >"$OUT/gnomon-nts.toml" <<CONF
# As benches/gnomon-bench.toml, plus NTS: every client served, no rules, no rate limit.
local_stratum = 1
control_socket = "$OUT/gnomon.sock"

[nts]
certificate = "$OUT/cert.pem"
private_key = "$OUT/key.pem"
listen = "$KE_HOST:$KE_PORT"
CONF

CONF=$OUT/gnomon-nts.toml
NTS_FLAGS="--nts --nts-port $KE_PORT --nts-ca $OUT/cert.pem --nts-name localhost --nts-sessions $NTS_SESSIONS"
max_of() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['ramp']['max_rate']), r['ramp']['ended_by'])" "$1"; }

# cost FILE IO: the server CPU per reply at the fixed rate, from a compare.sh results.tsv.
cost() { awk -F'\t' -v io="$2" '$1 == "gnomon" && $2 == io { print $9 }' "$1"; }

if [[ -n ${PAIRED:-} ]]; then
    # One server for both kinds, and short slices in turn: plain, NTS, plain, NTS... at each
    # rate. Both see the same machine at the same minute, so a VM whose speed drifts by a third
    # over an hour (as this one does) moves both alike, and each pair's ratio stands.
    source benches/common.sh
    GEN_CPU=${GEN_CPU:-0}
    SRV_CPU=${SRV_CPU:-1}
    PORT=${PORT:-12470}
    HOST=127.0.0.1
    SERVE_IN=
    if [[ -n ${VETH:-} ]]; then
        HOST=$SERVER
        SERVE_IN="ip netns exec $NS_S"
        LOAD_IN="ip netns exec $NS_C"
        PLAIN_FLAGS=$(gen_flags | tr '\n' ' ')
        NTS_FLAGS="$NTS_FLAGS $PLAIN_FLAGS"
    fi
    CLIENTS=${CLIENTS:-1000}
    SLICE=${SLICE:-3s}
    ROUNDS=${ROUNDS:-3}
    RATES=${RATES:-"100000 150000 200000 250000 300000"}
    MAX_LOSS=${MAX_LOSS:-1}
    MAX_LOSS=${MAX_LOSS%\%}  # percent, with or without the sign (compare.sh takes "1%")
    [[ -n ${QUICK:-} ]] && SLICE=1s ROUNDS=1 RATES="50000 100000"
    cargo build --release -p gnomon --bin gnomon >&2
    cargo build --release -p gnomon-load >&2
    LOAD=$ROOT/target/release/gnomon-load
    trap 'cleanup; [[ -z ${VETH:-} ]] || veth_down' EXIT
    [[ -z ${VETH:-} ]] || veth_up
    for io in $IOS; do
        conf=$CONF
        if [[ $io == xdp ]]; then
            # AF_XDP on the server's veth end: no kernel socket path per request, so what is
            # left per reply is gnomon's own work, the frame's trip and the NAPI's.
            [[ -n ${VETH:-} ]] || { echo "IOS=xdp needs VETH=1 (an interface of its own)" >&2; exit 1; }
            conf=$OUT/gnomon-nts-xdp.toml
            { echo 'io = "xdp"'; cat "$CONF"; printf '\n[xdp]\ninterface = "%s"\nrequired = true\n' "$SDEV"; } >"$conf"
        fi
        # shellcheck disable=SC2086
        $SERVE_IN taskset -c "$SRV_CPU" target/release/gnomon serve --config "$conf" --listen "$HOST:$PORT" \
            --workers 1 --io "$io" >"$OUT/paired-$io.log" 2>&1 &
        SERVER_PID=$!
        # shellcheck disable=SC2086
        answering "$HOST:$PORT" ${VETH:+--allow-remote} ||
            { echo "!! gnomon did not answer, see $OUT/paired-$io.log" >&2; exit 1; }
        if [[ $io == xdp ]] && ! grep -q "AF_XDP on $SDEV" "$OUT/paired-$io.log"; then
            echo "!! gnomon did not use AF_XDP: $(grep -m1 'AF_XDP' "$OUT/paired-$io.log" || echo '?')" >&2
            exit 1
        fi
        if [[ -n ${VETH:-} ]]; then
            pin_napi "$SDEV" "$SRV_CPU"
            pin_napi "$CDEV" "$GEN_CPU"
        fi
        ROWS=$OUT/paired-$io.tsv
        : >"$ROWS"
        for rate in $RATES; do
            for round in $(seq "$ROUNDS"); do
                for kind in plain nts; do
                    # shellcheck disable=SC2206
                    flags=(${PLAIN_FLAGS:-})
                    # shellcheck disable=SC2206
                    [[ $kind == nts ]] && flags=($NTS_FLAGS)
                    # The server's process CPU (all threads, its KE thread too) and its core's
                    # busy time: wall minus idle and iowait (io_uring's waits count as iowait),
                    # exact under NO_HZ, softirq on that core included.
                    t0=$(proc_ticks "$SERVER_PID")
                    read -r idle0 w0 < <(awk -v c="cpu$SRV_CPU" '$1 == c {printf "%s ", $5 + $6; exit}' /proc/stat; date +%s.%N)
                    # shellcheck disable=SC2086
                    ${LOAD_IN:-} "$LOAD" "$HOST:$PORT" --cpu "$GEN_CPU" --clients "$CLIENTS" --no-progress --json \
                        ${flags[@]+"${flags[@]}"} --rate "$rate" --duration "$SLICE" --max-packets 100M \
                        >"$OUT/paired-$io-$kind.json"
                    t1=$(proc_ticks "$SERVER_PID")
                    read -r idle1 w1 < <(awk -v c="cpu$SRV_CPU" '$1 == c {printf "%s ", $5 + $6; exit}' /proc/stat; date +%s.%N)
                    python3 - "$OUT/paired-$io-$kind.json" "$rate" "$round" "$kind" "$t0" "$t1" "$idle0" "$idle1" \
                        "$w0" "$w1" "$(getconf CLK_TCK)" >>"$ROWS" <<'PY'
import json, sys
f, rate, rnd, kind, t0, t1, i0, i1, w0, w1, tck = sys.argv[1:]
r = json.load(open(f))
tck = float(tck)
proc = (float(t1) - float(t0)) / tck
busy = (float(w1) - float(w0)) - (float(i1) - float(i0)) / tck
n = max(r["replies"], 1)
bad = r["invalid"].get("unauthenticated", 0) + r["kiss"].get("NTSN", 0)
# The generator fell behind its schedule: this slice says nothing about the server's limit.
short = r["skipped"] > 0.01 * r["sent"] or r["send_rate"] < 0.98 * float(rate)
print(f"{rate}\t{rnd}\t{kind}\t{r['sent']}\t{r['replies']}\t{r['loss_pct']:.3f}\t{proc * 1e6 / n:.3f}\t"
      f"{busy * 1e6 / n:.3f}\t{int(short)}\t{bad}")
PY
                    tail -1 "$ROWS" >&2
                done
            done
        done
        stop_pids "$SERVER_PID"
        SERVER_PID=
        python3 - "$ROWS" "$io" "$MAX_LOSS" <<'PY' | tee "$OUT/paired-summary-$io.txt"
import statistics, sys
from collections import defaultdict
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
io, max_loss = sys.argv[2], float(sys.argv[3])
by = defaultdict(dict)  # (rate, round) -> kind -> row
for r in rows:
    by[(int(r[0]), r[1])][r[2]] = r
print(f"== {io}: plain and NTS in turn against one gnomon, {len(by)} pairs")
print(f"{'rate/s':>8} {'loss plain%':>11} {'loss NTS%':>10} {'core us plain':>13} {'core us NTS':>11} "
      f"{'plain/NTS core':>14} {'plain/NTS proc':>14}  generator behind")
cost = defaultdict(list)
passed = defaultdict(lambda: defaultdict(list))
bad = 0
for (rate, rnd), k in sorted(by.items()):
    if "plain" not in k or "nts" not in k:
        continue
    p, n = k["plain"], k["nts"]
    bad += int(n[9])
    core, proc = float(p[7]) / float(n[7]), float(p[6]) / float(n[6])
    for kind, row in k.items():
        passed[kind][rate].append(float(row[5]) < max_loss)
    behind = ",".join(kind for kind, row in k.items() if row[8] == "1") or "-"
    if float(p[5]) < max_loss and float(n[5]) < max_loss:
        cost[rate].append(core)
    print(f"{rate:>8} {float(p[5]):>11.3f} {float(n[5]):>10.3f} {float(p[7]):>13.2f} {float(n[7]):>11.2f} "
          f"{core:>14.2f} {proc:>14.2f}  {behind}")
def top(kind):
    # The highest rate at which most slices lost less than max_loss.
    ok = [rate for rate, v in passed[kind].items() if sum(v) * 2 > len(v)]
    return max(ok) if ok else 0
tp, tn = top("plain"), top("nts")
print(f"highest rate most slices held under {max_loss}% loss: plain {tp}/s, NTS {tn}/s, "
      f"NTS/plain {tn / tp if tp else 0:.2f} (of the rates tried)")
for rate in sorted(cost):
    c = sorted(cost[rate])
    print(f"core time per reply plain/NTS at {rate}/s, loss-free pairs: median {statistics.median(c):.2f} "
          f"(min {c[0]:.2f}, max {c[-1]:.2f}, {len(c)} pairs)")
allc = sorted(x for v in cost.values() for x in v)
if allc:
    print(f"all loss-free pairs: core time per reply plain/NTS median {statistics.median(allc):.2f} ({len(allc)} pairs)")
print(f"unauthenticated NTS replies and NAKs: {bad}")
PY
    done
    exit 0
fi

SUMMARY=$OUT/summary.txt
PAIRS=$OUT/pairs.tsv
: >"$SUMMARY"
: >"$PAIRS"
for io in $IOS; do
    for r in $(seq "$REPEAT"); do
        RUN=$OUT/run$r
        OUT=$RUN/plain ONLY=gnomon IOS=$io GNOMON_ARGS="--config $CONF" benches/compare.sh
        OUT=$RUN/nts ONLY=gnomon IOS=$io GNOMON_ARGS="--config $CONF" LOAD_ARGS="$NTS_FLAGS" \
            benches/compare.sh
        read -r plain plain_end < <(max_of "$RUN/plain/gnomon-$io-ramp.json")
        read -r nts nts_end < <(max_of "$RUN/nts/gnomon-$io-ramp.json")
        bad=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['invalid'].get('unauthenticated', 0), r['kiss'].get('NTSN', 0))" \
            "$RUN/nts/gnomon-$io-ramp.json")
        python3 - "$io" "$r" "$plain" "$plain_end" "$nts" "$nts_end" "$bad" \
            "$(cost "$RUN/plain/results.tsv" "$io")" "$(cost "$RUN/nts/results.tsv" "$io")" "$PAIRS" <<'PY' | tee -a "$SUMMARY"
import os, sys
io, r, plain, plain_end, nts, nts_end, bad, plain_cost, nts_cost, pairs = sys.argv[1:]
plain, nts = int(plain), int(nts)
unauth, naks = bad.split()
ratio = nts / plain if plain else 0.0
print(f"{io:<6} run {r}: plain {plain:>9}/s (ended by {plain_end})  NTS {nts:>9}/s (ended by {nts_end})  "
      f"ratio {ratio:.2f}  (unauthenticated replies {unauth}, NAKs {naks})")
try:
    pc, nc = float(plain_cost), float(nts_cost)
    print(f"{io:<6} run {r}: server CPU per reply at {os.environ['FIXED_RATE']}/s: plain {pc:.2f} us, NTS {nc:.2f} us, "
          f"ratio plain/NTS {pc / nc:.2f} (the NTS rate one core sustains, as a fraction of plain's)")
    cost_ratio = pc / nc
except ValueError:
    print(f"{io:<6} run {r}: server CPU per reply: not measured (plain {plain_cost!r}, NTS {nts_cost!r})")
    cost_ratio = float("nan")
with open(pairs, "a") as f:
    f.write(f"{io}\t{r}\t{plain}\t{nts}\t{ratio:.3f}\t{plain_cost}\t{nts_cost}\t{cost_ratio:.3f}\n")
PY
    done
done
if [[ $REPEAT -gt 1 ]]; then
    python3 - "$PAIRS" <<'PY' | tee -a "$SUMMARY"
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
for io in dict.fromkeys(r[0] for r in rows):
    mine = [r for r in rows if r[0] == io]
    rates = sorted(float(r[4]) for r in mine)
    costs = sorted(float(r[7]) for r in mine if r[7] != "nan")
    print(f"{io:<6} {len(mine)} pairs: loss-free rate NTS/plain median {statistics.median(rates):.2f} "
          f"(min {rates[0]:.2f}, max {rates[-1]:.2f})", end="")
    if costs:
        print(f"; CPU per reply plain/NTS median {statistics.median(costs):.2f} (min {costs[0]:.2f}, max {costs[-1]:.2f})")
    else:
        print()
PY
fi
echo "== summary (also in $SUMMARY)"
cat "$SUMMARY"
