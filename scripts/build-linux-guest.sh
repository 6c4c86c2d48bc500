#!/usr/bin/env bash
# Builds the Linux guest's sidecall client and an initramfs that tests it.
#
# Out of guest-linux/ it builds sidecore.ko against Debian's headers for the
# kernel the AMD-V bed boots (the one in the hwkvm cache), the static
# sidecall-tool, and initramfs.cpio.gz: busybox, both of those, and an /init
# that loads the module with the region the VMM names on the kernel command
# line, runs `sidecall-tool selftest` and `sidecall-tool bench`, and powers
# off, or on any failure says why and crashes the kernel, so that
# `sidecore run --kernel ... --initrd ...` exits non-zero.
#
# Usage: scripts/build-linux-guest.sh [--help] [OUT_DIR]
#   OUT_DIR   where everything goes (default: target/linux-guest in the
#             project); sidecore.ko, sidecall-tool, initramfs.cpio.gz
# Installs what it needs from Debian's packages when missing (needs root):
#   linux-headers-<kver> for the cached kernel, busybox-static, cpio, gcc,
#   make, libc6-dev (static libc).
# Environment: HWKVM_CACHE (kernel cache, default ~/.cache/sidecore/hwkvm:
#   the kernel scripts/hwkvm-vm.sh fetched; its lib/modules/<kver> names
#   the version).
# Guest command line it reads at boot: sidecore.region=0xGPA,0xSIZE (set by
#   the VMM), sidecore.bench_iters=N (bench samples per row; 0 skips the
#   bench; default the tool's 20000), sidecore.console=kmsg (init's output
#   through the kernel log, for a console whose serial interrupt is missing:
#   printk's console writes poll the UART, a tty's wait for THRE interrupts).
# Idempotent: every run rebuilds OUT_DIR's contents from scratch.
set -euo pipefail

say() { echo "build-linux-guest: $*" >&2; }
die() { say "$*"; exit 1; }

out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$out" ] || die "one output directory only (see --help)"; out=$1; shift ;;
  esac
done

project=$(cd "$(dirname "$0")/.." && pwd -P)
src="$project/guest-linux"
out=${out:-$project/target/linux-guest}
# Absolute: kbuild runs from the headers directory.
mkdir -p "$out" && out=$(cd "$out" && pwd -P)
cache=${HWKVM_CACHE:-${HOME:-/root}/.cache/sidecore/hwkvm}
[ -f "$src/sidecore.c" ] || die "no $src/sidecore.c: run this from the project's tree"

# The kernel: the one version under lib/modules in the cache.
[ -d "$cache/kernel/lib/modules" ] ||
  die "no kernel in $cache/kernel: run scripts/hwkvm-vm.sh once (it fetches Debian's stock kernel), or set HWKVM_CACHE"
mapfile -t kvers < <(ls "$cache/kernel/lib/modules")
[ ${#kvers[@]} = 1 ] || die "expected one kernel version in $cache/kernel/lib/modules, found ${#kvers[@]}: ${kvers[*]}"
kver=${kvers[0]}
[ -f "$cache/kernel/boot/vmlinuz-$kver" ] || die "no $cache/kernel/boot/vmlinuz-$kver for lib/modules/$kver"
say "kernel $kver"

# Debian's packages, installed when missing.
# shellcheck source=lib/debian.sh
. "$project/scripts/lib/debian.sh"

kdir=/usr/src/linux-headers-$kver
[ -f "$kdir/Makefile" ] || apt_install "linux-headers-$kver"
[ -f "$kdir/Makefile" ] || die "installed linux-headers-$kver but $kdir/Makefile is missing"
missing=()
command -v gcc >/dev/null || missing+=(gcc)
command -v make >/dev/null || missing+=(make)
command -v cpio >/dev/null || missing+=(cpio)
command -v readelf >/dev/null || missing+=(binutils)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
[ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
is_static /bin/busybox || apt_install busybox-static
is_static /bin/busybox || die "/bin/busybox is not a static binary after installing busybox-static"

# A clean build tree in OUT_DIR: the source tree stays as it is.
rm -rf "$out/build" "$out/root" "$out/sidecore.ko" "$out/sidecall-tool" "$out/initramfs.cpio.gz"
mkdir -p "$out/build"
cp "$src"/{Kbuild,sidecore.c,sidecore.h,sidecall_ring.h,sidecall_uapi.h} "$out/build/"

say "building sidecore.ko against $kdir"
make -s -C "$kdir" M="$out/build" KCFLAGS=-Werror modules >"$out/build/make.log" 2>&1 || {
  cat "$out/build/make.log" >&2
  die "the module did not build (log above, kept in $out/build/make.log)"
}
grep -v '^Skipping BTF generation' "$out/build/make.log" >&2 || true
vermagic=$(modinfo -F vermagic "$out/build/sidecore.ko" 2>/dev/null || true)
case "$vermagic" in
  "$kver "*) ;;
  "") say "cannot read the module's vermagic (no modinfo?); not checked" ;;
  *) die "sidecore.ko says vermagic '$vermagic', not kernel $kver" ;;
esac
cp "$out/build/sidecore.ko" "$out/sidecore.ko"

say "building sidecall-tool (static)"
gcc -static -O2 -Wall -Wextra -Werror -std=gnu11 -o "$out/sidecall-tool" "$src/sidecall-tool.c" ||
  die "sidecall-tool did not build"
is_static "$out/sidecall-tool" || die "sidecall-tool is not static"

say "building the initramfs"
root="$out/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp /bin/busybox "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
  [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
done
# Without its debug information: a tenth of the size.
strip --strip-debug -o "$root/sidecore.ko" "$out/sidecore.ko"
cp "$out/sidecall-tool" "$root/sidecall-tool"
cat > "$root/init" <<'INIT'
#!/bin/sh
# The Linux guest's sidecall test: load sidecore.ko with the VMM's region,
# selftest it on every CPU, benchmark it, power off. Any failure crashes the
# kernel so that the VMM's run exits non-zero.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "sidecore-guest: $*"; }
fail() {
  say "FAILED: $*"
  say "crashing the kernel so that the run exits non-zero"
  # No reset after the panic (the VMM's panic=-1): its report runs to the
  # "end Kernel panic" line, which ends the run whether or not the reset
  # path after it works (under run --kernel in the bed it hung).
  echo 0 > /proc/sys/kernel/panic
  echo c > /proc/sysrq-trigger
  exit 1
}
# The value of KEY= on the kernel command line, if any.
cmdline_value() {
  for w in $(cat /proc/cmdline); do
    case "$w" in "$1"=*) echo "${w#*=}"; return 0 ;; esac
  done
  return 1
}
if [ "$(cmdline_value sidecore.console)" = kmsg ]; then
  echo on > /proc/sys/kernel/printk_devkmsg
  exec > /dev/kmsg 2>&1
fi
say "Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, command line: $(cat /proc/cmdline)"
region=$(cmdline_value sidecore.region) || fail "no sidecore.region= on the kernel command line: the VMM names its shared region there"
if ! insmod /sidecore.ko region="$region"; then
  dmesg | grep -i sidecore | tail -n 5
  fail "insmod /sidecore.ko region=$region failed (the module's messages are above)"
fi
[ -c /dev/sidecall ] || fail "sidecore.ko loaded but /dev/sidecall is missing"
/sidecall-tool info || fail "sidecall-tool info failed"
/sidecall-tool selftest || fail "sidecall-tool selftest failed"
iters=$(cmdline_value sidecore.bench_iters) || iters=""
case "$iters" in
  "") /sidecall-tool bench || fail "sidecall-tool bench failed" ;;
  0) say "bench skipped (sidecore.bench_iters=0)" ;;
  *[!0-9]*) fail "sidecore.bench_iters=$iters is not a number" ;;
  *)
    warmup=$(( iters / 10 )); [ "$warmup" -le 2000 ] || warmup=2000
    /sidecall-tool bench --iters "$iters" --warmup "$warmup" || fail "sidecall-tool bench failed"
    ;;
esac
say "all done, powering off"
poweroff -f
# poweroff -f does not return; if it did, init exiting panics the kernel.
exit 1
INIT
chmod 755 "$root/init"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9 -n) \
  > "$out/initramfs.cpio.gz" || die "cannot pack the initramfs"

say "done: $out/{sidecore.ko,sidecall-tool,initramfs.cpio.gz}"
say "run it: target/release/sidecore run --kernel $cache/kernel/boot/vmlinuz-$kver --initrd $out/initramfs.cpio.gz --cmdline 'console=ttyS0'"
