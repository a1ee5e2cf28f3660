#!/usr/bin/env bash
# Install (if missing) and start a throwaway PostgreSQL cluster for the test suite.
#
#   DSN="$(bash scripts/ci_postgres.sh)"   # prints the DSN alone on stdout, progress on stderr
#
# Idempotent: a second run reuses the cluster, the role and the database and only starts the
# server if it is down. Meant for CI (root, no stdin, Debian) and for a developer's machine.
# - installs Debian's `postgresql` package with apt-get when no server binaries are found;
# - creates (once) a cluster named `conductord` listening on 127.0.0.1 only, on
#   $CONDUCTORD_PG_PORT (default 55432), tuned for tests: fsync and synchronous_commit off, so
#   it is fast and NOT crash-safe; never use it for anything but tests;
# - creates a role `conductord` with a random password and a database `conductord_test`;
# - writes the DSN to $CONDUCTORD_PG_DIR/dsn (default /tmp/conductord-postgres/dsn, mode 0600),
#   where tests/support/postgres.py finds it when CONDUCTORD_TEST_POSTGRES_DSN is not set.
# The DSN carries the password: it goes to stdout and to that file, nowhere else.
set -euo pipefail

PORT="${CONDUCTORD_PG_PORT:-55432}"
STATE_DIR="${CONDUCTORD_PG_DIR:-/tmp/conductord-postgres}"
CLUSTER=conductord
ROLE=conductord
DATABASE=conductord_test

say() { echo "ci_postgres: $*" >&2; }

as_postgres() {
    # The server refuses to run as root; everything runs as the Debian `postgres` user.
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

server_version() {
    ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1
}

if [ -z "$(server_version)" ] || ! command -v pg_createcluster >/dev/null 2>&1; then
    say "installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends postgresql >&2
fi
VERSION="$(server_version)"
[ -n "$VERSION" ] || { say "no PostgreSQL server found after install"; exit 1; }

if ! pg_lsclusters -h "$VERSION" "$CLUSTER" >/dev/null 2>&1; then
    say "creating cluster $VERSION/$CLUSTER on 127.0.0.1:$PORT"
    pg_createcluster "$VERSION" "$CLUSTER" --port "$PORT" >&2
fi

# Settings live in a conf.d file of ours, rewritten on every run (a changed setting takes effect
# at the next start); Debian's postgresql.conf includes conf.d last, so these win.
cat >"/etc/postgresql/$VERSION/$CLUSTER/conf.d/conductord-ci.conf" <<'CONF'
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
CONF

status="$(pg_lsclusters -h "$VERSION" "$CLUSTER" | awk '{print $4}')"
if [ "$status" != "online" ]; then
    say "starting cluster $VERSION/$CLUSTER"
    # A postmaster killed a moment ago (the previous session's processes are ended before CI)
    # can leave a socket lock file naming a PID not yet reaped; retry briefly.
    for attempt in 1 2 3 4 5; do
        if pg_ctlcluster "$VERSION" "$CLUSTER" start >&2; then
            break
        fi
        [ "$attempt" -lt 5 ] || { say "could not start cluster $VERSION/$CLUSTER"; exit 1; }
        sleep 2
    done
fi
PORT="$(pg_lsclusters -h "$VERSION" "$CLUSTER" | awk '{print $3}')"

# Wait until it accepts connections (start returns once the postmaster is up, but be safe).
for _ in $(seq 1 100); do
    if as_postgres pg_isready -q -h 127.0.0.1 -p "$PORT"; then
        break
    fi
    sleep 0.1
done
as_postgres pg_isready -q -h 127.0.0.1 -p "$PORT" || { say "server not ready"; exit 1; }

mkdir -p "$STATE_DIR"
chmod 700 "$STATE_DIR"
if [ ! -s "$STATE_DIR/password" ]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '+/=\n' >"$STATE_DIR/password")
fi
PASSWORD="$(cat "$STATE_DIR/password")"

# Local socket auth for the postgres superuser (peer), not TCP: no admin password needed.
psql_peer() {
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PORT" -d postgres "$@"
}

if [ "$(psql_peer -tA </dev/null -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != "1" ]; then
    psql_peer </dev/null -c "CREATE ROLE $ROLE LOGIN" >&2
fi
# Always (re)set the password from the state file, so a lost file never locks tests out. The
# statement goes on stdin (not argv, where `ps` would show it); the password is alphanumeric.
printf "ALTER ROLE %s PASSWORD '%s';\n" "$ROLE" "$PASSWORD" | psql_peer >&2
if [ "$(psql_peer -tA </dev/null -c "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != "1" ]; then
    psql_peer </dev/null -c "CREATE DATABASE $DATABASE OWNER $ROLE" >&2
fi

DSN="postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
(umask 077 && printf '%s\n' "$DSN" >"$STATE_DIR/dsn")
say "ready on 127.0.0.1:$PORT (DSN in $STATE_DIR/dsn)"
printf '%s\n' "$DSN"
