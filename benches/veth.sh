# benches/veth.sh: the veth pair between two network namespaces that benches/xdp.sh and
# benches/nts-e2e.sh (VETH=1) measure on (sourced, not run). The server's end lives in NS_S with
# SERVER, the generator's in NS_C with CLIENT: 198.18.0.0/15 only (RFC 2544), on interfaces that
# exist only inside the namespaces. veth_up makes them, veth_down deletes them (callers trap it).
# Reads ROOT, OUT, PROFILE, GEN_CPU, COALESCE_US, INJECT (see benches/xdp.sh) and GEN_XDP:
# gnomon-load sends and receives through AF_XDP on CDEV (`--xdp`, see gen_flags).

SERVER=198.18.0.1
CLIENT=198.18.0.2
# Short, unique device names: a threaded NAPI's kernel thread is `napi/DEV-ID`, its name cut at
# 15 characters, and is found (to pin it) by that name.
SDEV=bs$$
CDEV=bc$$
# INJECT=xdp: the generator's own pair, GDEV (its address) and RDEV (the redirecting end).
GDEV=bg$$
RDEV=br$$
NS_S=gnomon-bench-s$$
NS_C=gnomon-bench-c$$
INJECT_PID=
INJECT=${INJECT:-}
COALESCE_US=${COALESCE_US:-0}
GEN_XDP=${GEN_XDP:-}

# gen_flags: the flags that put gnomon-load on the generator's side of the pair.
gen_flags() {
    printf '%s\n' --allow-remote
    if [[ -n $GEN_XDP ]]; then printf '%s\n' --xdp "$CDEV"; fi
}

# ethtool_set NS DEV CMD VALUE: one ETHTOOL_S* ioctl (ethtool itself need not be installed).
ethtool_set() {
    ip netns exec "$1" python3 - "$2" "$3" "$4" <<'EOF'
import ctypes, fcntl, socket, struct, sys
dev, cmd, val = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3])
ev = ctypes.create_string_buffer(struct.pack("II", cmd, val))
ifr = struct.pack("16sP", dev.encode(), ctypes.addressof(ev)) + b"\0" * 16
fcntl.ioctl(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 0x8946, ifr)  # SIOCETHTOOL
EOF
}

# pin_napi DEV CPU: pins DEV's NAPI threads. Attaching or detaching XDP makes veth's NAPI
# again, with new threads, so this runs after every server start.
pin_napi() {
    local dev=$1 cpu=$2 pid comm n=0
    while read -r pid comm; do
        if [[ $comm == "napi/$dev-"* ]]; then
            taskset -p -c "$cpu" "$pid" >/dev/null
            n=$((n + 1))
        fi
    done < <(ps -eo pid=,comm=)
    if [[ $n == 0 ]]; then
        echo "!! no NAPI thread of $dev found to pin" >&2
    fi
}

# veth_down: the namespaces (and their interfaces) go, with the INJECT redirector.
veth_down() {
    stop_pids "$INJECT_PID"
    ip netns del "$NS_S" 2>/dev/null
    ip netns del "$NS_C" 2>/dev/null
    true
}

# veth_up: both namespaces, the pair, each end's receive work in its own NAPI thread.
veth_up() {
    if [[ -n $GEN_XDP && $INJECT == xdp ]]; then
        echo "GEN_XDP=1 and INJECT=xdp do not go together: INJECT's generator address is not on CDEV" >&2
        exit 1
    fi
    echo "== namespaces $NS_S ($SDEV $SERVER) and $NS_C ($CDEV $CLIENT)" >&2
    ip netns add "$NS_S"
    ip netns add "$NS_C"
    ip -n "$NS_S" link add "$SDEV" numrxqueues 1 numtxqueues 1 type veth peer name "$CDEV" \
        numrxqueues 1 numtxqueues 1 netns "$NS_C"
    ip -n "$NS_S" addr add "$SERVER/24" dev "$SDEV"
    if [[ $INJECT == xdp ]]; then
        # The client's address lives on GDEV; CDEV carries no address but GDEV's MAC, so the
        # replies (sent to the request's source MAC) are the namespace's own when they reach CDEV.
        ip -n "$NS_C" link add "$GDEV" numrxqueues 1 numtxqueues 1 type veth peer name "$RDEV" \
            numrxqueues 1 numtxqueues 1
        ip -n "$NS_C" addr add "$CLIENT/24" dev "$GDEV"
        ip -n "$NS_C" link set "$CDEV" address "$(ip -n "$NS_C" -br link show "$GDEV" | awk '{print $3}')"
        # ARP through the redirect would be answered to CDEV, not GDEV: the server's MAC is given.
        ip -n "$NS_C" neigh add "$SERVER" lladdr "$(ip -n "$NS_S" -br link show "$SDEV" | awk '{print $3}')" \
            dev "$GDEV" nud permanent
        # Replies come in on CDEV for an address of GDEV: no reverse-path filter.
        ip netns exec "$NS_C" sh -c "for d in all default $CDEV $GDEV; do sysctl -qw net.ipv4.conf.\$d.rp_filter=0; done"
        ip -n "$NS_C" link set "$GDEV" up
        ip -n "$NS_C" link set "$RDEV" up
    else
        ip -n "$NS_C" addr add "$CLIENT/24" dev "$CDEV"
    fi
    for ns in "$NS_S" "$NS_C"; do ip -n "$ns" link set lo up; done
    ip -n "$NS_S" link set "$SDEV" up
    ip -n "$NS_C" link set "$CDEV" up

    ETHTOOL_STXCSUM=0x17
    ETHTOOL_SGRO=0x2c
    ETHTOOL_STSO=0x1f
    # GRO gives each veth end a NAPI even without XDP (so the receive work can be a thread).
    ethtool_set "$NS_S" "$SDEV" $ETHTOOL_SGRO 1
    ethtool_set "$NS_C" "$CDEV" $ETHTOOL_SGRO 1
    # veth_xmit hands a frame to the peer's NAPI only if the frame "could be aggregated": the sending
    # end has TSO off, or (a UDP socket's frame) the peer forwards UDP GRO. Otherwise it goes through
    # netif_rx, whose backlog runs on the sender's core: the generator's receive of every reply
    # would be charged to the server's core (seen: 30% of AF_XDP's profile), and a kernel-socket
    # server's receive of every request to the generator's. TSO off on both ends (nothing here
    # sends more than one MTU) keeps each side's receive work in its own pinned NAPI thread.
    ethtool_set "$NS_S" "$SDEV" $ETHTOOL_STSO 0
    ethtool_set "$NS_C" "$CDEV" $ETHTOOL_STSO 0
    # A veth peer with TX checksum offload sends UDP checksums that hold only the pseudo-header sum
    # (CHECKSUM_PARTIAL); the AF_XDP path would drop them as wrong. Off for every server alike.
    ethtool_set "$NS_C" "$CDEV" $ETHTOOL_STXCSUM 0
    if [[ -n $GEN_XDP ]]; then
        # The same for the replies, which reach the generator's AF_XDP socket as frames: it
        # checks their checksums as the server's path does. (A NIC fills them in on the wire.)
        ethtool_set "$NS_S" "$SDEV" $ETHTOOL_STXCSUM 0
    fi
    ip netns exec "$NS_S" sh -c "echo 1 > /sys/class/net/$SDEV/threaded"
    if [[ $COALESCE_US != 0 ]]; then
        ip netns exec "$NS_S" sh -c "echo 2 > /sys/class/net/$SDEV/napi_defer_hard_irqs &&
            echo $((COALESCE_US * 1000)) > /sys/class/net/$SDEV/gro_flush_timeout"
    fi
    ip netns exec "$NS_C" sh -c "echo 1 > /sys/class/net/$CDEV/threaded"
    if [[ $INJECT == xdp ]]; then
        # As CDEV: full checksums, no TSO (frames to the peer's NAPI), a NAPI thread of its own.
        ethtool_set "$NS_C" "$GDEV" $ETHTOOL_STSO 0
        ethtool_set "$NS_C" "$GDEV" $ETHTOOL_STXCSUM 0
        ethtool_set "$NS_C" "$RDEV" $ETHTOOL_SGRO 1
        ip netns exec "$NS_C" sh -c "echo 1 > /sys/class/net/$RDEV/threaded"
        ip netns exec "$NS_C" taskset -c "$GEN_CPU" "$ROOT/target/$PROFILE/examples/xdp_redirect" "$RDEV" "$CDEV" \
            >"$OUT/xdp-redirect.log" 2>&1 &
        INJECT_PID=$!
        sleep 1
        kill -0 "$INJECT_PID" 2>/dev/null || { echo "xdp_redirect did not start: $(cat "$OUT/xdp-redirect.log")" >&2; exit 1; }
    fi
}
