# Sourced by the test scripts: start a private redis-server on a free loopback port (no
# persistence), export TEST_REDIS_URL, and stop it (by its PID) when the script exits.
# Needs $PYTHON_FOR_PORT: a python to pick the free port with.
redis_dir=$(mktemp -d)
redis_port=$("$PYTHON_FOR_PORT" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$redis_dir" --daemonize no --logfile "$redis_dir/redis.log" &
redis_pid=$!
stop_private_redis() {
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    rm -rf "$redis_dir"
}
trap stop_private_redis EXIT
for _ in $(seq 1 50); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
done
export TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"
