#!/bin/sh
# Captures pgbench-pg-b.csv.gz: the TPC-B-like transactions of
# pgbench-skewed.sql (accounts drawn Zipf(1.1), tellers and branches
# uniform) on Debian's PostgreSQL 15, settings unlike pgbench-pg-a's and
# tpcc-pg-a's: scale 10 (1,000,000 accounts, 100 tellers, 10 branches),
# 16 clients, 2 threads, 40 s, --random-seed=16. Statement logging is on
# during the run only; the log is converted by pgbench_log_to_trace.py, as
# for pgbench-pg-a. Run as root (the server runs as postgres).
# Usage: capture-pgbench-skewed.sh OUT.csv.gz
set -eu
out=$(realpath -m "${1:?usage: $0 OUT.csv.gz}")
here=$(cd "$(dirname "$0")" && pwd)
bin=/usr/lib/postgresql/15/bin
tmp=$(mktemp -d)
chown postgres "$tmp"
as_pg() { runuser -u postgres -- "$@"; }
stop() { as_pg "$bin/pg_ctl" -D "$tmp/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap stop EXIT
cp "$here/pgbench-skewed.sql" "$tmp/" && chown postgres "$tmp/pgbench-skewed.sql"
as_pg "$bin/initdb" -D "$tmp/data" -A trust -U postgres >/dev/null
as_pg "$bin/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w start -o \
    "-p 54329 -k $tmp -c listen_addresses= -c logging_collector=on -c log_destination=csvlog -c log_directory=$tmp/logs" >/dev/null
run() { as_pg "$@" -h "$tmp" -p 54329 -U postgres; }
run "$bin/pgbench" -i -s 10 -q postgres >/dev/null 2>&1
run "$bin/psql" -q -c "ALTER SYSTEM SET log_statement = 'all'" -c "SELECT pg_reload_conf()" postgres >/dev/null
sleep 1
run "$bin/pgbench" -f "$tmp/pgbench-skewed.sql" -s 10 -c 16 -j 2 -T 40 --random-seed=16 postgres >"$tmp/pgbench.out" 2>&1
run "$bin/psql" -q -c "ALTER SYSTEM SET log_statement = 'none'" -c "SELECT pg_reload_conf()" postgres >/dev/null
sleep 1
cat "$tmp/pgbench.out" >&2
python3 "$here/pgbench_log_to_trace.py" "$tmp"/logs/*.csv | gzip -9n >"$out"
