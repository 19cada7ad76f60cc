#!/usr/bin/env bash
# Runs the demo suite in example/suite with fly, on this machine: builds fly, finds a
# Python that has pytest, and runs `fly-coordinator run --local` so you see pytest's summary.
# Works from any directory. Extra arguments go to pytest, e.g. `example/run.sh -k db`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
suite="$repo/example/suite"
target="${CARGO_TARGET_DIR:-$repo/target}"

(cd "$repo" && cargo build --quiet --bins)

has_pytest() { "$1" -c 'import pytest' >/dev/null 2>&1; }

if [ -n "${VIRTUAL_ENV:-}" ] && has_pytest "$VIRTUAL_ENV/bin/python"; then
    python="$VIRTUAL_ENV/bin/python"
elif command -v python3 >/dev/null 2>&1 && has_pytest python3; then
    python="$(command -v python3)"
else
    python="$repo/.venv/bin/python"
    if ! has_pytest "$python"; then
        echo "no Python with pytest found: installing it into $repo/.venv" >&2
        [ -x "$python" ] || python3 -m venv "$repo/.venv"
        "$repo/.venv/bin/pip" install -q -r "$repo/tests/requirements.txt"
    fi
fi

# The run's record goes next to the repo's other local state (ignored by git).
mkdir -p "$repo/.fly"

pytest_args=("$@")
if [ "${#pytest_args[@]}" -eq 0 ]; then
    pytest_args=(.)
fi

cd "$suite"
exec "$target/debug/fly-coordinator" run --local \
    --db "$repo/.fly/example.db" \
    --python "$python" \
    -- "${pytest_args[@]}"
