#!/usr/bin/env bash
# Checks that this host can run Sidecore well: /dev/kvm access, the KVM
# backend, online and isolated CPUs, and the CPU frequency governor.
set -u
ok=1
if [ ! -e /dev/kvm ]; then
  echo "FAIL /dev/kvm does not exist — load kvm_intel, kvm_amd or kvm_pvm"; ok=0
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "FAIL /dev/kvm: permission denied — add your user to group kvm (sudo usermod -aG kvm \$USER) and log in again"; ok=0
else
  echo "ok   /dev/kvm is usable"
fi
for m in kvm_pvm kvm_intel kvm_amd; do
  [ -d /sys/module/$m ] && echo "ok   backend module $m loaded"
done
echo "info online CPUs:   $(cat /sys/devices/system/cpu/online 2>/dev/null)"
iso=$(cat /sys/devices/system/cpu/isolated 2>/dev/null)
if [ -z "$iso" ]; then
  echo "warn no isolated CPUs — for stable sidecore latency boot with isolcpus=N nohz_full=N rcu_nocbs=N"
else
  echo "ok   isolated CPUs: $iso (give them to --sidecore)"
fi
gov=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || true)
[ -n "$gov" ] && [ "$gov" != performance ] && echo "warn CPU governor is '$gov' — 'performance' gives steadier numbers"
[ $ok = 1 ]
