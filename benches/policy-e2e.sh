#!/usr/bin/env bash
# benches/policy-e2e.sh: the cost of access rules and rate limiting end to end. Runs
# benches/compare.sh for gnomon alone: with no rules and no limiter ("plain"), and with 100,000
# restrict rules loaded and every client `limited` ("policy", with limits the load never
# reaches, so the limiter does its full work on every request without dropping). Many sources:
# gnomon-load spreads CLIENTS over 127.1.x.y.
#
# A shared VM drifts by 10% between two-minute runs, so the variants alternate for ROUNDS
# rounds (plain policy, policy plain, ...) and the medians are compared: the max rate (a floor
# when the generator ended the ramp) and the server's CPU per reply, measured in both at the
# same FIXED_RATE (it depends on the rate through batch sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
IO=${IO:-uring}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 - "$TMP/policy.toml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write('listen = ["127.0.0.1:12400"]\nlocal_stratum = 1\ncontrol_socket = "/tmp/gnomon-bench.sock"\n')
    f.write('[[restrict]]\naddress = "default"\naction = "limited"\n')
    # 100,000 /24 prefixes that the load never comes from, so lookups search a full table.
    for i in range(100_000):
        f.write(f'[[restrict]]\naddress = "{10 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.0/24"\naction = "deny"\n')
    f.write('[rate_limit]\ninterval = 0.001\nburst = 1000000\ntable_bytes = 16777216\n')
PY
ROUNDS=${ROUNDS:-3}
export FIXED_RATE=${FIXED_RATE:-150000}
for round in $(seq 1 "$ROUNDS"); do
    if ((round % 2)); then order="plain policy"; else order="policy plain"; fi
    for variant in $order; do
        if [[ $variant == plain ]]; then cfg=benches/gnomon-bench.toml; else cfg=$TMP/policy.toml; fi
        echo "== round $round: $variant ($cfg)"
        ONLY=gnomon IOS=$IO OUT=${OUT:-target/compare}/$variant GNOMON_ARGS="--config $cfg" benches/compare.sh |
            tee "$TMP/$variant.$round.txt"
    done
done
python3 - "$TMP" "$ROUNDS" <<'PY'
import statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
def row(path):
    for line in open(path):
        f = line.split()
        if f and f[0] == "gnomon" and len(f) > 8 and f[2].isdigit():
            return int(f[2]), float(f[8])
    raise SystemExit(f"no gnomon row in {path}")
runs = {v: [row(f"{tmp}/{v}.{r}.txt") for r in range(1, rounds + 1)] for v in ("plain", "policy")}
print()
for v, rs in runs.items():
    print(f"{v:<7} max rate/s {[m for m, _ in rs]}  CPU us/reply at the fixed rate {[c for _, c in rs]}")
med = {v: (statistics.median(m for m, _ in rs), statistics.median(c for _, c in rs)) for v, rs in runs.items()}
print(f"medians: max rate plain {med['plain'][0]:.0f}/s, 100k rules + limiter {med['policy'][0]:.0f}/s, "
      f"ratio {med['policy'][0] / med['plain'][0]:.3f}")
print(f"medians: CPU per reply plain {med['plain'][1]:.2f} us, 100k rules + limiter {med['policy'][1]:.2f} us, "
      f"ratio {med['policy'][1] / med['plain'][1]:.3f} (capacity ratio {med['plain'][1] / med['policy'][1]:.3f})")
PY
