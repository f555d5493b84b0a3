#!/usr/bin/env bash
# Started for every simulated node (through the launcher). Nodes named in GNOMON_NODES run
# gnomon with a config translated from the chrony config that test.common wrote for them;
# every other node runs the original command (chronyd) under clknetsim. Started from
# ../shared/clknetsim/node.sh; this copy follows gnomon's config keys.
node=$CLKNETSIM_NODE
# Without clknetsim preloaded, chronyd (run as root here) would steer the real clock.
case $MT_SAVED_PRELOAD in
*clknetsim.so*) ;;
*)
	echo "node.sh: clknetsim is not preloaded; refusing to run $1 on the real clock" >&2
	exit 1
	;;
esac
if [[ " $GNOMON_NODES " != *" $node "* ]]; then
	LD_PRELOAD=$MT_SAVED_PRELOAD exec "$@"
fi
conf=""
while [ $# -gt 0 ]; do [ "$1" = -f ] && conf=$2; shift; done
dir=$(dirname "$conf")
out=$dir/gnomon.$node.toml
{
	echo 'listen = ["0.0.0.0:123"]'
	echo 'workers = 1'
	echo 'io = "mmsg"'
	echo 'steering = "hash"'
	echo "control_socket = \"$PWD/$dir/gnomon.$node.sock\""
	if grep -q '^local stratum' "$conf"; then
		echo "local_stratum = $(awk '/^local stratum/ {print $3}' "$conf")"
	fi
	if grep -q '^server ' "$conf"; then
		echo "clock_mode = \"${GNOMON_CLOCK_MODE:-system}\""
	fi
	grep '^server ' "$conf" | while read -r _ addr opts; do
		echo '[[upstream]]'
		echo "address = \"$addr\""
		set -- $opts
		while [ $# -gt 0 ]; do
			case $1 in
			iburst) echo 'iburst = true';;
			prefer) echo 'prefer = true';;
			trust) echo 'trust = true';;
			minpoll|maxpoll) echo "$1 = $2"; shift;;
			*) echo "# ignored chrony option: $1" ;;
			esac
			shift
		done
	done
	# chronyd without makestep never steps; gnomon's default (chrony's recommended 1.0 3) would.
	echo '[makestep]'
	if grep -q '^makestep ' "$conf"; then
		awk '/^makestep / { print "threshold = " $2 + 0; print "limit = " $3 }' "$conf"
	else
		echo 'limit = 0'
	fi
	grep -v -E '^(server |local stratum|makestep |pidfile|allow|cmdallow|bindcmdaddress|deny|#|$)' "$conf" | sed 's/^/# ignored chrony directive: /'
} > "$out"
export LD_PRELOAD=$CLK_BUILD/mtshim.so:$MT_SAVED_PRELOAD
exec "$GNOMON" serve -c "$out" --io mmsg --workers 1
