#!/usr/bin/env bash
# Benchmarks (benches/throughput.rs, latency.rs, detection.rs, scale.rs, adoption.rs, cluster.rs,
# labels.rs, live_logs.rs, status_page.rs), measured side by side in one
# run on this machine, written to BENCHMARKS.md.
# Release build (the first one compiles the gRPC C core again: ~20 min on 2 cores).
# Run it on an otherwise idle machine: every figure shares the same 2 cores.
#   BENCH_JOBS=20000 BENCH_ROUNDS=3 BENCH_SCALE_JOBS=5000 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blacktree-target}"
bash scripts/setup.sh
out=$(mktemp)
notes=$(mktemp)
trap 'rm -f "$out" "$notes"' EXIT
# The hand-written analysis below the table ("## Notes" to the end) is kept.
sed -n '/^## Notes/,$p' BENCHMARKS.md > "$notes" 2>/dev/null || true
for bench in throughput latency detection scale adoption cluster labels live_logs status_page; do
  cargo bench --bench "$bench" 2>/dev/null | tee -a "$out"
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
  echo "| throughput, $(value throughput.jobs) jobs, 64 no-op workers, window 64 (median of $(value throughput.rounds) rounds) | $(value throughput.blacktree_per_s) jobs/s ($(value throughput.blacktree_per_s_range)) | raw amiquip consume → confirmed status → ack: $(value throughput.raw_per_s) msg/s ($(value throughput.raw_per_s_range)) | $(value throughput.ratio) ($(value throughput.ratio_range)) | ≥ 0.80 |"
  echo "| throughput, same rounds: the raw loop plus a bare async RunJob to the same no-op workers per message | $(value throughput.blacktree_per_s) jobs/s | raw loop + gRPC: $(value throughput.raw_grpc_per_s) msg/s ($(value throughput.raw_grpc_per_s_range)) | $(value throughput.ratio_grpc) ($(value throughput.ratio_grpc_range)) | (the floor of all the work) |"
  for pair in "publish_to_runjob|publish on execute.queue → RunJob at the worker|bare_publish_to_delivery|bare publish → delivery" \
              "skeleton_publish_to_runjob|publish → RunJob through DESIGN.md's threads doing nothing else (benches/support/skeleton.rs)|bare_publish_to_delivery|bare publish → delivery" \
              "answer_to_status|RunJob at the worker → status delivered|bare_grpc_unary|bare gRPC unary call"; do
    IFS='|' read -r ours label floor floor_label <<<"$pair"
    echo "| latency at light load: $label (p50 / p99) | $(value latency.$ours.p50_ms) / $(value latency.$ours.p99_ms) ms | $floor_label: $(value latency.$floor.p50_ms) / $(value latency.$floor.p99_ms) ms | | p50 < 2 ms, p99 < 10 ms |"
  done
  for mode in remembered forgotten; do
    case $mode in remembered) how="state file kept";; *) how="fresh state file: workers register again at their next check-in";; esac
    echo "| orchestrator SIGKILL + restart with $(value adoption.builds) builds in flight, half ending while it is down ($how; defaults: 2 s health round, 3 s check-in, 6 s adopt-wait) | $(value adoption.$mode.reruns) builds re-run, $(value adoption.$mode.adopted) adopted; extra delay to their statuses p50 / max $(value adoption.$mode.delay_p50_s) / $(value adoption.$mode.delay_max_s) s | bound: adopt-wait + one check-in = $(value adoption.target_s) s | | 0 re-runs, ≤ 9 s |"
  done
  echo "| three-node cluster, quorum queues, $(value cluster.jobs) jobs, 64 no-op workers (median of $(value cluster.rounds) rounds): one orchestrator | $(value cluster.one_per_s) jobs/s ($(value cluster.one_per_s_range)) | raw amiquip loop on the same kind of queues: $(value cluster.raw_per_s) msg/s ($(value cluster.raw_per_s_range)); plus a bare RunJob per message: $(value cluster.raw_grpc_per_s) msg/s | $(value cluster.one_vs_raw) ($(value cluster.one_vs_raw_range)); $(value cluster.one_vs_raw_grpc) against the loop with gRPC | |"
  echo "| same rounds: two orchestrators, each first on a node of its own | $(value cluster.two_per_s) jobs/s ($(value cluster.two_per_s_range)) | one orchestrator: $(value cluster.one_per_s) jobs/s | $(value cluster.two_vs_one) ($(value cluster.two_vs_one_range)) | ≥ 0.90 |"
  echo "| node failover: stop_app of the node in use → first status through another node ($(value cluster.node_failover_trials) trials, min / p50 / max; heartbeat 10 s, reconnect backoff from 200 ms) | $(value cluster.node_failover_min_s) / $(value cluster.node_failover_p50_s) / $(value cluster.node_failover_max_s) s | | | < 5 s |"
  echo "| orchestrator failover: SIGKILL of one of two → its $(value cluster.kill_jobs) jobs' statuses published by the other (p50 / max; defaults: 2 s health round, 3 s check-in, 6 s adopt-wait) | $(value cluster.kill_p50_s) / $(value cluster.kill_max_s) s, $(value cluster.kill_reruns) builds re-run | | | 0 re-runs |"
  echo "| failure detection at defaults, $(value detection.trials) SIGSTOP trials (min / p50 / max) | $(value detection.min_s) / $(value detection.p50_s) / $(value detection.max_s) s, $(value detection.within_bound) within bound, $(value detection.false_removals) false removals | bound: interval × unhealthy-after + timeout = $(value detection.bound_s) s | | ≤ 5 s, no false removal |"
  echo "| a worker with a build running, default --lost-after 60 s: frozen (SIGSTOP) / killed (SIGKILL): out of rotation, then its build ended worker_lost | frozen: out $(value detection.frozen_out_s) s, given up $(value detection.frozen_given_up_s) s; killed: out $(value detection.killed_out_s) s, lost $(value detection.killed_lost_s) s | a build saturating both cores on a live worker: $(value detection.false_give_ups) false give-ups (out of rotation meanwhile: $(value detection.busy_out_of_rotation)) | | frozen: out ≤ 5 s, given up at --lost-after; killed: lost in seconds; 0 false give-ups |"
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
  echo "| dispatch latency with labels, $(value labels.workers) workers in $(value labels.pools) label sets, light load: publish → RunJob (p50 / p99) | jobs requiring a label set: $(value labels.labelled.p50_ms) / $(value labels.labelled.p99_ms) ms | the same workers, jobs without labels: $(value labels.plain.p50_ms) / $(value labels.plain.p99_ms) ms | $(value labels.p50_ratio) (p50) | ≤ 1.2 |"
  echo "| live logs: a build printing $(value live_logs.lines) lines (10 MB) at full speed: orchestrator CPU for the job, --logs-key on | $(value live_logs.on.cpu_ms) ms; print → delivered from the logs queue p50 / p99: $(value live_logs.delay_p50_ms) / $(value live_logs.delay_p99_ms) ms ($(value live_logs.lines_delivered) lines delivered) | --logs-key off: $(value live_logs.off.cpu_ms) ms | +$(awk -v a="$(value live_logs.on.cpu_ms)" -v b="$(value live_logs.off.cpu_ms)" 'BEGIN { printf "%.0f", (a - b) / 10 }') ms per MB | (batches of ≤ 200 ms) |"
  echo "| status page: orchestrator CPU per 1,000 jobs (64 no-op workers, $(value page.jobs) jobs a round, median of $(value page.rounds) alternating rounds) with the page open in headless Chromium (reloading every 5 s) | $(value page.open_cpu_ms_per_1000) ms | page closed: $(value page.closed_cpu_ms_per_1000) ms | $(value page.ratio) | ≈ 1.00 (nothing measurable); one render: $(value page.render_cpu_ms) ms CPU |"
  echo "| scale, $(value scale.workers) workers: RSS | $(value scale.w1000.rss_mib) MiB | bare grpcio client, same channels: $(value scale.bare.rss_mib) MiB | $(ratio "$(value scale.w1000.rss_mib)" "$(value scale.bare.rss_mib)") | ≤ 1.25 |"
  echo "| scale, $(value scale.workers) workers: threads | $(value scale.w1000.threads) | bare client: $(value scale.bare.threads); dispatch pool: 64 | | ≤ pool + 16 = 80 |"
  echo "| scale, $(value scale.workers) workers: one health round (median) | $(value scale.w1000.round_ms) ms | bare client's round: $(value scale.bare.round_ms) ms | $(ratio "$(value scale.w1000.round_ms)" "$(value scale.bare.round_ms)") | ≤ 2 |"
  echo "| scale, $(value scale.workers) workers: idle CPU (one core = 100 %) | $(value scale.w1000.idle_cpu_pct) % | bare client: $(value scale.bare.idle_cpu_pct) % | | < 2 % |"
  echo "| cost per job: orchestrator CPU per 1,000 jobs (net of idle), 10 / 100 / 1,000 workers | $(value scale.w10.cpu_ms_per_1000_jobs) / $(value scale.w100.cpu_ms_per_1000_jobs) / $(value scale.w1000.cpu_ms_per_1000_jobs) ms | 10 workers | $(ratio "$(value scale.w1000.cpu_ms_per_1000_jobs)" "$(value scale.w10.cpu_ms_per_1000_jobs)") (1,000 vs 10) | flat |"
  echo
  echo "CPU per 1,000 jobs in the throughput run (ms, medians): raw loop: broker $(value throughput.raw.cpu_ms_per_1000.broker), loop $(value throughput.raw.cpu_ms_per_1000.floor_loop);"
  echo "raw loop + gRPC: broker $(value throughput.raw_grpc.cpu_ms_per_1000.broker), the loop's own threads $(value throughput.raw_grpc.cpu_ms_per_1000.floor_loop), no-op workers $(value throughput.raw_grpc.cpu_ms_per_1000.noop_workers);"
  echo "Blacktree: orchestrator $(value throughput.blacktree.cpu_ms_per_1000.orchestrator), broker $(value throughput.blacktree.cpu_ms_per_1000.broker), no-op workers $(value throughput.blacktree.cpu_ms_per_1000.noop_workers);"
  echo "orchestrator CPU per job / the raw + gRPC loop's own: $(value throughput.cpu_ratio) ($(value throughput.cpu_ratio_range));"
  echo "with $(value throughput.wide) jobs running at once ($(value throughput.wide) no-op workers, as many dispatch threads and prefetched jobs): orchestrator $(value throughput.blacktree_wide.cpu_ms_per_1000.orchestrator) ms, $(value throughput.blacktree_wide_per_s) jobs/s; its CPU per job / with 64: $(value throughput.cpu_wide_ratio) ($(value throughput.cpu_wide_ratio_range));"
  echo "DESIGN.md's threads doing nothing but their hand-offs (benches/support/skeleton.rs; same rounds): $(value throughput.skeleton_per_s) jobs/s, $(value throughput.skeleton_ratio_grpc) of the raw + gRPC loop's; CPU $(value throughput.skeleton.cpu_ms_per_1000.skeleton) ms, $(value throughput.cpu_skeleton_ratio) ($(value throughput.cpu_skeleton_ratio_range)) of the loop's own; the orchestrator's CPU over theirs: $(value throughput.cpu_over_skeleton) ($(value throughput.cpu_over_skeleton_range)); with $(value throughput.wide) at once their CPU per job over theirs with 64: $(value throughput.cpu_skeleton_wide_ratio);"
  echo "threads' sleeps (wake-ups) per job: raw loop $(value throughput.raw.sleeps_per_job), raw + gRPC loop $(value throughput.raw_grpc.sleeps_per_job), DESIGN.md's threads alone $(value throughput.skeleton.sleeps_per_job), orchestrator $(value throughput.blacktree.sleeps_per_job)."
  if [ -s "$notes" ]; then echo; cat "$notes"; fi
} > BENCHMARKS.md
cat BENCHMARKS.md
