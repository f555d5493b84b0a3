#!/usr/bin/env python3
"""benches/t2-offset.py: how late a server's T2 (the reply's receive timestamp) is against the
moment its request entered the wire, run in the client's namespace of benches/xdp.sh (T2=1).

Usage: t2-offset.py DEV SERVER_IP [COUNT [GAP_MS]]

The wire reference is the client's own veth end: a packet socket on DEV sees each request as it
leaves (dev_queue_xmit_nit stamps the copy it hands to taps, on the same CLOCK_REALTIME as the
kernel's receive stamps). Veth hands the frame to the server's end right after that, so
T2 - T_wire is the time from "on the wire" to wherever the server takes T2: in the XDP
program (bpf_ktime_get_tai_ns, AF_XDP) or at the kernel's skb receive stamp (SO_TIMESTAMPNS,
kernel sockets), each plus the server's NAPI thread being scheduled. Both servers are
measured against the same reference on the same veth pair, one request at a time (GAP_MS
apart, so no queueing), and requests are paired with replies by their transmit timestamp,
which the reply carries back as its origin. Both clocks are the one system clock: gnomon
serves it uncorrected at local stratum 1, chronyd -x likewise.

Prints count, min, median, p90, p99, max of T2 - T_wire in microseconds, and a JSON line.
Bounded: COUNT requests (default 2000), 200 ms per reply at most.
"""
import json
import os
import socket
import struct
import sys
import time

dev, server = sys.argv[1], sys.argv[2]
count = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
gap = (float(sys.argv[4]) if len(sys.argv) > 4 else 1.0) / 1000.0

NTP_UNIX = 2208988800
SO_TIMESTAMPNS = 35
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4

tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
tap.bind((dev, ETH_P_ALL))
tap.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
tap.settimeout(0.2)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(0.2)


def ntp_to_ns(b):
    sec, frac = struct.unpack("!II", b)
    return (sec - NTP_UNIX) * 1_000_000_000 + (frac * 1_000_000_000 >> 32)


def wire_stamp(key):
    """The tap's stamp of our outgoing request whose transmit timestamp is `key`."""
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        try:
            data, anc, _, addr = tap.recvmsg(2048, 64)
        except socket.timeout:
            return None
        if addr[2] != PACKET_OUTGOING or data[12:14] != b"\x08\x00" or len(data) < 14 + 20 + 8 + 48:
            continue
        ihl = (data[14] & 0x0F) * 4
        ntp = data[14 + ihl + 8:]
        if len(ntp) < 48 or ntp[40:48] != key:
            continue
        for level, kind, val in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                s, ns = struct.unpack("qq", val[:16])
                return s * 1_000_000_000 + ns
    return None


deltas, lost = [], 0
for i in range(count):
    # A unique transmit timestamp: the key that pairs the tap's copy, the request and its reply.
    key = struct.pack("!II", 0x8000_0000 | i, os.getpid() & 0xFFFFFFFF)
    req = bytes([0x23]) + bytes(39) + key
    udp.sendto(req, (server, 123))
    t_wire = wire_stamp(key)
    t2 = None
    try:
        while True:
            rep, _ = udp.recvfrom(512)
            if len(rep) >= 48 and rep[24:32] == key:
                t2 = ntp_to_ns(rep[32:40])
                break
    except socket.timeout:
        pass
    if t_wire is None or t2 is None:
        lost += 1
    else:
        deltas.append((t2 - t_wire) / 1000.0)
    time.sleep(gap)

deltas.sort()


def q(p):
    return deltas[min(len(deltas) - 1, int(p * len(deltas)))] if deltas else float("nan")


r = {
    "count": len(deltas),
    "lost": lost,
    "min_us": deltas[0] if deltas else None,
    "p50_us": q(0.5),
    "p90_us": q(0.9),
    "p99_us": q(0.99),
    "max_us": deltas[-1] if deltas else None,
}
print(
    f"T2 - T_wire over {r['count']} requests ({lost} lost): min {r['min_us']:.1f} us, "
    f"median {r['p50_us']:.1f}, p90 {r['p90_us']:.1f}, p99 {r['p99_us']:.1f}, max {r['max_us']:.1f}"
    if deltas
    else f"no pairs ({lost} lost)"
)
print(json.dumps(r))
