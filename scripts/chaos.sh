#!/usr/bin/env bash
# Fault injection, long form: 2,000 jobs (CHAOS_JOBS overrides) through real workers and
# an orchestrator on a private RabbitMQ node while workers are SIGKILLed and frozen,
# broker connections are closed, the broker app is stopped and started, and the
# orchestrator is SIGKILLed and restarted; then checks that no job was lost, duplicates
# are bounded and explained, no worker ran more jobs than its capacity, and the
# orchestrator's memory came back near its idle baseline (tests/chaos/).
# CHAOS_SEED=N replays a run (the seed is printed). CI runs the short form (300 jobs)
# through scripts/test.sh: the test is part of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blacktree-target}"
bash scripts/setup.sh
CHAOS_JOBS="${CHAOS_JOBS:-2000}" cargo test --test chaos -- --nocapture
