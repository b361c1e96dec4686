#!/usr/bin/env bash
# Benchmarks (benches/throughput.rs, benches/latency.rs), measured side by side in one
# run on this machine, written to BENCHMARKS.md.
# Release build (the first one compiles the gRPC C core again: ~15 min on 2 cores).
#   BENCH_JOBS=20000 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blacktree-target}"
bash scripts/setup.sh
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for bench in throughput latency; do
  RUST_LOG=info cargo bench --bench "$bench" 2>/dev/null | tee -a "$out"
done
value() { sed -n "s/^$1 //p" "$out"; }
cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
{
  echo "# Benchmarks"
  echo
  echo "Measured by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores ($cpu), $(free -g | awk '/Mem:/ {print $2}') GiB,"
  echo "RabbitMQ $(rabbitmqctl version 2>/dev/null || echo '?') on loopback. Every figure of a row comes from the same run."
  echo
  echo "| benchmark | Blacktree | baseline | ratio | target |"
  echo "|---|---|---|---|---|"
  echo "| throughput, $(value throughput.jobs) jobs, 64 no-op workers, window 64 | $(value throughput.blacktree_jobs_per_s) jobs/s | raw amiquip consume → confirmed status → ack: $(value throughput.raw_msgs_per_s) msg/s | $(value throughput.ratio) | ≥ 0.80 |"
  for pair in "publish_to_runjob|publish on execute.queue → RunJob at the worker|bare_publish_to_delivery|bare publish → delivery" \
              "answer_to_status|RunJob at the worker → status delivered|bare_grpc_unary|bare gRPC unary call"; do
    IFS='|' read -r ours label floor floor_label <<<"$pair"
    echo "| latency at light load: $label (p50 / p99) | $(value latency.$ours.p50_ms) / $(value latency.$ours.p99_ms) ms | $floor_label: $(value latency.$floor.p50_ms) / $(value latency.$floor.p99_ms) ms | | p50 < 2 ms, p99 < 10 ms |"
  done
} > BENCHMARKS.md
cat BENCHMARKS.md
