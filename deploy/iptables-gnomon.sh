#!/bin/sh
# gnomon on a host still managed with iptables: open UDP 123 and skip conntrack for it.
# The accept is inserted at the top of the host's INPUT chain (-I): appended after a final
# DROP or REJECT rule it would never be reached. Running the script twice adds nothing (-C).
# On a host managed with nftables (/etc/nftables.conf), do not use this: iptables-nft writes
# into tables of its own (ip filter, ip6 filter), and an accept there does not override a drop
# in the host's inet filter input chain; see nftables-gnomon.conf.
set -e
for ipt in iptables ip6tables; do
  $ipt -t raw -C PREROUTING -p udp --dport 123 -j NOTRACK 2>/dev/null ||
    $ipt -t raw -I PREROUTING -p udp --dport 123 -j NOTRACK
  $ipt -t raw -C OUTPUT -p udp --sport 123 -j NOTRACK 2>/dev/null ||
    $ipt -t raw -I OUTPUT -p udp --sport 123 -j NOTRACK
  $ipt -C INPUT -p udp --dport 123 -j ACCEPT 2>/dev/null ||
    $ipt -I INPUT -p udp --dport 123 -j ACCEPT
done
