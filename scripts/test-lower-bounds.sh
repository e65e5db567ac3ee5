#!/usr/bin/env bash
# Run the whole suite against the lowest versions setup.cfg allows: recreate a venv outside the
# repository with every `name>=X` of install_requires and the test extra installed as `name==X`
# (and the dependencies of the extras asked for, hiredis and cryptography, at the lower bounds
# their packages declare), start a private redis-server, run pytest, stop it. Run it by hand
# after changing a dependency or starting to use a newer API; CI runs only scripts/test.sh.
# Extra arguments go to pytest (e.g. -x, -k sse). LOWER_BOUNDS_VENV picks the venv's directory;
# .venv is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PYTHON="${PYTHON:-python3}"
venv="${LOWER_BOUNDS_VENV:-${TMPDIR:-/tmp}/sync-gateway-lower-bounds}"

for tool in redis-server redis-cli; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$0: $tool is missing (scripts/test.sh installs it)" >&2; exit 2; }
done
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 \
    || { echo "$0: nginx is missing (scripts/test.sh installs it)" >&2; exit 2; }

# name[extras]>=X -> name[extras]==X; a requirement without a lower bound is an error.
pin_lines=$("$PYTHON" - setup.cfg <<'PY'
import configparser, re, sys
config = configparser.ConfigParser()
config.read(sys.argv[1])
lines = (config["options"]["install_requires"] + "\n" + config["options.extras_require"]["test"]).split("\n")
for line in filter(None, (line.strip() for line in lines)):
    match = re.fullmatch(r"([A-Za-z0-9._-]+(?:\[[^\]]+\])?)\s*>=\s*([0-9][0-9A-Za-z.]*)", line)
    if match is None:
        sys.exit(f"setup.cfg: {line!r} is not of the form name>=version")
    print(f"{match[1]}=={match[2]}")
PY
)
mapfile -t pins <<< "$pin_lines"

rm -rf "$venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${pins[@]}"
# What the extras asked for (redis[hiredis], PyJWT[crypto]) pull in, at its declared lower bound.
extra_lines=$("$venv/bin/python" - "${pins[@]}" <<'PY'
import re, sys
from importlib.metadata import requires
for pin in sys.argv[1:]:
    match = re.fullmatch(r"([^\[=]+)\[([^\]]+)\]==.*", pin)
    if match is None:
        continue
    name, extras = match[1], {extra.strip() for extra in match[2].split(",")}
    for requirement in requires(name) or []:
        spec, _, markers = requirement.partition(";")
        extra = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", markers)
        floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
        if extra and extra[1] in extras and floor:
            print(f"{re.match(r'[A-Za-z0-9._-]+', spec.strip())[0]}=={floor[1]}")
PY
)
extra_pins=()
[ -z "$extra_lines" ] || mapfile -t extra_pins <<< "$extra_lines"
[ ${#extra_pins[@]} -eq 0 ] || "$venv/bin/python" -m pip install -q "${extra_pins[@]}"
"$venv/bin/python" -m pip check
echo "lower bounds: ${pins[*]} ${extra_pins[*]}"

PYTHON_FOR_PORT="$venv/bin/python"
# shellcheck source=scripts/private-redis.sh
source scripts/private-redis.sh  # (the working directory is the checkout)

# The gateway of this checkout, not installed (the tests start `python -m gateway` from here);
# a hypothesis database of its own, so old and new hypothesis versions never share one.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_STORAGE_DIRECTORY="$venv/.hypothesis"
export GATEWAY_TEST_REQUIRE_REDIS=1
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
