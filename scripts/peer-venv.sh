#!/usr/bin/env bash
# Creates target/peer-venv with the seed peer's requirements, for `baton bench --peer`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peer=${1:-$root/../shared/peers/seed-py}
venv=$root/target/peer-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet -r "$peer/requirements.txt"
echo "$venv/bin/python"
