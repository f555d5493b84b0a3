#!/usr/bin/env bash
# gnomon against chronyd on clknetsim, the simulator chrony's own test suite runs on, in chrony's
# scenarios with the same seeds (issue 12).
#
#   tests/clknetsim/compare.sh                 # every scenario below: one table, chronyd vs gnomon
#   tests/clknetsim/compare.sh 001 102         # only the rows whose label starts with these
#   tests/clknetsim/compare.sh --list          # the rows
#   tests/clknetsim/compare.sh --run LABEL IMPL  # one row with IMPL = gnomon or chronyd, prints
#                                              # one `RESULT ...` line (used by tests/clknetsim.rs)
#   tests/clknetsim/compare.sh --build         # only build clknetsim and the shim
#   tests/clknetsim/compare.sh --sources       # where the sources are (exit 3: absent)
#
# Sources (read only): $GNOMON_CLKNETSIM, default ../shared/clknetsim next to the repo: clknetsim,
# chrony's test.common and scenarios, the threads shim (mtshim.c), node.sh. Everything built or
# written goes to $CLK_BUILD (default target/clknetsim). GNOMON picks the binary (default: a
# release build made here). Runs are exactly reproducible per seed; they are serialised with a
# lock on $CLK_BUILD because chrony's scenario library works in one tmp/ directory.
#
# The table is markdown, for an issue or a closing note. Columns: checks = chrony's check_sync
# (sync time within the scenario's min/max, max and rms time and frequency errors within its
# limits; rms and max as chrony measures them, from max_sync_time on) and check_packet_interval
# (FAIL:sync or FAIL:interval says which failed); sync = the first second from which the clock
# stays synchronised (chrony's find_sync); rms = offset rms of the measured node from FROM
# seconds on (after convergence; FROM per row); ratio = gnomon rms / chronyd rms.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
# ../shared/clknetsim next to the repo; from a git worktree, next to its main checkout.
SRC=${GNOMON_CLKNETSIM:-$REPO/../shared/clknetsim}
if [ -z "${GNOMON_CLKNETSIM:-}" ] && [ ! -d "$SRC" ]; then
	main=$(cd "$REPO" && git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
	[ -n "$main" ] && SRC=$(dirname "$main")/../shared/clknetsim
fi
export CLK_BUILD=${CLK_BUILD:-$REPO/target/clknetsim}

# label | seed | gnomon nodes | measured node | FROM | variables (as chrony's scenario sets them)
# | setup run after test_start (files in tmp/). 113 is the scenario's last case (the leap second
# from the server's right/UTC time zone): Debian's chronyd 4.3 has no `leapseclist`. The served
# rows are not chrony's: a chronyd client (node 3) behind the stratum-2 node under test (node 2),
# with chrony's default limits but 400 s to synchronise through two strata, on ten seeds (the
# client's rms from 1000 s rests on the few samples it takes at a 1024 s poll).
ROWS=$(
	cat <<'EOF'
001-defaults|1|2|2|1000||
001-defaults|2|2|2|1000||
001-defaults|3|2|2|1000||
003-freq-5000ppm|1|2|2|2000|freq_offset=-5e-3 time_offset=0.65 max_sync_time=1000|
003-freq+5000ppm|1|2|2|2000|freq_offset=5e-3 time_offset=-0.65 max_sync_time=1000|
004-time-100s|1|2|2|2000|time_offset=-1e2 min_sync_time=1300 max_sync_time=1400|
004-time+100s|1|2|2|2000|time_offset=1e2 min_sync_time=1300 max_sync_time=1400|
006-largejitter|1|2|2|1000|time_offset=1e0 jitter=1e-1 time_max_limit=5e-1 freq_max_limit=2e-1 time_rms_limit=1e-1 freq_rms_limit=5e-3|
007-largewander|1|2|2|1000|wander=1e-7 time_max_limit=5e-3 freq_max_limit=5e-3 time_rms_limit=1e-3 freq_rms_limit=1e-4|
011-asymjitter|1|2|2|3000|jitter=5e-4 jitter_asymmetry=0.47 limit=100000 max_sync_time=2000|
101-poll4|1|2|2|80|P=4 wander=0.0 jitter=1e-6 time_max_limit=1e-5 freq_max_limit=1e-5 time_rms_limit=5e-6 freq_rms_limit=5e-6 client_conf="makestep 1e-2 1" client_server_options="minpoll $P maxpoll $P" limit=$((2**P*10)) min_sync_time=$((2**P*2)) max_sync_time=$((2**P*21/10+1)) client_max_min_out_interval=$(awk "BEGIN{print 2^$P*1.1}") client_min_mean_out_interval=$(awk "BEGIN{print 2^$P*0.99}")|
101-poll6|1|2|2|320|P=6 wander=0.0 jitter=1e-6 time_max_limit=1e-5 freq_max_limit=1e-5 time_rms_limit=5e-6 freq_rms_limit=5e-6 client_conf="makestep 1e-2 1" client_server_options="minpoll $P maxpoll $P" limit=$((2**P*10)) min_sync_time=$((2**P*2)) max_sync_time=$((2**P*21/10+1)) client_max_min_out_interval=$(awk "BEGIN{print 2^$P*1.1}") client_min_mean_out_interval=$(awk "BEGIN{print 2^$P*0.99}")|
101-poll8|1|2|2|1000|P=8 wander=0.0 jitter=1e-6 time_max_limit=1e-5 freq_max_limit=1e-5 time_rms_limit=5e-6 freq_rms_limit=5e-6 client_conf="makestep 1e-2 1" client_server_options="minpoll $P maxpoll $P" limit=$((2**P*10)) min_sync_time=$((2**P*2)) max_sync_time=$((2**P*21/10+1)) client_max_min_out_interval=$(awk "BEGIN{print 2^$P*1.1}") client_min_mean_out_interval=$(awk "BEGIN{print 2^$P*0.99}")|
102-iburst|1|2|2|1000|freq_offset=1e-4 client_conf=$'makestep 1e-2 1\ndriftfile tmp/drift' client_server_options=iburst min_sync_time=4 max_sync_time=6|echo "100 1.0" > tmp/drift
113-leap-insert|1|2|2|200000|export CLKNETSIM_START_DATE=$(TZ=UTC date -d 'Dec 30 2008 0:00:00' +%s); limit=$((4*24*3600)) client_start=$((2*3600)) refclock_jitter=1e-9 leap=$((2*24*3600)) server_conf=$'refclock SHM 0 dpoll 10 poll 10\nleapsectz right/UTC' refclock_offset="(* -1 (equal 0.1 (max (sum 1.0) $leap) $leap))" client_conf="leapsecmode system" min_sync_time=$((leap-2)) max_sync_time=$leap|
served-system|1|2|3|1000|server_strata=2 max_sync_time=400|
served-system|2|2|3|1000|server_strata=2 max_sync_time=400|
served-system|3|2|3|1000|server_strata=2 max_sync_time=400|
served-system|4|2|3|1000|server_strata=2 max_sync_time=400|
served-system|5|2|3|1000|server_strata=2 max_sync_time=400|
served-system|6|2|3|1000|server_strata=2 max_sync_time=400|
served-system|7|2|3|1000|server_strata=2 max_sync_time=400|
served-system|8|2|3|1000|server_strata=2 max_sync_time=400|
served-system|9|2|3|1000|server_strata=2 max_sync_time=400|
served-system|10|2|3|1000|server_strata=2 max_sync_time=400|
served-software|1|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
served-software|2|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
served-software|3|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
served-software|4|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
served-software|5|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
served-software|6|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
served-software|7|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
served-software|8|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
served-software|9|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
served-software|10|2|3|1000|server_strata=2 max_sync_time=400 GNOMON_CLOCK_MODE=software|
EOF
)

die() {
	echo "compare.sh: $*" >&2
	exit 2
}

# Builds clknetsim, the shim and the launcher from $SRC into $CLK_BUILD, once per source change.
build() {
	[ -d "$SRC/clknetsim" ] && [ -f "$SRC/mtshim.c" ] || die "no clknetsim sources in $SRC (set GNOMON_CLKNETSIM)"
	local stamp=$CLK_BUILD/.built
	if [ -f "$stamp" ] && [ -z "$(find -L "$SRC" -newer "$stamp" -print -quit)" ]; then
		return 0
	fi
	mkdir -p "$CLK_BUILD"
	rm -rf "$CLK_BUILD/clknetsim" "$CLK_BUILD/sim"
	cp -r "$SRC/clknetsim" "$CLK_BUILD/clknetsim"
	chmod -R u+w "$CLK_BUILD/clknetsim"
	make -s -C "$CLK_BUILD/clknetsim" >/dev/null
	gcc -O2 -shared -fPIC -o "$CLK_BUILD/mtshim.so" "$SRC/mtshim.c" -ldl -lpthread -lm
	gcc -O2 -static -o "$CLK_BUILD/launcher" "$SRC/launcher.c"
	cp -r "$SRC/chrony-simulation" "$CLK_BUILD/sim"
	chmod -R u+w "$CLK_BUILD/sim"
	# clknetsim.bash makes tmp/ when it is missing, and the first run after a fresh build then
	# ended without a word inside run_one (seen on a clean clone: no RESULT, exit 0); made here,
	# every run finds it.
	mkdir -p "$CLK_BUILD/sim/tmp"
	touch "$stamp"
}

gnomon_binary() {
	if [ -z "${GNOMON:-}" ]; then
		(cd "$REPO" && cargo build --release -q)
		GNOMON=$REPO/target/release/gnomon
	fi
	export GNOMON
}

row() {
	local label=$1 seed=${2:-}
	printf '%s\n' "$ROWS" | awk -F'|' -v l="$label" -v s="$seed" '$1 == l && (s == "" || $2 == s)'
}

# One row with one implementation; prints
# RESULT label seed impl ok sync max_time max_freq rms_time rms_freq rms_from packet_ok limits...
run_one() {
	local line=$1 impl=$2
	local label seed gnodes node from vars setup
	IFS='|' read -r label seed gnodes node from vars setup <<<"$line"
	[ "$impl" = gnomon ] || gnodes=""
	(
		# chrony's scenario library is not written for -e/-u.
		set +euo pipefail
		cd "$CLK_BUILD/sim" || exit 1
		export CLKNETSIM_PATH=$CLK_BUILD/clknetsim
		# shellcheck disable=SC1091
		. ./test.common >/dev/null
		eval "$vars"
		export GNOMON_NODES=$gnodes CLK_NODE_SCRIPT=${GNOMON_NODE_SCRIPT:-$REPO/tests/clknetsim/node.sh}
		export CLKNETSIM_CLIENT_WRAPPER=$CLK_BUILD/launcher CLKNETSIM_RANDOM_SEED=$seed
		export GNOMON_CLOCK_MODE=${GNOMON_CLOCK_MODE:-system}
		out=$CLK_BUILD/results/$label.$seed.$impl
		rm -rf "$out"
		mkdir -p "$out"
		{
			test_start "$label seed $seed with ${gnodes:+gnomon on node $gnodes}${gnodes:-chronyd only}"
			eval "$setup"
			run_test
			pkt=0
			check_packet_interval || pkt=1
			sync=0
			check_sync || sync=1
		} >"$out/checks" 2>&1 || true
		cp tmp/stats tmp/log.* tmp/conf* tmp/gnomon.* "$out/" 2>/dev/null || true
		st=$(find_sync tmp/log.offset tmp/log.freq "$node" "$time_max_limit" "$freq_max_limit" 1.0)
		steady=$(cut -f "$node" tmp/log.offset | awk -v from="$from" \
			'NR > from { s += $1 * $1; k++ } END { printf "%.3e", k ? sqrt(s / k) : -1 }')
		# FAIL names what failed: check_sync (sync time, max/rms time and frequency errors) or the
		# packet intervals.
		ok=pass
		[ "${pkt:-1}" = 0 ] || ok=FAIL:interval
		[ "${sync:-1}" = 0 ] || ok=FAIL:sync
		echo "RESULT $label $seed $impl $ok $st $(get_stat 'Maximum absolute offset' "$node")" \
			"$(get_stat 'Maximum absolute frequency' "$node") $(get_stat 'RMS offset' "$node")" \
			"$(get_stat 'RMS frequency' "$node") $steady $from $([ "${pkt:-1}" = 0 ] && echo pkt-ok || echo pkt-BAD)" \
			"limits: sync $min_sync_time..$max_sync_time max $time_max_limit freq $freq_max_limit" \
			"rms $time_rms_limit rmsfreq $freq_rms_limit"
	)
}

locked() {
	mkdir -p "$CLK_BUILD"
	exec 9>"$CLK_BUILD/.lock"
	flock 9
}

case ${1:-} in
--sources)
	# Where the sources are; exit 3 when they are absent (the test then skips).
	[ -d "$SRC/clknetsim" ] && [ -f "$SRC/mtshim.c" ] || exit 3
	echo "$SRC"
	exit 0
	;;
--list)
	printf '%s\n' "$ROWS" | cut -d'|' -f1,2 | tr '|' ' '
	exit 0
	;;
--build)
	locked
	build
	exit 0
	;;
--run)
	[ $# -eq 3 ] || die "usage: --run LABEL[:SEED] gnomon|chronyd"
	locked
	build
	[ "$3" = chronyd ] || gnomon_binary
	l=$(row "${2%%:*}" "$([[ $2 == *:* ]] && echo "${2##*:}")" | head -n 1)
	[ -n "$l" ] || die "no row $2 (see --list)"
	run_one "$l" "$3"
	exit 0
	;;
esac

command -v chronyd >/dev/null || [ -x /usr/sbin/chronyd ] || die "chronyd is not installed"
locked
build
gnomon_binary
echo "| scenario | seed | chronyd checks | chronyd sync (s) | chronyd rms (s) | gnomon checks | gnomon sync (s) | gnomon rms (s) | ratio |"
echo "|---|---|---|---|---|---|---|---|---|"
# pooled LABEL N: after the last seed of a label run on several seeds, the rms of all its seeds
# together (sqrt of the mean square: every seed's window has the same length). One seed's rms of
# a served row rests on the few samples its client takes at a 1024 s poll, so seeds scatter it.
pooled() {
	[ "${2:-0}" -gt 1 ] || return 0
	ratio=$(awk -v a="$pg" -v b="$pc" -v n="$2" 'BEGIN { printf "%.2f", sqrt(a / n) / sqrt(b / n) }')
	echo "| $1, $2 seeds pooled | | | | $(awk -v b="$pc" -v n="$2" 'BEGIN { printf "%.3e", sqrt(b / n) }') | | |" \
		"$(awk -v a="$pg" -v n="$2" 'BEGIN { printf "%.3e", sqrt(a / n) }') | $ratio |"
}
{
	printf '%s\n' "$ROWS"
	echo "|"
} | {
	group="" n=0 pc=0 pg=0
	while IFS= read -r line; do
		label=${line%%|*}
		if [ -n "$label" ] && [ $# -gt 0 ]; then
			m=0
			for p in "$@"; do [[ $label == "$p"* ]] && m=1; done
			[ $m = 1 ] || continue
		fi
		if [ "$label" != "$group" ]; then
			pooled "$group" "$n"
			group=$label n=0 pc=0 pg=0
		fi
		[ -n "$label" ] || continue
		c=$(run_one "$line" chronyd)
		g=$(run_one "$line" gnomon)
		read -r _ _ seed _ cok csync _ _ _ _ crms _ <<<"$c"
		read -r _ _ _ _ gok gsync _ _ _ _ grms _ <<<"$g"
		ratio=$(awk -v a="$grms" -v b="$crms" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
		echo "| $label | $seed | $cok | $csync | $crms | $gok | $gsync | $grms | $ratio |"
		n=$((n + 1))
		pc=$(awk -v s="$pc" -v r="$crms" 'BEGIN { printf "%.6e", s + r * r }')
		pg=$(awk -v s="$pg" -v r="$grms" 'BEGIN { printf "%.6e", s + r * r }')
	done
}
echo
echo "checks: chrony's check_sync and check_packet_interval as the scenario sets them (FAIL:sync or"
echo "FAIL:interval says which failed); rms: offset rms of the measured node after convergence; ratio:"
echo "gnomon rms / chronyd rms; pooled: the rms over all seeds of a scenario run on several. Details: $CLK_BUILD/results/LABEL.SEED.IMPL/checks"
