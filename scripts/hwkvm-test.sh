#!/usr/bin/env bash
# Runs the README's test suite (`cargo test --workspace`) inside the AMD-V bed
# (scripts/hwkvm-vm.sh): the test binaries are built here, on the host, as
# `cargo test --workspace` builds them, then every one runs inside the bed,
# one test at a time, from its package's directory.
#
# Usage: scripts/hwkvm-test.sh [--runs K] [--release] [TEST-FILTER]
#   --runs K    run the suite K times in K fresh beds; stops at the first failure
#   --release   build and test with --release
#   TEST-FILTER passed to every test binary (libtest's substring filter)
# Prints each binary's result and a closing line
#   `hwkvm: N passed, N failed, N skipped`
# (skipped: tests that recorded through tests/common's skip() why they cannot
# run there). Exit status 0 only if nothing failed and the bed held.
# A bed gives up after HWKVM_TEST_TIMEOUT seconds (default 1800; the suite
# takes about 6 minutes), each test binary in it after 600.
set -euo pipefail
cd "$(dirname "$0")/.."
project=$(pwd -P)

if [ "${1:-}" = --inner ]; then
  # Inside the bed: run every binary on the list.
  shift; list=$1; filter=${2:-}
  export SIDECORE_TEST_SKIPS=/tmp/hwkvm-skips
  # Tests that do not touch KVM and would only run slower here can tell.
  export SIDECORE_IN_HWKVM_BED=1
  : > "$SIDECORE_TEST_SKIPS"
  passed=0 failed=0 bad_bins=""
  while IFS=$'\t' read -r bin dir; do
    name=${bin#"$project"/}
    echo "hwkvm: == $name"
    out=/tmp/hwkvm-out
    set +e
    (cd "$dir" && timeout 600 "$bin" --test-threads=1 ${filter:+"$filter"}) > "$out" 2>&1
    rc=$?
    set -e
    grep -E "^test |^test result|panicked|^---- |^failures:|skipping " "$out" | grep -v "^test result: ok. 0 passed" || true
    summary=$(grep "^test result:" "$out" | tail -n 1)
    p=$(echo "$summary" | sed -n 's/.* \([0-9]*\) passed.*/\1/p'); f=$(echo "$summary" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
    passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
    if [ $rc != 0 ]; then
      [ "${f:-0}" = 0 ] && failed=$((failed + 1))
      bad_bins="$bad_bins $name(exit $rc)"
      echo "hwkvm: $name exited $rc; its failures:"
      if grep -q '^failures:$' "$out"; then
        sed -n '/^failures:$/,/^test result:/p' "$out" | grep -v '^ *at /rustc/\|^ *[0-9]*: \(core\|std\)::' | head -n 400
      else
        tail -n 60 "$out"
      fi
    fi
  done < "$list"
  skipped=$(grep -c . "$SIDECORE_TEST_SKIPS" || true)
  if [ "$skipped" -gt 0 ]; then echo "hwkvm: skipped:"; sed 's/^/  /' "$SIDECORE_TEST_SKIPS"; fi
  [ -n "$bad_bins" ] && echo "hwkvm: failed binaries:$bad_bins"
  echo "hwkvm: $((passed - skipped)) passed, $failed failed, $skipped skipped"
  [ "$failed" = 0 ]
  exit
fi

runs=1 cargo_flags=() filter=""
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --release) cargo_flags+=(--release); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "hwkvm-test: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) filter=$1; shift ;;
  esac
done

mkdir -p target
list=target/hwkvm-tests.list
echo "hwkvm-test: building the test binaries (cargo test --workspace --no-run ${cargo_flags[*]:-})" >&2
cargo test --workspace --no-run "${cargo_flags[@]}" --message-format=json 2>/dev/null |
  python3 -c '
import json, os, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"] + "\t" + os.path.dirname(m["manifest_path"]))
' | sort -u > "$list"
[ -s "$list" ] || { echo "hwkvm-test: cargo built no test binaries" >&2; exit 1; }
echo "hwkvm-test: $(wc -l < "$list") test binaries; running them in the AMD-V bed" >&2

for run in $(seq 1 "$runs"); do
  [ "$runs" -gt 1 ] && echo "hwkvm-test: run $run of $runs" >&2
  t0=$(date +%s)
  set +e
  scripts/hwkvm-vm.sh --quiet --timeout "${HWKVM_TEST_TIMEOUT:-1800}" -- "scripts/hwkvm-test.sh --inner $project/$list '$filter'"
  rc=$?
  set -e
  echo "hwkvm-test: run $run: exit $rc after $(( $(date +%s) - t0 )) s" >&2
  [ $rc = 0 ] || exit $rc
done
