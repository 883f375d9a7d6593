#!/usr/bin/env bash
# What the tests need beside Python: a Redis answering on 127.0.0.1:${MII_TEST_REDIS_PORT:-6379}
# (started if none does, Debian's redis-server installed if missing), and docker compose or
# docker-compose to check docker-compose.yml (installed from Debian when neither is there).
set -euo pipefail
port="${MII_TEST_REDIS_PORT:-6379}"
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
apt_updated=""
apt_install() {
    [ -n "$apt_updated" ] || { $sudo_cmd apt-get update -qq && apt_updated=1; }
    $sudo_cmd apt-get install -y -qq "$@" >/dev/null
}
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    apt_install docker-compose || echo "docker-compose unavailable: its check will skip" >&2
fi
if redis-cli -p "$port" ping >/dev/null 2>&1; then
    exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
fi
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir /tmp --logfile "/tmp/mii-redis-$port.log"
for _ in $(seq 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && exit 0
    sleep 0.1
done
echo "redis-server did not answer on port $port" >&2
exit 1
