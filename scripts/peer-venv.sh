#!/usr/bin/env bash
# Creates target/peer-venv with the benchmark peer's requirements, for `baton bench --peer`.
# The peer is not part of this repository: give its folder (the one holding server.py and
# requirements.txt) as the first argument or in BATON_PEER. Prints the venv's python.
#   bash scripts/peer-venv.sh PATH/TO/PEER
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peer=${1:-${BATON_PEER:-}}
if [ -z "$peer" ]; then
    echo "usage: $0 PEER_DIR   (or set BATON_PEER): the peer's folder, with requirements.txt" >&2
    exit 2
fi
if [ ! -f "$peer/requirements.txt" ]; then
    echo "$peer/requirements.txt: not found; is $peer the peer's folder?" >&2
    exit 2
fi
venv=$root/target/peer-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet -r "$peer/requirements.txt"
echo "$venv/bin/python"
