#!/usr/bin/env bash
# Soak: the daemon on CPU 0, two well-behaved VMs (selftest, lingering) and
# one chaos VM on CPU 1, for DURATION seconds (default 30). At the end every
# well-behaved VM's counters must reconcile exactly: the replies its guest
# received = the calls the daemon counted for it (nothing lost, nothing
# doubled), and the chaos VM must have got only right answers or errors.
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-30}
case $dur in ''|*[!0-9]*) echo "usage: $0 [DURATION_SECONDS]" >&2; exit 2;; esac
bin=${SIDECORE:-target/release/sidecore}
[ -x "$bin" ] || cargo build --release
dir=$(mktemp -d)
sock=$dir/sidecore.sock
"$bin" daemon --cores 0 --socket "$sock" --idle-park-us 1000 2> "$dir/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
ms=$((dur * 1000))
run() { exec "$bin" run --attach "$sock" --vcpu-cpus 1 "$@"; }
run --workload selftest --arg 0 --arg "$ms" --arg 1 > "$dir/good1.log" 2>&1 & g1=$!
run --workload selftest --arg 0 --arg "$ms" --arg 1 > "$dir/good2.log" 2>&1 & g2=$!
run --workload chaos --arg 0 --arg "$ms" > "$dir/chaos.log" 2>&1 & ch=$!
echo "soak: ${dur}s, daemon pid $daemon, VMMs $g1 $g2 (selftest) $ch (chaos)"
sleep $((dur / 2))
"$bin" status --socket "$sock"
fail=0
for p in $g1 $g2 $ch; do wait "$p" || fail=1; done
for f in good1 good2; do
  echo "== $f"; cat "$dir/$f.log"
  grep -q "selftest: ok" "$dir/$f.log" || { echo "soak: $f failed"; fail=1; }
  line=$(grep "^attach: " "$dir/$f.log" || true)
  got=$(echo "$line" | awk '{print $5}'); counted=$(echo "$line" | awk '{print $11}')
  if [ -z "$got" ] || [ "$got" != "$counted" ]; then echo "soak: $f does not reconcile: $line"; fail=1;
  else echo "soak: $f reconciles: $got replies received = $counted counted by the daemon"; fi
done
echo "== chaos"; cat "$dir/chaos.log"
grep -q ", 0 wrong)" "$dir/chaos.log" || { echo "soak: chaos VM got a wrong answer"; fail=1; }
kill -0 $daemon 2>/dev/null || { echo "soak: the daemon died"; fail=1; }
"$bin" status --socket "$sock" > /dev/null || fail=1
[ $fail = 0 ] && echo "soak: ok" || echo "soak: FAILED"
exit $fail
