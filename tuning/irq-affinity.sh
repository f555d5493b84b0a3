#!/usr/bin/env bash
# Bind each RX/TX queue IRQ of a NIC to one CPU in turn (queue i -> CPU i mod ncpu), for
# `steering = "cpu"`. Usage: tuning/irq-affinity.sh eth0   (as root; irqbalance must be stopped)
set -euo pipefail
dev=${1:?usage: $0 IFACE}
ncpu=$(nproc)
i=0
grep -E "${dev}(-|:)" /proc/interrupts | while read -r line; do
  irq=${line%%:*}
  irq=${irq// /}
  cpu=$((i % ncpu))
  echo "$cpu" > "/proc/irq/$irq/smp_affinity_list"
  echo "irq $irq ($(echo "$line" | awk '{print $NF}')) -> cpu $cpu"
  i=$((i + 1))
done
