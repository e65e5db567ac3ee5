#!/usr/bin/env bash
# Set up, start a private redis-server on a free loopback port, run the whole suite, stop it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k sse -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Real parts the tests run: redis-server (contract and multi-node tests), nginx (deploy/ config).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]} (Debian packages)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # policy-rc.d keeps the packages' own services from starting: the tests start their own.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get install -y -qq "${missing[@]}" >/dev/null
    if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

redis_dir=$(mktemp -d)
redis_port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$redis_dir" --daemonize no --logfile "$redis_dir/redis.log" &
redis_pid=$!
cleanup() {
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    rm -rf "$redis_dir"
}
trap cleanup EXIT
for _ in $(seq 1 50); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
done

export TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"
export GATEWAY_TEST_REQUIRE_REDIS=1
.venv/bin/python -m pytest -q "$@"
