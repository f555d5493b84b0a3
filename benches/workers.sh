#!/usr/bin/env bash
# benches/workers.sh: total answered rate with one worker against two, on this machine.
# One worker: pinned to CPU 1, the generator on CPU 0. Two workers: CPUs 0 and 1, the generator
# on CPU 0 too (a 2-core box has no third core), so the second worker competes with the
# generator; compare the two maxima knowing that (DESIGN section 8).
set -euo pipefail
cd "$(dirname "$0")/.."
IO=${IO:-uring}
STEP=${STEP:-2s}
cargo build --release -q -p gnomon -p gnomon-load
LOAD=target/release/gnomon-load
GNOMON=target/release/gnomon
PORT=12480
PID=
trap '[[ -n $PID ]] && kill $PID 2>/dev/null; true' EXIT
for workers in 1 2; do
    cpus=1
    [[ $workers == 2 ]] && cpus=0,1
    taskset -c "$cpus" "$GNOMON" serve --config benches/gnomon-bench.toml --listen "127.0.0.1:$PORT" \
        --workers "$workers" --io "$IO" >/dev/null 2>&1 &
    PID=$!
    sleep 0.5
    "$LOAD" "127.0.0.1:$PORT" --cpu 0 --ramp --ramp-start 40k --ramp-factor 1.25 --step-duration "$STEP" \
        --max-loss 1% --refine 3 --duration 120s --max-packets 100M --no-progress --json >"target/workers-$workers.json"
    python3 -c "import json; r=json.load(open('target/workers-$workers.json'))['ramp']; print(f'$workers worker(s) on CPU $cpus: max {r[\"max_rate\"]:.0f}/s at <1% loss (ended by {r[\"ended_by\"]})')"
    kill $PID; wait $PID 2>/dev/null || true
    PID=
    PORT=$((PORT + 1))
done
