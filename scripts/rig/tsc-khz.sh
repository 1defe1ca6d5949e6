#!/usr/bin/env bash
# Print the host's TSC frequency in kHz, for the guest's `tsc_early_khz=` (QEMU microvm
# has no HPET, and under TCG the guest's rdtsc is the host's, so the guest needs the host
# rate or it hangs calibrating). Methods, first that works:
#   1. /sys/devices/system/cpu/cpu0/tsc_freq_khz (only some kernels have it; not this one)
#   2. the kernel log: "tsc: Refined TSC clocksource calibration: N MHz", else
#      "tsc: Detected N MHz processor|TSC" (dmesg needs root; the boot lines can age out
#      of the ring buffer on a long-running host, then journalctl -k -b is tried)
#   3. /proc/cpuinfo "cpu MHz" when the CPU has constant_tsc (exact on VMs with
#      tsc_known_freq, close enough on bare metal at nominal clock)
set -euo pipefail
f=/sys/devices/system/cpu/cpu0/tsc_freq_khz
if [ -r "$f" ]; then cat "$f"; exit 0; fi

to_khz() { awk '{ printf "%d\n", $1 * 1000 + 0.5 }'; }
log=$( { dmesg 2>/dev/null || true; journalctl -k -b -q --no-pager 2>/dev/null || true; } )
mhz=$(sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p' <<<"$log" | tail -n 1)
[ -n "$mhz" ] || mhz=$(sed -n 's/.*tsc: Detected \([0-9.]*\) MHz.*/\1/p' <<<"$log" | tail -n 1)
if [ -n "$mhz" ]; then to_khz <<<"$mhz"; exit 0; fi

if grep -qw constant_tsc /proc/cpuinfo; then
    mhz=$(sed -n 's/^cpu MHz[[:space:]]*: *//p' /proc/cpuinfo | head -n 1)
    if [ -n "$mhz" ]; then to_khz <<<"$mhz"; exit 0; fi
fi
echo "cannot determine the host TSC frequency" >&2
exit 1
