#!/usr/bin/env bash
# Runs schemathesis against a fresh server built from this tree, with every check on (its
# default; `--checks all` on the command line would also override the few per-operation
# exceptions of .ci/schemathesis.toml, each explained there); fails on any
# failure or error it reports. Usage: .ci/schemathesis.sh [SECONDS] (the time budget, default
# 150). One worker: CPython 3.11's ast.parse is not thread-safe, and hypothesis calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
budget="${1:-150}"

venv=target/schemathesis-venv
if [ ! -x "$venv/bin/schemathesis" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4.3,<5'
fi

cargo build --quiet
work=$(mktemp -d)
# Access control on, as an exposed server runs: an admin key on every request (schemathesis
# also checks that requests without it are refused).
./target/debug/baton key new --tenant ci --role admin > "$work/key"
key=$(grep '^bk_' "$work/key")
cat > "$work/baton.toml" <<'TOML'
[agents.default]
kind = "echo"

[agents.slow]
kind = "echo"
delay_ms = 20

[auth]
token_secret_env = ["BATON_CI_TOKEN_SECRET"]
TOML
sed -n '/^\[\[auth.keys\]\]/,$p' "$work/key" >> "$work/baton.toml"
export BATON_CI_TOKEN_SECRET="schemathesis-$(date +%s%N)-token-secret"
./target/debug/baton serve --config "$work/baton.toml" --listen 127.0.0.1:0 \
    --database "sqlite://$work/baton.db" > "$work/stdout" 2> "$work/stderr" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
    grep -q "listening on" "$work/stdout" && break
    sleep 0.1
done
url=$(sed -n 's/^baton listening on //p' "$work/stdout")
[ -n "$url" ] || { echo "the server did not start:"; cat "$work/stderr"; exit 1; }

"$venv/bin/schemathesis" --config-file .ci/schemathesis.toml run "$url/openapi.json" \
    --header "Authorization: Bearer $key" --max-time "$budget" --workers 1 --no-color 2>&1 \
    | grep -v '^\s*$' | tail -n 150
status=${PIPESTATUS[0]}
kill -0 "$server" || { echo "the server died during the run"; cat "$work/stderr"; exit 1; }
exit "$status"
