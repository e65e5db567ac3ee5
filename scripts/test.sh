#!/usr/bin/env bash
# Set up, start a private redis-server on a free loopback port, run the whole suite, stop it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k sse -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Real parts the tests run: redis-server (contract and multi-node tests), nginx (deploy/ config),
# chromium (the browser tests, driven by Playwright: never a browser download), node (the
# client module's unit tests), libfaketime (the clock-skew tests run a node with its clock off).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || missing+=(faketime)
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

PYTHON_FOR_PORT=.venv/bin/python
# shellcheck source=scripts/private-redis.sh
source scripts/private-redis.sh  # (the working directory is the checkout)

export GATEWAY_TEST_REQUIRE_REDIS=1 GATEWAY_TEST_REQUIRE_BROWSER=1 GATEWAY_TEST_REQUIRE_FAKETIME=1
.venv/bin/python -m pytest -q "$@"
