#!/bin/sh
# The same as nftables-gnomon.conf for hosts still on iptables: open UDP 123, skip conntrack.
set -e
for ipt in iptables ip6tables; do
  $ipt -t raw -A PREROUTING -p udp --dport 123 -j NOTRACK
  $ipt -t raw -A OUTPUT -p udp --sport 123 -j NOTRACK
  $ipt -A INPUT -p udp --dport 123 -j ACCEPT
done
