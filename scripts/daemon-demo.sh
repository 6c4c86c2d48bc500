#!/usr/bin/env bash
# The daemon in one go: start it on CPU 0, attach three VMMs running the
# selftest on CPU 1, SIGKILL one of them mid-run, show `sidecore status`,
# let the others finish, show the daemon's idle CPU use, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${SIDECORE:-target/release/sidecore}
[ -x "$bin" ] || cargo build --release
sock=$(mktemp -u /tmp/sidecore-demo.XXXXXX.sock)
"$bin" daemon --cores 0 --socket "$sock" --idle-park-us 1000 &
daemon=$!
trap 'kill $daemon 2>/dev/null || true; rm -f "$sock"' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
run() { exec "$bin" run --attach "$sock" --vcpu-cpus 1 --workload selftest --arg 0 --arg "$1"; }
run 2500 > /tmp/sidecore-demo-a.log 2>&1 & a=$!
run 2500 > /tmp/sidecore-demo-b.log 2>&1 & b=$!
run 20000 > /tmp/sidecore-demo-c.log 2>&1 & c=$!
sleep 1.2
echo "== killing VMM $c (SIGKILL)"
kill -KILL $c; wait $c 2>/dev/null || true
sleep 0.2
"$bin" status --socket "$sock"
wait $a; wait $b
echo "== VMM a:"; cat /tmp/sidecore-demo-a.log
echo "== VMM b:"; cat /tmp/sidecore-demo-b.log
sleep 0.1
t0=$(awk '{print $14+$15}' /proc/$daemon/stat); sleep 1; t1=$(awk '{print $14+$15}' /proc/$daemon/stat)
echo "== daemon CPU use over 1 s idle: $(( (t1 - t0) * 100 / $(getconf CLK_TCK) ))%"
"$bin" status --socket "$sock"
kill -TERM $daemon; wait $daemon || true
