#!/usr/bin/env bash
# Make sure a Redis answers on 127.0.0.1:${MII_TEST_REDIS_PORT:-6379} for the tests:
# start one if none does, installing Debian's redis-server first if it is missing.
set -euo pipefail
port="${MII_TEST_REDIS_PORT:-6379}"
if redis-cli -p "$port" ping >/dev/null 2>&1; then
    exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server >/dev/null
fi
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --dir /tmp --logfile "/tmp/mii-redis-$port.log"
for _ in $(seq 50); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && exit 0
    sleep 0.1
done
echo "redis-server did not answer on port $port" >&2
exit 1
