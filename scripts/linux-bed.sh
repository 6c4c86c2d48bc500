#!/usr/bin/env bash
# Boots Debian's stock kernel under `sidecore run --kernel` inside the AMD-V
# bed (scripts/hwkvm-vm.sh) with the Linux sidecall client (guest-linux/,
# built by scripts/build-linux-guest.sh): the guest loads the module, runs
# its selftest (every answer by sidecall checked against the exit path) and
# its benchmark (null call and CPUID by sidecall, by `vmmcall` and by the
# CPUID instruction), then powers off.
#
# Runs, in one bed:
#   sidecore     --vcpus 1 --sidecore 0
#   sidecore-2   --vcpus 2 --sidecore 0
#   exits-only   --vcpus 1 (no sidecore: the client takes the exit paths)
#   daemon       --vcpus 2 --attach (a `sidecore daemon --cores 0` serves it)
# Each must exit 0 and print `sidecall selftest: ok` (naming the sidecore
# present, or absent without one) and the bench table's four rows.
# Timing in the bed means nothing (TCG): the table says so.
#
# Usage: scripts/linux-bed.sh [--iters N] [--only NAME]
#   --iters N   bench iterations per row inside the guest (default 3000)
#   --only NAME run one of the cases above
# Prints each case's console and a closing line
#   `linux-bed: N passed, N failed`; exit status 0 only if all passed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --inner ]; then
  # Inside the bed.
  kernel=$2 initrd=$3 iters=$4 only=${5:-}
  bin=$(pwd)/target/release/sidecore
  # quiet: every console byte is an exit, ~1 ms under TCG. The soft-lockup
  # and RCU-stall reports are the bed's (guest vCPUs share one inner CPU).
  cmdline="console=ttyS0 quiet nowatchdog rcupdate.rcu_cpu_stall_suppress=1 sidecore.bench_iters=$iters"
  passed=0 failed=0 failures="" extra=""
  check() { # NAME OUT RC WANT-PRESENCE (and $extra: one more line to find)
    local name=$1 out=$2 rc=$3 want=$4 why=""
    [ "$rc" = 0 ] || why="exit status $rc"
    [ -z "$extra" ] || grep -Eq "$extra" "$out" || why="${why:+$why; }no line matching '$extra'"
    grep -q "^sidecall selftest: ok .*sidecore $want" "$out" || why="${why:+$why; }no 'sidecall selftest: ok ... sidecore $want' line"
    for row in "null +sidecall" "null +hypercall" "cpuid +sidecall" "cpuid +cpuid"; do
      grep -Eq "^$row " "$out" || why="${why:+$why; }no bench row '$row'"
    done
    if [ -z "$why" ]; then
      passed=$((passed + 1)); echo "linux-bed: $name: ok"
    else
      failed=$((failed + 1)); failures="$failures $name"; echo "linux-bed: $name: FAILED ($why)" | tee -a /tmp/linux-bed-summary
    fi
  }
  one() { # NAME WANT-PRESENCE ARGS...
    local name=$1 want=$2; shift 2
    [ -z "$only" ] || [ "$only" = "$name" ] || return 0
    local out=/tmp/linux-bed-$name.out
    echo "linux-bed: == $name: sidecore run --kernel $(basename "$kernel") $*"
    set +e
    timeout 900 "$bin" run --kernel "$kernel" --initrd "$initrd" --cmdline "$cmdline" "$@" < /dev/null > "$out" 2>&1
    local rc=$?
    set -e
    sed 's/^/  | /' "$out"
    check "$name" "$out" "$rc" "$want"
  }
  one sidecore present --vcpus 1 --mem 256 --sidecore 0
  one sidecore-2 present --vcpus 2 --mem 256 --sidecore 0
  one exits-only absent --vcpus 1 --mem 256
  if [ -z "$only" ] || [ "$only" = daemon ]; then
    sock=/tmp/linux-bed.sock
    "$bin" daemon --socket "$sock" --cores 0 > /tmp/linux-bed-daemon.log 2>&1 &
    dpid=$!
    for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
    # The daemon must have served the calls: the run's closing line says
    # how many replies the guest got and the daemon counted.
    extra="^attach: the guest got [1-9][0-9]* sidecall replies, the daemon counted [1-9]"
    one daemon present --vcpus 2 --mem 256 --attach "$sock" --name linux-1
    extra=""
    grep -q "linux-bed: daemon: FAILED" /tmp/linux-bed-summary 2>/dev/null && sed 's/^/  daemon| /' /tmp/linux-bed-daemon.log | tail -n 20
    kill "$dpid" 2>/dev/null || true
    wait "$dpid" 2>/dev/null || true
  fi
  echo "linux-bed: $passed passed, $failed failed${failures:+ (failed:$failures)}"
  [ "$failed" = 0 ]
  exit
fi

iters=3000 only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --iters) iters=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "linux-bed: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

echo "linux-bed: building the VMM (cargo build --release)" >&2
cargo build --release -q
kernel=$(scripts/hwkvm-vm.sh --kernel-path)
echo "linux-bed: building the guest's initramfs (scripts/build-linux-guest.sh) for $kernel" >&2
scripts/build-linux-guest.sh target/linux-guest >&2
initrd=$(pwd -P)/target/linux-guest/initramfs.cpio.gz
[ -s "$initrd" ] || { echo "linux-bed: no $initrd after the build" >&2; exit 1; }
t0=$(date +%s)
set +e
scripts/hwkvm-vm.sh --quiet --timeout "${LINUX_BED_TIMEOUT:-3000}" -- "scripts/linux-bed.sh --inner '$kernel' '$initrd' '$iters' '$only'"
rc=$?
set -e
echo "linux-bed: exit $rc after $(( $(date +%s) - t0 )) s" >&2
exit $rc
