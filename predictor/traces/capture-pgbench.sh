#!/bin/sh
# Captures a pgbench trace on Debian's PostgreSQL 15: pgbench's run with
# statement logging on during the run only (not the initialisation),
# converted by pgbench_log_to_trace.py. Run as root (the server runs as
# postgres). Usage: capture-pgbench.sh OUT.csv.gz
#
# By default it makes pgbench-pg-a.csv.gz: the built-in TPC-B-like
# transactions, settings unlike tpcc-pg-a's: scale 2, 8 clients, 2
# threads, 30 s, --random-seed=5. The environment changes the run:
#   SCALE   pgbench -i's scale (default 2)
#   SCRIPT  a pgbench script file to run instead of the built-in one
#   ARGS    pgbench's other arguments (default "-c 8 -j 2 -T 30 --random-seed=5")
# capture-pgbench-skewed.sh sets them for pgbench-pg-b.
set -eu
out=$(realpath -m "${1:?usage: $0 OUT.csv.gz}")
here=$(cd "$(dirname "$0")" && pwd)
scale=${SCALE:-2}
args=${ARGS:--c 8 -j 2 -T 30 --random-seed=5}
bin=/usr/lib/postgresql/15/bin
tmp=$(mktemp -d)
chown postgres "$tmp"
as_pg() { runuser -u postgres -- "$@"; }
stop() { as_pg "$bin/pg_ctl" -D "$tmp/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap stop EXIT
script=
if [ -n "${SCRIPT:-}" ]; then
    # The server's user must read it.
    cp "$SCRIPT" "$tmp/script.sql" && chown postgres "$tmp/script.sql"
    script="-f $tmp/script.sql -s $scale"
fi
as_pg "$bin/initdb" -D "$tmp/data" -A trust -U postgres >/dev/null
as_pg "$bin/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w start -o \
    "-p 54329 -k $tmp -c listen_addresses= -c logging_collector=on -c log_destination=csvlog -c log_directory=$tmp/logs" >/dev/null
run() { as_pg "$@" -h "$tmp" -p 54329 -U postgres; }
run "$bin/pgbench" -i -s "$scale" -q postgres >/dev/null 2>&1
run "$bin/psql" -q -c "ALTER SYSTEM SET log_statement = 'all'" -c "SELECT pg_reload_conf()" postgres >/dev/null
sleep 1
# shellcheck disable=SC2086 # $script and $args are lists of arguments
run "$bin/pgbench" $script $args postgres >"$tmp/pgbench.out" 2>&1
run "$bin/psql" -q -c "ALTER SYSTEM SET log_statement = 'none'" -c "SELECT pg_reload_conf()" postgres >/dev/null
sleep 1
cat "$tmp/pgbench.out" >&2
python3 "$here/pgbench_log_to_trace.py" "$tmp"/logs/*.csv | gzip -9n >"$out"
