#!/usr/bin/env bash
# Developer entry point: the two set-up commands of the README.
#   scripts/dev.sh run   - install into .venv, start the bundled Control API and one node
#   scripts/dev.sh test  - install into .venv (with the test extra) and run the whole suite
# and, for CI:
#   scripts/dev.sh test-lowest - a fresh .venv-lowest with the LOWEST versions pyproject.toml
#                                allows (scripts/lowest_constraints.py), then the fast tests
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

# pytest in $VENV; its exit 5 (no tests collected) counts as a failure.
run_pytest() {
    set +e
    "$VENV/bin/python" -m pytest "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "dev.sh: pytest collected no tests; treating that as a failure" >&2
        exit 1
    fi
    exit "$rc"
}

# What test-lowest runs (about a minute): the in-process unit tests, the client, wire, config
# and CLI tests, and both HTTP servers (gevent.pywsgi is where an old gevent would show). The
# slow end-to-end files (daemon, fleets, benchmarks, ops) run once, on current versions, in
# `test`: twice would take CI past six minutes.
LOWEST_TESTS=(
    tests/test_lease.py tests/test_runtime.py tests/test_control_api_rules.py
    tests/test_control_api_store.py tests/test_store_contract.py tests/test_plugins.py
    tests/test_client.py tests/test_wire.py tests/test_config.py tests/test_cli.py
    tests/test_status.py tests/test_status_command.py tests/test_control_api_http.py
    tests/test_long_poll.py tests/test_dependencies.py
)

case "${1:-}" in
    test-lowest)
        shift
        VENV="${CONDUCTORD_LOWEST_VENV:-.venv-lowest}"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        constraints="$VENV/lowest-constraints.txt"
        "$VENV/bin/python" scripts/lowest_constraints.py >"$constraints"
        "$VENV/bin/python" -m pip install --quiet -c "$constraints" -e ".[test]"
        "$VENV/bin/python" scripts/lowest_constraints.py --check
        if [ "$#" -eq 0 ]; then
            set -- "${LOWEST_TESTS[@]}"
        fi
        run_pytest "$@"
        ;;
    test)
        shift
        install
        "$VENV/bin/ruff" check conductord tests scripts bench
        run_pytest "$@"
        ;;
    run)
        shift
        install
        exec "$VENV/bin/python" scripts/demo.py "$@"
        ;;
    *)
        echo "usage: scripts/dev.sh run|test|test-lowest [args...]" >&2
        exit 2
        ;;
esac
