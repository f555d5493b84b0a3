#!/usr/bin/env python3
"""benches/perf-areas.py: where the server core's time went, by area, from `perf record -g -C CPU`.

Usage: perf script -i OUT/NAME.perf.data -F comm,pid,ip,sym | benches/perf-areas.py SDEV PID [REPLIES]

The server is process PID and the NAPI threads of SDEV (its veth end); everything else that ran
on the core (a compiler on a shared machine) is counted apart and left out.

Each sample is put in one area by the frames of its call chain (the first rule that matches,
in the order below), so the areas add up to 100% of the samples taken on the core. Idle
(swapper in a cpuidle/halt frame) is counted apart and left out of the busy percentages. With
REPLIES (replies during the perf window), each area is also shown in us per reply, assuming the
default cpu-clock sampling period of perf record (-F 4000: 250 us per sample; PERIOD_US=...
for another).
"""
import os
import sys

sdev = sys.argv[1]
pid = sys.argv[2]
replies = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
period_us = float(os.environ.get("PERIOD_US", "250"))

# (area, predicate over (comm, frames root->leaf as a set and list)). First match wins.
def has(*names):
    return lambda comm, s, l: any(n in s for n in names)

def prefix(p):
    return lambda comm, s, l: any(f.startswith(p) for f in l)

def both(a, b):
    return lambda comm, s, l: a(comm, s, l) and b(comm, s, l)


XSK_TX = has("xsk_sendmsg", "__xsk_generic_xmit", "xsk_generic_xmit")

RULES = [
    ("idle", has("default_idle", "cpuidle_enter_state", "do_idle", "pv_native_safe_halt", "acpi_safe_halt")),
    ("client's receive of replies (netif_rx backlog: generator work on the server core)", has("process_backlog")),
    # The XDP receive path: veth's NAPI poll on the server's end.
    ("veth NAPI: XDP program", prefix("bpf_prog_")),
    ("veth NAPI: skb -> xdp_buff copy (veth_convert_skb_to_xdp_buff)",
     has("veth_convert_skb_to_xdp_buff", "skb_pp_cow_data")),
    ("veth NAPI: AF_XDP receive copy into UMEM (xsk_rcv)", has("__xsk_rcv", "xsk_rcv", "__xsk_map_redirect", "__xsk_rcv_zc", "xp_alloc")),
    ("veth NAPI: waking the worker (xsk_flush / sock_def_readable)", has("xsk_flush", "sock_def_readable", "try_to_wake_up")),
    ("veth NAPI: kernel IP/UDP receive (kernel-socket servers)", has("ip_rcv", "__udp4_lib_rcv", "udp_rcv", "__netif_receive_skb_one_core", "netif_receive_skb_list_internal", "gro_receive_skb", "napi_gro_receive")),
    ("veth NAPI: rest (ptr_ring, skb/page free, poll loop)", has("veth_poll", "veth_xdp_rcv", "napi_threaded_poll")),
    # The AF_XDP transmit path (copy mode): sendto or poll -> __xsk_generic_xmit -> veth_xmit.
    ("TX: skb alloc + copy from UMEM (xsk_build_skb)", both(XSK_TX, has("xsk_build_skb", "__alloc_skb", "sock_alloc_send_pskb", "skb_store_bits"))),
    ("TX: veth_xmit to the peer", both(XSK_TX, has("veth_xmit", "__dev_direct_xmit"))),
    ("TX: rest of the kick (xsk_sendmsg / generic xmit)", XSK_TX),
    # Kernel-socket servers' sends.
    ("kernel UDP send (sendmsg/sendmmsg/io_uring)", has("udp_sendmsg", "ip_finish_output2", "dev_hard_start_xmit", "ip_output", "__sys_sendmmsg", "io_sendmsg", "io_send")),
    ("kernel UDP receive syscall (recvmsg/recvmmsg/io_uring)", has("udp_recvmsg", "__skb_recv_udp", "io_recvmsg", "__sys_recvmmsg", "do_recvmmsg")),
    ("scheduler: sleeping and switching", has("__schedule", "schedule", "finish_task_switch", "schedule_hrtimeout_range")),
    ("poll/epoll/io_uring wait (not sleeping)", has("do_sys_poll", "__x64_sys_poll", "do_epoll_wait", "io_cqring_wait", "xsk_poll")),
    ("other syscalls and entry", has("entry_SYSCALL_64_after_hwframe", "do_syscall_64")),
    ("timers, IRQs, softirqs (other)", has("hrtimer_interrupt", "sysvec_apic_timer_interrupt", "handle_softirqs", "irq_exit_rcu")),
]

counts = {}
total = 0


def classify(comm, p, frames):
    if not (p == pid or comm.startswith("napi/" + sdev) or comm == "swapper"):
        # Another process on the core (a compiler on a shared machine): not the server's cost.
        if has("default_idle", "do_idle")(comm, set(frames), frames):
            return "idle"
        return "other processes on the core (not the server)"
    s = set(frames)
    for area, pred in RULES:
        if pred(comm, s, frames):
            return area
    if comm.startswith("napi/"):
        return "veth NAPI: rest (ptr_ring, skb/page free, poll loop)"
    return "server user space (gnomon/chronyd code, vDSO clock reads)"


def flush(head, frames):
    global total
    if head is None:
        return
    comm, p = head
    area = classify(comm, p, frames)
    counts[area] = counts.get(area, 0) + 1
    total += 1


head, frames = None, []
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line.strip():
        flush(head, frames[::-1])
        head, frames = None, []
        continue
    if not line.startswith((" ", "\t")):
        flush(head, frames[::-1])
        # "COMM PID" (a comm may hold spaces; the pid is the last field).
        parts = line.split()
        head, frames = (" ".join(parts[:-1]), parts[-1]), []
        continue
    f = line.split()
    if len(f) >= 2:
        frames.append(f[1].split("+")[0])
flush(head, frames[::-1])

idle = counts.pop("idle", 0)
other = counts.get("other processes on the core (not the server)", 0)
busy = total - idle
ours = busy - other
print(f"samples: {total} ({idle} idle, {other} other processes, {ours} the server's)")
print(f"{'area':<84} {'% of server':>11}" + (f" {'us/reply':>9}" if replies else ""))
for area, n in sorted(counts.items(), key=lambda kv: -kv[1]):
    if area.startswith("other processes"):
        continue
    pct = 100.0 * n / max(ours, 1)
    extra = f" {n * period_us / replies:>9.3f}" if replies else ""
    print(f"{area:<84} {pct:>10.1f}%" + extra)
if replies:
    print(f"{'total (the server: its threads, its NAPI, and what runs in them)':<84} {'100.0%':>11} {ours * period_us / replies:>9.3f}")
