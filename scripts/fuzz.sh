#!/usr/bin/env bash
# Runs the cargo-fuzz targets of sidecore/fuzz one after the other.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 600); TARGETs default to every target
# (dispatch, daemon_request). Each runs
#
#   cargo +nightly fuzz run TARGET WORK_CORPUS corpus/TARGET -- -max_total_time=SECONDS
#
# from sidecore/fuzz: it starts from the committed seeds (corpus/TARGET,
# only read) and writes what it finds to a working corpus that is not
# committed (target/fuzz-corpus/TARGET); a crashing input is saved in
# artifacts/TARGET. The committed corpus is replayed by `cargo test`
# (sidecore/tests/fuzz_corpus.rs, tests/fuzz_corpus.rs).
#
# Needs the nightly toolchain; installs cargo-fuzz if it is missing.
# Exits 1 if a target found something (or failed to run), else 0.
set -euo pipefail

seconds=${1:-600}
if [[ ! $seconds =~ ^[0-9]+$ ]] || ((seconds == 0)); then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi
shift || true
fuzz_dir=$(cd "$(dirname "$0")/../sidecore/fuzz" && pwd)
cd "$fuzz_dir"
if (($# > 0)); then
    targets=("$@")
else
    targets=(dispatch daemon_request)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "cargo-fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "+ cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

failed=0
summary=()
for t in "${targets[@]}"; do
    if [[ ! -f fuzz_targets/$t.rs ]]; then
        echo "no such fuzz target: $t (see $fuzz_dir/fuzz_targets)" >&2
        exit 2
    fi
    work=target/fuzz-corpus/$t
    log=target/fuzz-logs/$t.log
    mkdir -p "$work" corpus/"$t" "$(dirname "$log")" artifacts/"$t"
    extra=()
    if [[ -f $t.dict ]]; then
        extra+=("-dict=$t.dict")
    fi
    before=$(find artifacts/"$t" -type f | sort)
    cmd=(cargo +nightly fuzz run "$t" "$work" "corpus/$t" -- "-max_total_time=$seconds" "${extra[@]}")
    echo "+ (cd $fuzz_dir && ${cmd[*]})"
    start=$(date +%s)
    set +e
    "${cmd[@]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    elapsed=$(($(date +%s) - start))
    runs=$(sed -n 's/^Done \([0-9]*\) runs in .*/\1/p' "$log" | tail -n 1)
    if [[ -z $runs ]]; then
        # No "Done" line after a crash: the last status line's count.
        runs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || true)
    fi
    new=$(comm -13 <(echo "$before") <(find artifacts/"$t" -type f | sort) | sed "s|^|$fuzz_dir/|")
    if ((rc == 0)); then
        outcome="nothing found"
    elif [[ -n $new ]]; then
        outcome="FOUND a failing input (exit $rc): $(echo "$new" | tr '\n' ' ')"
        failed=1
    else
        outcome="FAILED to run (exit $rc), see $fuzz_dir/$log"
        failed=1
    fi
    summary+=("$t: ${elapsed} s, ${runs:-?} runs, corpus $(find "$work" -type f | wc -l) files: $outcome")
    echo "== $t: $outcome"
done

echo
echo "fuzz summary (${seconds} s per target):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
