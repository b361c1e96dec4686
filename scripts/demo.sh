#!/usr/bin/env bash
# The Blacktree demo, on this machine: RabbitMQ, an orchestrator, three workers (the
# docker executor when a Docker engine runs or can be started, the exec executor
# otherwise) and a sample repository. It submits a dozen jobs, shows them completing
# with `blacktree watch`, freezes one worker mid-run to show it detected and skipped,
# and ends with a summary. Every process it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blacktree-target}"
JOBS=12

bash scripts/setup.sh
echo "demo: building blacktree"
cargo build --bins -q
BT="$CARGO_TARGET_DIR/debug/blacktree"

WORK=$(mktemp -d /tmp/blacktree-demo.XXXXXX)
TAG="demo$$"
NAMES=(--exchange "bt.$TAG.direct" --execute-queue "bt.$TAG.execute" --status-queue "bt.$TAG.status"
       --rejected-queue "bt.$TAG.rejected" --cancel-queue "bt.$TAG.cancel")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for q in execute status rejected cancel; do rabbitmqctl -q delete_queue "bt.$TAG.$q" >/dev/null 2>&1 || true; done
  rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"bt.$TAG.direct\">>), false, <<\"demo\">>)." >/dev/null 2>&1 || true
  if [ "${EXECUTOR:-}" = docker ]; then
    docker images -q "demo/$TAG" | sort -u | xargs -r docker rmi -f >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "demo: timed out waiting for $what" >&2; exit 1; }
    sleep 0.2
  done
}

# The sample repository: a Dockerfile whose build takes a couple of seconds.
if docker info >/dev/null 2>&1; then
  EXECUTOR=docker
  if [ -z "$(docker images -q blacktree-demo-base:latest)" ]; then
    mkdir -p "$WORK/rootfs/bin"; cp /bin/busybox "$WORK/rootfs/bin/"
    for t in sh sleep echo cat; do ln -s busybox "$WORK/rootfs/bin/$t"; done
    tar -C "$WORK/rootfs" -c . | docker import - blacktree-demo-base:latest >/dev/null
  fi
  EXEC_ARGS=(--executor docker)
else
  EXECUTOR=exec
  EXEC_ARGS=(--executor exec --exec-command 'echo "building $BLACKTREE_IMAGE_NAME"; sleep 2; echo done')
fi
mkdir -p "$WORK/repo"
printf 'FROM blacktree-demo-base:latest\nRUN echo "building the demo app" && sleep 2\n' > "$WORK/repo/Dockerfile"
git -C "$WORK/repo" init -q -b main
git -C "$WORK/repo" add -A
git -C "$WORK/repo" -c user.name=demo -c user.email=demo@example.invalid commit -qm "demo app"

GRPC=$(free_port); METRICS=$(free_port)
echo "demo: orchestrator on 127.0.0.1:$GRPC (status page: http://127.0.0.1:$METRICS/), $EXECUTOR executor"
echo "demo: --lost-after 5s (the default is 60s), so the frozen worker's build is given up quickly"
"$BT" orchestrator "${NAMES[@]}" --grpc-listen "127.0.0.1:$GRPC" --metrics-listen "127.0.0.1:$METRICS" \
  --lost-after 5s \
  --lock-file "$WORK/orchestrator.lock" --state-file "$WORK/registry.json" >"$WORK/orchestrator.log" 2>&1 &
PIDS+=($!)
wait_for 30 "the orchestrator" "$BT" healthcheck --metrics "http://127.0.0.1:$METRICS/healthz"

for i in 1 2 3; do
  port=$(free_port)
  "$BT" worker --id "demo-w$i" --listen "127.0.0.1:$port" --orchestrator "127.0.0.1:$GRPC" \
    --work-dir "$WORK/worker$i" --lock-file "$WORK/worker$i.lock" --allow-local-repos "${EXEC_ARGS[@]}" >"$WORK/worker$i.log" 2>&1 &
  PIDS+=($!)
  eval "WORKER${i}_PID=$!"
done
wait_for 30 "three workers" sh -c "'$BT' workers --orchestrator 127.0.0.1:$GRPC | grep -c '^demo-w' | grep -qx 3"
"$BT" workers --orchestrator "127.0.0.1:$GRPC"

# Freeze worker 3 once it runs a job, and time how long the orchestrator takes to notice.
(
  wait_for 120 "a job on demo-w3" grep -q "dispatched to worker demo-w3" "$WORK/orchestrator.log"
  kill -STOP "$WORKER3_PID"
  frozen=$(date +%s.%N)
  echo "demo: froze demo-w3 (SIGSTOP) mid-job" >&2
  wait_for 60 "demo-w3 to be noticed" grep -q "worker demo-w3 .* unhealthy" "$WORK/orchestrator.log"
  python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.2f}')" "$(date +%s.%N)" "$frozen" >"$WORK/detection"
) &
FREEZER=$!

STARTED=$(date +%s.%N)
"$BT" watch --exchange "bt.$TAG.direct" --count "$JOBS" --idle 120s 2>"$WORK/watch.err" &
WATCH=$!
wait_for 30 "watch" grep -q watching "$WORK/watch.err"
for i in $(seq 1 "$JOBS"); do
  "$BT" submit --exchange "bt.$TAG.direct" --repo "$WORK/repo" --image "demo/$TAG:v$i" --job-id "demo-$TAG-$i" >/dev/null
done
echo "demo: submitted $JOBS jobs; statuses as they arrive:"
# watch exits 1 when a job it showed did not succeed: the frozen worker's job is lost on
# purpose, so only exit codes other than 0 and 1 (it could not watch) end the demo.
watch_status=0
wait "$WATCH" || watch_status=$?
[ "$watch_status" -le 1 ] || { echo "demo: watch failed ($watch_status)" >&2; exit 1; }
ELAPSED=$(python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.1f}')" "$(date +%s.%N)" "$STARTED")
wait "$FREEZER" || true
"$BT" workers --orchestrator "127.0.0.1:$GRPC"

echo
echo "== Blacktree demo summary =="
echo "jobs:        $JOBS ($EXECUTOR executor, 3 workers)"
echo "outcomes:    $(sed -n 's/^summary: //p' "$WORK/watch.err" | tail -1)"
echo "detection:   demo-w3 frozen -> marked unhealthy in $(cat "$WORK/detection" 2>/dev/null || echo '?') s"
echo "throughput:  $(python3 -c "print(f'{$JOBS / $ELAPSED:.2f}')") jobs/s over ${ELAPSED} s"
