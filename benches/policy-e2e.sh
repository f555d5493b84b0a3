#!/usr/bin/env bash
# benches/policy-e2e.sh: the cost of access rules and rate limiting end to end. Runs
# benches/compare.sh twice for gnomon alone, in one invocation: once with no rules and no
# limiter, once with 100,000 restrict rules loaded and every client `limited` (with limits
# the load never reaches, so the limiter does its full work on every request without dropping),
# and prints the max-rate ratio. Many sources: gnomon-load spreads CLIENTS over 127.1.x.y.
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
for variant in plain policy; do
    if [[ $variant == plain ]]; then cfg=benches/gnomon-bench.toml; else cfg=$TMP/policy.toml; fi
    echo "== $variant ($cfg)"
    ONLY=gnomon IOS=$IO OUT=${OUT:-target/compare}/$variant GNOMON_ARGS="--config $cfg" benches/compare.sh | tee "$TMP/$variant.txt"
done
python3 - "$TMP/plain.txt" "$TMP/policy.txt" <<'PY'
import sys
def max_rate(path):
    for line in open(path):
        f = line.split()
        if f and f[0] == "gnomon" and len(f) > 2 and f[2].isdigit():
            return int(f[2])
    raise SystemExit(f"no gnomon row in {path}")
plain, policy = max_rate(sys.argv[1]), max_rate(sys.argv[2])
print(f"\nmax rate at <1% loss: plain {plain}/s, 100k rules + limiter {policy}/s, ratio {policy / plain:.3f}")
PY
