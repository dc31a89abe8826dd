# shellcheck shell=bash
# A private, throw-away PostgreSQL for the cluster tests and ops/cluster. Source it, then:
#
#   postgres_install          # apt-get install postgresql when no server binaries are found
#   postgres_start            # initdb into a new temp folder, start on 127.0.0.1, wait until ready;
#                             # sets POSTGRES_DIR, POSTGRES_PORT and exports GATEWAY_TEST_POSTGRES
#   postgres_stop [DIR]       # stop the instance in DIR (default $POSTGRES_DIR) and delete DIR
#
# The instance listens on 127.0.0.1 only, on the first free port from POSTGRES_PORT (default
# 55432); its Unix socket lives in its own folder, so it never meets a system PostgreSQL. One
# superuser, `gateway`, with trust authentication: nothing but this machine can reach it.
# fsync stays on: the failover tests kill gateways with SIGKILL and count on what the journal
# acknowledged being durable, and PostgreSQL's side of that must hold as in production.
#
# PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the `postgres` user (the
# package creates it) and the folder belongs to that user.

# The newest server's bin folder (Debian keeps them off PATH, under /usr/lib/postgresql/VERSION/bin).
postgres_bindir() {
    local dir
    dir=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] || return 1
    echo "$dir"
}

postgres_install() {
    postgres_bindir >/dev/null && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "postgres.sh: not root and no sudo: install postgresql" >&2; return 1; }
        sudo="sudo"
    fi
    echo "postgres.sh: installing postgresql" >&2
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
    postgres_bindir >/dev/null || { echo "postgres.sh: postgresql installed but no initdb under /usr/lib/postgresql/*/bin" >&2; return 1; }
}

# Runs a server binary as the user that owns the instance: `postgres` when we are root.
_postgres_as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

_postgres_port_busy() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

postgres_start() {
    local bin port dir _
    bin=$(postgres_bindir) || { echo "postgres.sh: no PostgreSQL server binaries (run postgres_install)" >&2; return 1; }
    port="${POSTGRES_PORT:-55432}"
    for _ in $(seq 1 100); do
        _postgres_port_busy "$port" || break
        port=$((port + 1))
    done
    _postgres_port_busy "$port" && { echo "postgres.sh: no free port from ${POSTGRES_PORT:-55432} on" >&2; return 1; }

    dir=$(mktemp -d "${TMPDIR:-/tmp}/gateway-postgres.XXXXXX")
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || { echo "postgres.sh: running as root but there is no postgres user" >&2; rm -rf "$dir"; return 1; }
        chown postgres: "$dir"
    fi
    # --no-sync: the initial catalog of a throw-away instance need not reach the disk before the
    # server starts; the server itself runs with fsync on.
    if ! (cd "$dir" && _postgres_as_owner "$bin/initdb" -D "$dir/data" -U gateway --auth=trust \
            -E UTF8 --no-locale --no-sync) >"$dir/initdb.log" 2>&1; then
        echo "postgres.sh: initdb failed:" >&2; cat "$dir/initdb.log" >&2; rm -rf "$dir"; return 1
    fi
    # max_connections: each gateway process keeps its own pool, and a test run starts several.
    if ! (cd "$dir" && _postgres_as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
            -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c fsync=on -c max_connections=300") \
            >"$dir/pg_ctl.log" 2>&1; then
        echo "postgres.sh: PostgreSQL did not start on 127.0.0.1:$port:" >&2
        cat "$dir/pg_ctl.log" "$dir/server.log" >&2 2>/dev/null || true
        postgres_stop "$dir"
        return 1
    fi
    POSTGRES_DIR="$dir"
    POSTGRES_PORT="$port"
    export GATEWAY_TEST_POSTGRES="Host=127.0.0.1;Port=$port;Username=gateway;Database=postgres;Pooling=true"
    echo "postgres.sh: PostgreSQL on 127.0.0.1:$port (folder $dir)" >&2
}

# Never fails: it runs from EXIT traps, where a failure would replace the script's exit code.
postgres_stop() {
    local dir="${1:-${POSTGRES_DIR:-}}" bin
    [ -n "$dir" ] && [ -d "$dir" ] || return 0
    if [ -f "$dir/data/postmaster.pid" ] && bin=$(postgres_bindir); then
        (cd "$dir" && _postgres_as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop) >/dev/null 2>&1 ||
            (cd "$dir" && _postgres_as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 10 stop) >/dev/null 2>&1 ||
            true
    fi
    rm -rf "$dir"
    [ "$dir" != "${POSTGRES_DIR:-}" ] || unset POSTGRES_DIR POSTGRES_PORT GATEWAY_TEST_POSTGRES
    return 0
}
