#!/bin/sh
# Captures pgbench-pg-a.csv.gz: pgbench's TPC-B-like transactions on
# Debian's PostgreSQL 15 (settings unlike tpcc-pg-a's: scale 2, 8 clients,
# 2 threads, 30 s, --random-seed=5), statement logging on during the run
# only, converted by pgbench_log_to_trace.py. Run as root (the server runs
# as postgres). Usage: capture-pgbench.sh OUT.csv.gz
set -eu
out=$(realpath -m "${1:?usage: $0 OUT.csv.gz}")
here=$(cd "$(dirname "$0")" && pwd)
bin=/usr/lib/postgresql/15/bin
tmp=$(mktemp -d)
chown postgres "$tmp"
as_pg() { runuser -u postgres -- "$@"; }
stop() { as_pg "$bin/pg_ctl" -D "$tmp/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap stop EXIT
as_pg "$bin/initdb" -D "$tmp/data" -A trust -U postgres >/dev/null
as_pg "$bin/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w start -o \
    "-p 54329 -k $tmp -c listen_addresses= -c logging_collector=on -c log_destination=csvlog -c log_directory=$tmp/logs" >/dev/null
run() { as_pg "$@" -h "$tmp" -p 54329 -U postgres; }
run "$bin/pgbench" -i -s 2 -q postgres >/dev/null 2>&1
run "$bin/psql" -q -c "ALTER SYSTEM SET log_statement = 'all'" -c "SELECT pg_reload_conf()" postgres >/dev/null
sleep 1
run "$bin/pgbench" -c 8 -j 2 -T 30 --random-seed=5 postgres >"$tmp/pgbench.out" 2>&1
run "$bin/psql" -q -c "ALTER SYSTEM SET log_statement = 'none'" -c "SELECT pg_reload_conf()" postgres >/dev/null
sleep 1
cat "$tmp/pgbench.out" >&2
python3 "$here/pgbench_log_to_trace.py" "$tmp"/logs/*.csv | gzip -9n >"$out"
