#!/usr/bin/env bash
# Builds the guest that tests vhost-user-blk backends with a real client: an
# unmodified Linux (Debian's stock kernel) under QEMU, whose virtio-blk disks
# a backend outside QEMU serves (tests/vhost_user_qemu.rs runs it).
#
# OUT_DIR gets vmlinuz (Debian's linux-image package, unpacked) and
# initrd.gz: busybox, the virtio modules from that package, and an /init that
# runs the job the kernel command line names, prints its results on the
# console as `vub: ...` lines and powers off.
#
# Usage: scripts/build-vhost-guest.sh [--help] [OUT_DIR]
#   OUT_DIR   where vmlinuz and initrd.gz go (default: target/vhost-guest in
#             the project); its absolute path is printed on stdout
# Installs what it needs from Debian's packages when missing (needs root):
#   qemu-system-x86 (qemu-system-x86_64), qemu-system-common
#   (qemu-storage-daemon), busybox-static, cpio; downloads the linux-image
#   package linux-image-amd64 depends on.
# Cached: the kernel is fetched once; the initramfs is rebuilt when this
#   script or the kernel changed. Running it again is cheap and changes nothing.
# Guest command line it reads at boot:
#   vub.job=verify  for every /dev/vd? disk: `vub: disk NAME sectors N md5 M`
#                   (M: md5 of its first MiB); copies that MiB to offset
#                   8 MiB with direct I/O, split over all CPUs (one dd pinned
#                   to each, so that every virtqueue carries requests), then
#                   `vub: copy NAME md5 M` (the copy, read back) and
#                   `vub: irq NAME req.Q N` per virtqueue Q (completion
#                   interrupts during the copy).
#   vub.job=loop    on /dev/vda for vub.secs=N seconds (default 8): copies
#                   MiB k to MiB k+H (H: half the disk), reads it back and
#                   compares, k = 0, 1, ... H-1, 0, ...; `vub: loop ok I` or
#                   `vub: loop FAIL I ...` per iteration, `vub: loop end I`.
#   Every job ends with `vub: done`; a failure prints `vub: error WHY`.
set -euo pipefail

say() { echo "build-vhost-guest: $*" >&2; }
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
out=${out:-$project/target/vhost-guest}
mkdir -p "$out" && out=$(cd "$out" && pwd -P)

# Debian's packages, installed when missing.
apt_updated=0
apt_update() {
  [ $apt_updated = 0 ] || return 0
  say "apt-get update"
  apt-get update -qq || die "apt-get update failed"
  apt_updated=1
}
apt_install() { # PACKAGE...
  [ "$(id -u)" = 0 ] || die "need root to install $* (apt-get install $*), or install them first"
  local p
  for p in "$@"; do
    apt-cache show "$p" >/dev/null 2>&1 || apt_update
  done
  say "installing $* from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
    die "apt-get install $* failed"
}
is_static() { # FILE: an ELF without an interpreter
  [ -x "$1" ] && ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || missing+=(qemu-system-common)
command -v cpio >/dev/null || missing+=(cpio)
command -v readelf >/dev/null || missing+=(binutils)
[ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
is_static /bin/busybox || apt_install busybox-static
is_static /bin/busybox || die "/bin/busybox is not a static binary after installing busybox-static"

# The kernel: the linux-image package Debian's linux-image-amd64 names,
# unpacked once into OUT_DIR/kernel.
kernel="$out/kernel"
if ! compgen -G "$kernel/boot/vmlinuz-*" >/dev/null; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  if [ -z "$pkg" ]; then
    apt_update
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  fi
  [ -n "$pkg" ] || die "apt-cache names no linux-image package for linux-image-amd64 (no Debian package lists?)"
  say "fetching $pkg"
  dl="$out/download"
  rm -rf "$dl" "$kernel" && mkdir -p "$dl"
  (cd "$dl" && apt-get download "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
  dpkg -x "$dl/${pkg}"_*.deb "$kernel.tmp" || die "cannot unpack $dl/${pkg}_*.deb"
  mv "$kernel.tmp" "$kernel" && rm -rf "$dl"
fi
mapfile -t kvers < <(ls "$kernel/lib/modules")
[ ${#kvers[@]} = 1 ] || die "expected one kernel version in $kernel/lib/modules, found ${#kvers[@]}: ${kvers[*]}"
kver=${kvers[0]}
[ -f "$kernel/boot/vmlinuz-$kver" ] || die "no $kernel/boot/vmlinuz-$kver for lib/modules/$kver"
ln -sfn "kernel/boot/vmlinuz-$kver" "$out/vmlinuz"

# The initramfs, unless the one there was built by this script for this kernel.
stamp="$kver $(sha256sum "$0" /bin/busybox | awk '{printf "%s ", $1}')"
if [ -f "$out/initrd.gz" ] && [ "$(cat "$out/initrd.stamp" 2>/dev/null)" = "$stamp" ]; then
  say "up to date: $out/vmlinuz ($kver), $out/initrd.gz"
  echo "$out"
  exit 0
fi

say "building the initramfs for $kver"
root="$out/root"
rm -rf "$root" && mkdir -p "$root"/{bin,dev,proc,sys,mods,tmp}
cp /bin/busybox "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
  [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
done
# In load order: each needs the ones before it.
mods=(virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev virtio/virtio_pci_legacy_dev virtio/virtio_pci block/virtio_blk)
for m in "${mods[@]}"; do
  ko="$kernel/lib/modules/$kver/kernel/drivers/$m.ko"
  [ -f "$ko" ] || die "no $ko: Debian's kernel builds it as a module, is this another configuration?"
  cp "$ko" "$root/mods/"
done
echo "${mods[*]##*/}" > "$root/mods/order"

cat > "$root/init" <<'INIT'
#!/bin/sh
# The vhost-user-blk client test: run the job vub.job= names on the virtio
# disks, print `vub: ...` lines, power off (panic=-1 then ends QEMU).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "vub: $*"; }
finish() { sync; say done; poweroff -f; exit 1; }
fail() { say "error $*"; finish; }
# The value of KEY= on the kernel command line, or $2 when there is none.
arg() {
  for w in $(cat /proc/cmdline); do
    case "$w" in "$1"=*) echo "${w#*=}"; return 0 ;; esac
  done
  echo "$2"
}
uptime_s() { cut -d. -f1 /proc/uptime; }
# md5 of COUNT MiB of DEV from MiB SKIP, read with direct I/O.
md5_mib() { # DEV SKIP COUNT
  dd if="$1" bs=1048576 skip="$2" count="$3" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}

# Interrupts so far per virtqueue of disk $1 (`req.Q N`, summed over the
# CPUs): a queue's completions come on its own MSI-X vector.
irqs() {
  v=$(basename "$(readlink /sys/block/$1/device)")
  awk -v v="$v-req." -v n="$cpus" 'index($NF, v) == 1 {
    s = 0; for (i = 2; i <= n + 1; i++) s += $i
    print substr($NF, length(v) - 3), s }' /proc/interrupts
}

for m in $(cat /mods/order); do
  insmod "/mods/$m.ko" || fail "insmod $m.ko failed"
done
# The disks' probe is asynchronous: give them a moment.
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/block/vda ] && break; sleep 0.2; done
disks=$(ls /sys/block | grep '^vd' || true)
[ -n "$disks" ] || fail "no virtio disk (no /sys/block/vd*)"
cpus=$(nproc)
job=$(arg vub.job verify)
say "start job $job cpus $cpus disks $(echo $disks)"

verify() {
  for d in $disks; do
    sectors=$(cat /sys/block/$d/size)
    [ "$sectors" -ge 18432 ] || fail "$d has $sectors sectors, verify needs 9 MiB"
    say "disk $d sectors $sectors queues $(ls /sys/block/$d/mq | wc -l) md5 $(md5_mib /dev/$d 0 1)"
  done
  for d in $disks; do
    irqs $d > /tmp/irq.$d
    # 16 blocks of 64 KiB, split over the CPUs; block b goes to 128 + b.
    pids=""
    c=0
    while [ $c -lt $cpus ]; do
      from=$(( c * 16 / cpus )); to=$(( (c + 1) * 16 / cpus ))
      if [ $to -gt $from ]; then
        taskset -c $c dd if=/dev/$d of=/dev/$d bs=65536 skip=$from seek=$(( 128 + from )) \
          count=$(( to - from )) iflag=direct oflag=direct 2>/tmp/dd.$c &
        pids="$pids $!"
      fi
      c=$(( c + 1 ))
    done
    for p in $pids; do
      wait $p || fail "dd on $d failed: $(cat /tmp/dd.* | grep -v records | head -n 3)"
    done
    sync
    say "copy $d md5 $(md5_mib /dev/$d 8 1)"
    irqs $d > /tmp/irq.after
    while read -r q n; do
      say "irq $d $q $(( n - $(awk -v q="$q" '$1 == q { print $2 }' /tmp/irq.$d) ))"
    done < /tmp/irq.after
  done
}

loop() {
  secs=$(arg vub.secs 8)
  half=$(( $(cat /sys/block/vda/size) / 4096 ))
  [ $half -ge 1 ] || fail "vda is smaller than 2 MiB"
  end=$(( $(uptime_s) + secs ))
  i=0
  while [ $(uptime_s) -lt $end ]; do
    k=$(( i % half ))
    src=$(md5_mib /dev/vda $k 1)
    if ! dd if=/dev/vda of=/dev/vda bs=1048576 skip=$k seek=$(( k + half )) count=1 \
        iflag=direct oflag=direct 2>/dev/null; then
      say "loop FAIL $i dd MiB $k to $(( k + half )) failed"
    else
      dst=$(md5_mib /dev/vda $(( k + half )) 1)
      if [ "$src" = "$dst" ]; then
        say "loop ok $i"
      else
        say "loop FAIL $i MiB $k md5 $src, its copy reads $dst"
      fi
    fi
    i=$(( i + 1 ))
  done
  say "loop end $i half $half"
}

case "$job" in
  verify) verify ;;
  loop) loop ;;
  *) fail "unknown vub.job=$job (verify or loop)" ;;
esac
finish
INIT
chmod 755 "$root/init"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6 -n) \
  > "$out/initrd.gz.tmp" || die "cannot pack the initramfs"
mv "$out/initrd.gz.tmp" "$out/initrd.gz"
echo "$stamp" > "$out/initrd.stamp"
say "done: $out/vmlinuz ($kver), $out/initrd.gz"
echo "$out"
