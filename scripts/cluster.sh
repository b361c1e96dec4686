#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine (loopback), for a demo or a benchmark of
# several orchestrators with quorum queues:
#   scripts/cluster.sh start    starts btc1..btc3@localhost on AMQP ports 5701-5703,
#                               joins them, and prints the comma-separated MQ_URL
#   scripts/cluster.sh status   cluster_status of the first node
#   scripts/cluster.sh urls     prints the MQ_URL again
#   scripts/cluster.sh stop     stops the three nodes and removes their data
# BLACKTREE_CLUSTER_DIR (default /tmp/blacktree-cluster) holds their data and logs;
# BLACKTREE_CLUSTER_PORT (default 5701) is the first AMQP port (the nodes' distribution
# ports are 20000 higher, or lower near the top); BLACKTREE_CLUSTER_NAME (default btc)
# prefixes the node names.
# Run as root (the nodes run as the rabbitmq user, as the Debian package's server
# script does).
set -euo pipefail
dir="${BLACKTREE_CLUSTER_DIR:-/tmp/blacktree-cluster}"
base="${BLACKTREE_CLUSTER_PORT:-5701}"
nodes=(1 2 3)

name="${BLACKTREE_CLUSTER_NAME:-btc}"

node() { echo "$name$1@localhost"; }
port() { echo $((base + $1 - 1)); }
# The node's distribution port: 20000 above its AMQP port, or below when that is past
# the last port.
dist_port() {
  local p; p=$(port "$1")
  if [ $((p + 20000)) -le 65535 ]; then echo $((p + 20000)); else echo $((p - 20000)); fi
}

urls() {
  local list=()
  for i in "${nodes[@]}"; do list+=("amqp://guest:guest@127.0.0.1:$(port "$i")/%2f"); done
  (IFS=,; echo "${list[*]}")
}

start_node() {
  local i=$1 d="$dir/$name$1"
  mkdir -p "$d/mnesia" "$d/log"
  echo "listeners.tcp.local = 127.0.0.1:$(port "$i")" > "$d/rabbitmq.conf"
  # Guests may log in over loopback only, which is where every client here is.
  echo "[]." > "$d/advanced.config"
  chown -R rabbitmq:rabbitmq "$d"
  RABBITMQ_NODENAME="$(node "$i")" RABBITMQ_NODE_PORT="$(port "$i")" \
  RABBITMQ_DIST_PORT="$(dist_port "$i")" \
  RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
  RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" \
  RABBITMQ_ENABLED_PLUGINS_FILE="$d/plugins" RABBITMQ_FEATURE_FLAGS_FILE="$d/ff" \
  RABBITMQ_PID_FILE="$d/pid" rabbitmq-server -detached
}

# Waits up to 2 minutes for node $1's app to have started. `await_startup` answers
# `rabbit_is_not_running` at once when the Erlang node is up but the app's boot has not
# begun yet (a window that grows when the machine is busy), so it is asked again.
wait_node() {
  local i=$1 deadline=$((SECONDS + 120))
  until rabbitmqctl -q -n "$(node "$i")" await_startup --timeout 120 >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "node $(node "$i") did not start; its log is in $dir/$name$i/log" >&2
      return 1
    fi
    sleep 0.5
  done
}

case "${1:-}" in
  start)
    command -v rabbitmq-server >/dev/null || apt-get install -y rabbitmq-server >/dev/null
    for i in "${nodes[@]}"; do start_node "$i"; done
    for i in "${nodes[@]}"; do wait_node "$i"; done
    for i in 2 3; do
      rabbitmqctl -q -n "$(node "$i")" stop_app
      rabbitmqctl -q -n "$(node "$i")" join_cluster "$(node 1)"
      rabbitmqctl -q -n "$(node "$i")" start_app
    done
    rabbitmqctl -q -n "$(node 1)" cluster_status | grep -A4 -i "running nodes" >&2 || true
    echo "MQ_URL=$(urls)"
    ;;
  status) rabbitmqctl -n "$(node 1)" cluster_status ;;
  urls) echo "MQ_URL=$(urls)" ;;
  stop)
    for i in "${nodes[@]}"; do rabbitmqctl -q -n "$(node "$i")" stop >/dev/null 2>&1 || true; done
    rm -rf "$dir"
    ;;
  *) echo "usage: $0 start|status|urls|stop" >&2; exit 2 ;;
esac
