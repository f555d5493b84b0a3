#!/usr/bin/env bash
# Runs fuzz targets for a bounded time each and fails on the first crash or hang.
# Usage: fuzz/run.sh [SECONDS [TARGET...]]   (default 20 s each, every target in Cargo.toml)
# Needs cargo-fuzz (cargo install --locked cargo-fuzz). Works on the stable toolchain: cargo-fuzz
# passes nightly-only flags (-Zsanitizer, -Cpasses=sancov), which RUSTC_BOOTSTRAP=1 allows.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
seconds=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} = 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
# The fuzzed code is safe Rust (proto/ and policy/ forbid unsafe, the sync core and config have
# none): AddressSanitizer finds nothing there that bounds checks and the debug assertions and
# overflow checks of cargo-fuzz builds do not, and it costs 2 to 6 times the inputs per second.
# FUZZ_SANITIZER=address turns it back on.
sanitizer=${FUZZ_SANITIZER:-none}
start=$SECONDS
cargo fuzz build -s "$sanitizer"
echo "fuzz: built ${#targets[@]} targets in $((SECONDS - start)) s"
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" artifacts
  # Seeds (valid configs, a reply sequence that synchronises) get past the first checks at
  # once; new inputs go to corpus/ only, which later runs start from.
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  log="artifacts/$t.log"
  if ! cargo fuzz run -s "$sanitizer" "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    # The panic (or libFuzzer's timeout/out-of-memory report) and the input that caused it.
    grep -a -m1 -A8 'panicked at' "$log" || grep -av '^#[0-9]' "$log" | tail -n 40
    grep -a -A2 '^Failing input' "$log" || true
    echo "fuzz: $t FAILED (full log: fuzz/$log; reproduce with the input named above:" \
      "cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s $sanitizer $t INPUT)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  echo "fuzz: $t: ${runs:-?} inputs in $seconds s, no crash"
done
