#!/usr/bin/env bash
# Installs what a fresh machine lacks and starts the services Blacktree's tests and demo
# talk to. Idempotent: on a prepared machine it only checks. Source it or run it.
set -euo pipefail

# Debian packages the build and the tests need.
# chromium: tests/status_page.rs renders the status page in it (headless).
# iptables, iproute2 (ss): tests/liveness.rs cuts a worker off on loopback.
# golang-go, golang-google-grpc-dev: tests/keepalive.rs builds a Go gRPC worker
# (tests/fixtures/go-worker) against Debian's grpc-go, in GOPATH mode.
BLACKTREE_PACKAGES=(cmake pkg-config libssl-dev git g++ rabbitmq-server
  docker.io docker-registry apache2-utils busybox-static curl runit chromium
  iptables iproute2 golang-go golang-google-grpc-dev)

apt_install_missing() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Waits up to $3 seconds for host $1 port $2 to accept connections.
wait_port() {
  local deadline=$((SECONDS + $3))
  until port_open "$1" "$2"; do
    [ $SECONDS -lt $deadline ] || { echo "setup: $1:$2 did not open within $3 s" >&2; return 1; }
    sleep 0.5
  done
}

ensure_rabbitmq() {
  port_open 127.0.0.1 5672 && return 0
  echo "setup: starting RabbitMQ"
  rabbitmq-server -detached
  wait_port 127.0.0.1 5672 90
  rabbitmqctl await_startup >/dev/null
}

# Debian's dockerd; no systemd here, so it is started by hand and logs to /var/log.
ensure_docker() {
  docker info >/dev/null 2>&1 && return 0
  echo "setup: starting dockerd"
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  local deadline=$((SECONDS + 60))
  until docker info >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "setup: dockerd did not start (see /var/log/dockerd.log)" >&2; return 1; }
    sleep 0.5
  done
}

# The unprivileged user the runit and systemd services run as (tests/services.rs runs
# the runit service under runsv).
ensure_service_user() {
  id -u blacktree >/dev/null 2>&1 && return 0
  echo "setup: creating the system user blacktree"
  useradd --system --home-dir /var/lib/blacktree --shell /usr/sbin/nologin blacktree
  getent group docker >/dev/null && usermod -aG docker blacktree
  return 0
}

apt_install_missing "${BLACKTREE_PACKAGES[@]}"
ensure_service_user
ensure_rabbitmq
ensure_docker
command -v cargo >/dev/null || { echo "setup: cargo is missing (install Rust with rustup)" >&2; exit 1; }
