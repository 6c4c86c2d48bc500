#!/usr/bin/env bash
# Soak: the daemon on CPU 0, two well-behaved VMs (selftest, lingering on
# null sidecalls) and one chaos VM, all vCPUs on CPU 1, for DURATION seconds
# (default 30).
#
# The run alternates two conditions in short phases (PHASE_MS, default 500):
#   A: the chaos VM runs and floods/garbles its ring;
#   B: the chaos VM is stopped (SIGSTOP): the well-behaved VMs run alone.
# Each well-behaved VMM splits its guest's own round-trip histogram at every
# phase change (run --latency-phases, SIGUSR1), so both conditions see the
# same floor levels, which move between phases on this kind of host.
#
# At the end:
#   - every well-behaved VM reconciles exactly: the replies its guest
#     received = the calls the daemon counted for it (nothing lost, nothing
#     doubled), and its selftest passed;
#   - the chaos VM got only right answers or error statuses;
#   - each well-behaved VM's p99 with chaos is within 2x of its p99 without;
#   - the daemon is alive and answers status.
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-30}
phase_ms=${PHASE_MS:-500}
case $dur in '' | *[!0-9]*) echo "usage: $0 [DURATION_SECONDS]  (env PHASE_MS, SIDECORE)" >&2; exit 2 ;; esac
[ "$dur" -ge 4 ] || { echo "soak: DURATION must be at least 4 s" >&2; exit 2; }
bin=${SIDECORE:-target/release/sidecore}
[ -x "$bin" ] || cargo build --release
dir=$(mktemp -d)
sock=$dir/sidecore.sock
"$bin" daemon --cores 0 --socket "$sock" --idle-park-us 1000 2> "$dir/daemon.log" &
daemon=$!
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -CONT "$p" 2> /dev/null || true; kill "$p" 2> /dev/null || true; done
  kill $daemon 2> /dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "soak: the daemon did not open $sock"; cat "$dir/daemon.log"; exit 1; }

# The VMs run a little longer than the phases, so every phase is full.
ms=$(((dur + 2) * 1000))
run() { exec "$bin" run --attach "$sock" --vcpu-cpus 1 "$@"; }
run --workload selftest --arg 0 --arg "$ms" --arg 1 --latency-phases > "$dir/good1.log" 2>&1 &
g1=$!
run --workload selftest --arg 0 --arg "$ms" --arg 1 --latency-phases > "$dir/good2.log" 2>&1 &
g2=$!
run --workload chaos --arg 0 --arg "$ms" > "$dir/chaos.log" 2>&1 &
ch=$!
pids=($g1 $g2 $ch)
echo "soak: ${dur}s in ${phase_ms} ms phases, daemon pid $daemon, VMMs $g1 $g2 (selftest) $ch (chaos)"

# Signal only once all three are attached (their handlers are in place).
n=0
for _ in $(seq 400); do
  n=$("$bin" status --json --socket "$sock" 2> /dev/null | grep -o '"pid"' | wc -l || true)
  [ "$n" -ge 3 ] && break
  sleep 0.05
done
[ "$n" -ge 3 ] || { echo "soak: only $n of 3 VMs attached"; exit 1; }

phase_s=$(awk "BEGIN { print $phase_ms / 1000 }")
phases=$((dur * 1000 / phase_ms / 2))
for i in $(seq "$phases"); do
  sleep "$phase_s"                  # condition A: chaos running
  kill -STOP $ch                    # end A with the chaos VM stopped...
  kill -USR1 $g1 $g2                # ...so B never sees it
  sleep "$phase_s"                  # condition B: chaos stopped
  kill -USR1 $g1 $g2                # end B before the chaos VM resumes
  kill -CONT $ch
  if [ $((i % 10)) = 0 ]; then echo "soak: $((i * 2)) of $((phases * 2)) phases" >&2; fi
done
"$bin" status --socket "$sock"

fail=0
for p in $g1 $g2 $ch; do wait "$p" || fail=1; done
pids=()
p99() { # condition, log: the p99 in ns
  sed -n "s/^latency: condition $1: .* p99 \([0-9]*\) ns.*/\1/p" "$2"
}
for f in good1 good2; do
  echo "== $f"
  cat "$dir/$f.log"
  grep -q "selftest: ok" "$dir/$f.log" || { echo "soak: $f failed"; fail=1; }
  line=$(grep "^attach: " "$dir/$f.log" || true)
  got=$(echo "$line" | awk '{print $5}')
  counted=$(echo "$line" | awk '{print $11}')
  if [ -z "$got" ] || [ "$got" != "$counted" ]; then
    echo "soak: $f does not reconcile: $line"
    fail=1
  else
    echo "soak: $f reconciles: $got replies received = $counted counted by the daemon, 0 lost, 0 doubled"
  fi
  with=$(p99 A "$dir/$f.log")
  without=$(p99 B "$dir/$f.log")
  if [ -z "$with" ] || [ -z "$without" ]; then
    echo "soak: $f reported no latency phases"
    fail=1
  elif [ "$with" -le $((2 * without)) ]; then
    echo "soak: $f p99 with chaos ${with} ns, without ${without} ns: within 2x"
  else
    echo "soak: $f p99 with chaos ${with} ns, without ${without} ns: MORE than 2x"
    fail=1
  fi
done
echo "== chaos"
cat "$dir/chaos.log"
grep -q ", 0 wrong)" "$dir/chaos.log" || { echo "soak: chaos VM got a wrong answer"; fail=1; }
kill -0 $daemon 2> /dev/null || { echo "soak: the daemon died"; fail=1; }
"$bin" status --socket "$sock" > /dev/null || { echo "soak: the daemon does not answer status"; fail=1; }
if [ $fail = 0 ]; then echo "soak: ok"; else echo "soak: FAILED"; fi
exit $fail
