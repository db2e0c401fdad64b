#!/bin/sh
# Captures pgbench-pg-b.csv.gz: the TPC-B-like transactions of
# pgbench-skewed.sql (accounts drawn Zipf(1.1), tellers and branches
# uniform) on Debian's PostgreSQL 15, settings unlike pgbench-pg-a's and
# tpcc-pg-a's: scale 10 (1,000,000 accounts, 100 tellers, 10 branches),
# 16 clients, 2 threads, 40 s, --random-seed=16; otherwise as
# capture-pgbench.sh. Run as root. Usage: capture-pgbench-skewed.sh OUT.csv.gz
set -eu
here=$(cd "$(dirname "$0")" && pwd)
SCALE=10 SCRIPT="$here/pgbench-skewed.sql" ARGS="-c 16 -j 2 -T 40 --random-seed=16" \
    exec "$here/capture-pgbench.sh" "$@"
