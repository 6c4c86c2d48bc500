#!/usr/bin/env bash
# Regenerates the README's example bench run: runs the default
# `sidecore bench` (release build) with --json docs/bench-example.json and
# --plot docs/bench-example.svg, then replaces the README's block between
# <!-- bench-example:start --> and <!-- bench-example:end --> with the one
# `sidecore bench --render-readme docs/bench-example.json` prints (the table
# the code prints, and where, when and by what build it was measured).
# tests/readme_example.rs checks that the block has the default run's rows.
#
#   scripts/bench-example.sh [extra sidecore bench args...]
#
# The binary is $SIDECORE, else it is built with `cargo build --release`
# (into $CARGO_TARGET_DIR if set, else target/). Takes a few minutes and
# needs /dev/kvm.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [ -n "${SIDECORE:-}" ]; then
  bin=$SIDECORE
  [ -x "$bin" ] || { echo "bench-example.sh: \$SIDECORE=$bin is not an executable file" >&2; exit 2; }
else
  cargo build --release -p sidecore >&2
  bin=${CARGO_TARGET_DIR:-$root/target}/release/sidecore
fi

json=docs/bench-example.json
svg=docs/bench-example.svg
readme=README.md
grep -q '^<!-- bench-example:start -->$' "$readme" && grep -q '^<!-- bench-example:end -->$' "$readme" || {
  echo "bench-example.sh: $readme has no <!-- bench-example:start --> / <!-- bench-example:end --> lines" >&2
  exit 1
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-example.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# The bench writes its files only once every series is measured: a failed
# run leaves the committed example as it was. Run from the checkout's root
# with relative paths, so the command the README shows is the one to type.
"$bin" bench --json "$json" --plot "$svg" "$@"
"$bin" bench --render-readme "$json" >"$tmp/block.md"

awk -v blockfile="$tmp/block.md" '
  $0 == "<!-- bench-example:start -->" { while ((getline line < blockfile) > 0) print line; skip = 1; next }
  $0 == "<!-- bench-example:end -->" { skip = 0; next }
  !skip { print }
' "$readme" >"$tmp/README.md"
cp "$tmp/README.md" "$readme"
echo "bench-example.sh: wrote $json, $svg and the example block of $readme" >&2
