#!/usr/bin/env bash
# Runs `sidecore bench` K times and prints, for every ratio the bench reports,
# its spread over the runs (min / median / max), plus each run's floor p50 so a
# reader sees which floor level each run hit.
#
#   scripts/bench.sh [K] [sidecore bench args...]   K runs (default 5)
#   scripts/bench.sh --summary FILE.json...          summarize saved JSON reports
#
# The binary is $SIDECORE, else target/release/sidecore of this checkout
# (built with `cargo build --release` when missing). Each run's JSON goes to a
# temporary directory that is removed at the end; set BENCH_KEEP=DIR to keep
# the reports (DIR/run-N.json) and the runs' output (DIR/run-N.log) instead.
set -euo pipefail

usage() {
  echo "usage: $0 [K] [sidecore bench args...]   (K runs, default 5; binary \$SIDECORE or target/release/sidecore)"
  echo "       $0 --summary FILE.json...        (summarize saved 'sidecore bench --json' reports)"
}

# Prints the summary of the JSON reports given as arguments; $BENCH_CMD, if
# set, names the command the reports came from.
summarize() {
  python3 - "$@" <<'PY'
import json
import os
import statistics
import sys

files = sys.argv[1:]
runs = []
for f in files:
    try:
        with open(f, encoding="utf-8") as fh:
            runs.append(json.load(fh))
    except (OSError, ValueError) as e:
        sys.exit(f"bench.sh: cannot read bench report {f}: {e}")

def num(v):
    """A latency or ratio for the table: whole numbers without decimals."""
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"

cmd = os.environ.get("BENCH_CMD")
n = len(runs)
print(f"{n} run{'s' if n != 1 else ''} of: {cmd}" if cmd else f"{n} report{'s' if n != 1 else ''}: {' '.join(files)}")

floors = [(r.get("floor") or {}).get("p50_ns") for r in runs]
print("floor p50 per run (ns): " + " ".join(num(v) for v in floors))
levels = [r.get("floor_level") for r in runs]
if any(levels):
    print("floor level per run:    " + " ".join(str(v) if v else "-" for v in levels))

# (op, name) -> values, in the order the ratios first appear.
ratios = {}
for r in runs:
    for q in r.get("ratios") or []:
        v = q.get("value")
        if not isinstance(v, (int, float)):
            continue
        ratios.setdefault((str(q.get("op", "?")), str(q.get("name", "?"))), []).append(float(v))

if not ratios:
    print("no ratios in the reports")
    sys.exit(0)

rows = []
for (op, name), vals in ratios.items():
    row = [op, name, f"{min(vals):.2f}", f"{statistics.median(vals):.2f}", f"{max(vals):.2f}"]
    row.append("" if len(vals) == n else f"(in {len(vals)} of {n} runs)")
    rows.append(row)
head = ["op", "ratio", "min", "median", "max", ""]
widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
for r in [head] + rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
PY
}

case "${1:-}" in
  -h | --help)
    usage
    exit 0
    ;;
  --summary)
    shift
    [ $# -ge 1 ] || { usage >&2; exit 2; }
    summarize "$@"
    exit
    ;;
esac

k=5
if [ $# -ge 1 ] && [[ $1 != -* ]]; then
  if [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ]; then
    k=$((10#$1))
    shift
  else
    echo "bench.sh: K must be a positive number of runs, not '$1'" >&2
    usage >&2
    exit 2
  fi
fi
for a in "$@"; do
  case $a in
    --json | --json=*)
      echo "bench.sh: do not pass --json: each run writes its own report (set BENCH_KEEP=DIR to keep them)" >&2
      exit 2
      ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${SIDECORE:-}" ]; then
  bin=$SIDECORE
  [ -x "$bin" ] || { echo "bench.sh: \$SIDECORE=$bin is not an executable file" >&2; exit 2; }
else
  bin=$root/target/release/sidecore
  if [ ! -x "$bin" ]; then
    echo "bench.sh: $bin is missing; building it with cargo build --release" >&2
    (cd "$root" && cargo build --release) >&2
  fi
fi

if [ -n "${BENCH_KEEP:-}" ]; then
  dir=$BENCH_KEEP
  mkdir -p "$dir"
else
  dir=$(mktemp -d "${TMPDIR:-/tmp}/sidecore-bench.XXXXXX")
  trap 'rm -rf "$dir"' EXIT
fi

files=()
for ((i = 1; i <= k; i++)); do
  json=$dir/run-$i.json
  log=$dir/run-$i.log
  rm -f "$json"
  echo "bench.sh: run $i of $k" >&2
  if ! "$bin" bench --json "$json" "$@" >"$log" 2>&1; then
    echo "bench.sh: run $i failed: $bin bench --json $json $*" >&2
    cat "$log" >&2
    exit 1
  fi
  if [ ! -s "$json" ]; then
    echo "bench.sh: run $i wrote no report to $json" >&2
    cat "$log" >&2
    exit 1
  fi
  files+=("$json")
done

BENCH_CMD="sidecore bench${*:+ $*}" summarize "${files[@]}"
