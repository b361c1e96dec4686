#!/usr/bin/env bash
# The test command: prepares the machine (scripts/setup.sh), then builds and runs every
# test against the real RabbitMQ, real gRPC servers, Docker and a registry. Extra
# arguments go to `cargo test` (e.g. a test name filter). Ends with one line of totals.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blacktree-target}"
bash scripts/setup.sh
cargo build --tests --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --lib --bins --tests "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { print p + 0 " passed, " f + 0 " failed" }' "$log"
exit "$status"
