#!/usr/bin/env bash
# Developer entry point: the two set-up commands of the README.
#   scripts/dev.sh run   - install into .venv, start the bundled Control API and one node
#   scripts/dev.sh test  - install into .venv (with the test extra) and run the whole suite
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${CONDUCTORD_VENV:-.venv}"

install() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
}

case "${1:-}" in
    test)
        shift
        install
        "$VENV/bin/ruff" check conductord tests scripts bench
        set +e
        "$VENV/bin/python" -m pytest "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "dev.sh: pytest collected no tests; treating that as a failure" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    run)
        shift
        install
        exec "$VENV/bin/python" scripts/demo.py "$@"
        ;;
    *)
        echo "usage: scripts/dev.sh run|test [args...]" >&2
        exit 2
        ;;
esac
