#!/usr/bin/env bash
# The test command: prepares the machine (scripts/setup.sh), then builds and runs every
# test against the real RabbitMQ, real gRPC servers and real processes.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blacktree-target}"
bash scripts/setup.sh
cargo build --tests --bins
cargo test "$@"
