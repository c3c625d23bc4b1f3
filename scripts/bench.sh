#!/usr/bin/env bash
# The benches, in a release build, each printing its figures and, for the
# promises of SPECIFICATION.md it checks, the ratio to its floor, the bound
# and PASS or FAIL. Exits non-zero if any bench fails (a broken promise or a
# bench that could not run). Not part of the test command: benches are too
# slow and too noisy for CI's gate; run this before a release, on an
# otherwise idle machine.
#
#   scripts/bench.sh            # every bench
#   scripts/bench.sh lifecycle  # some of them
#   QUICK=1 scripts/bench.sh    # smaller samples where a bench has them
set -uo pipefail
cd "$(dirname "$0")/.."

benches=("$@")
if ((${#benches[@]} == 0)); then
    benches=(lifecycle journal recovery agent_path)
fi
quick=()
[ -n "${QUICK:-}" ] && quick=(--quick)

# One build for all, so that a compile error is reported once, up front.
cargo_args=()
for b in "${benches[@]}"; do cargo_args+=(--bench "$b"); done
cargo bench --locked --no-run "${cargo_args[@]}" || exit 2

failed=()
for b in "${benches[@]}"; do
    echo "== $b"
    case "$b" in
        lifecycle | agent_path) args=("${quick[@]}") ;;
        *) args=() ;;
    esac
    if ! cargo bench --locked --bench "$b" -- "${args[@]}"; then
        failed+=("$b")
    fi
done
if ((${#failed[@]})); then
    echo "FAIL: ${failed[*]}"
    exit 1
fi
echo "PASS: ${benches[*]}"
