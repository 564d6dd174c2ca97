#!/usr/bin/env bash
# Smoke run of every fuzz target: builds them, then runs each for a few
# seconds from its seed corpus (fuzz/corpus/<target>/) and its past crashes
# (fuzz/regressions/<target>/), one line per target.
# Exits non-zero when any target crashes (the input is then in
# fuzz/artifacts/<target>/).
#
#   bash fuzz/smoke.sh          # 10 s per target
#   bash fuzz/smoke.sh 60       # 60 s per target (or FUZZ_SECONDS=60)
#
# Needs a nightly toolchain (FUZZ_TOOLCHAIN, default nightly); installs
# cargo-fuzz when it is missing. Inputs found while running go to a
# temporary directory, never into the seed corpora. CARGO_TARGET_DIR is
# honoured (default fuzz/target).
set -euo pipefail

seconds="${1:-${FUZZ_SECONDS:-10}}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [seconds per target, default 10]" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
cargo=(cargo "+$toolchain")

if ! "${cargo[@]}" fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    "${cargo[@]}" install cargo-fuzz --locked
fi

# No sanitizer: the code under test is safe Rust, and without ASan each run
# is several times faster. Debug assertions on (-a): overflow checks too.
flags=(--sanitizer none -a)
# A smoke run needs the targets built quickly, not fuzzing fast: the dev
# profile compiles in a fraction of the release build's time (CI's case).
if ((seconds <= 30)); then
    flags+=(--dev)
fi

started=$SECONDS
echo "building the fuzz targets"
"${cargo[@]}" fuzz build "${flags[@]}"
built=$((SECONDS - started))

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failed=0
for target in $("${cargo[@]}" fuzz list); do
    mkdir -p "$work/$target"
    log="$work/$target.log"
    # The first corpus directory is where new inputs go: the temporary one.
    # The seeds and past crashes (fuzz/regressions/) are read, never written.
    corpora=("$work/$target" "fuzz/corpus/$target")
    if [[ -d "fuzz/regressions/$target" ]]; then
        corpora+=("fuzz/regressions/$target")
    fi
    # A single input running 30 s counts as a failure (a hang), not a wait.
    if "${cargo[@]}" fuzz run "${flags[@]}" "$target" "${corpora[@]}" -- \
        -max_total_time="$seconds" -timeout=30 >"$log" 2>&1; then
        result="ok"
    else
        result="FAILED"
        failed=1
    fi
    runs="$(grep -a -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || true)"
    # libFuzzer's last status: edges covered, features, corpus size.
    cov="$(grep -a -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -n 1 || true)"
    line="$(printf '%-18s %-6s %12s runs in %ss  %s' "$target" "$result" "${runs:-0}" "$seconds" "$cov")"
    if [[ "$result" != ok ]]; then
        artifact="$(grep -a -oE 'Test unit written to [^ ]+' "$log" | tail -n 1 | cut -d' ' -f5 || true)"
        line+="  ${artifact:-(see the log below)}"
        echo "$line"
        tail -n 40 "$log" | sed 's/^/    /'
    else
        echo "$line"
    fi
done

echo "build ${built}s, total $((SECONDS - started))s"
exit "$failed"
