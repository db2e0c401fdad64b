#!/usr/bin/env python3
"""Converts a PostgreSQL csvlog of pgbench's built-in TPC-B-like script
(log_statement = 'all') to the lock-trace CSV of ../shared/traces/README.md,
with the rules of tpcc-pg-a there:

- UPDATE of pgbench_accounts / pgbench_tellers / pgbench_branches by key
  gives X on account:AID / teller:TID / branch:BID; SELECT abalance ... WHERE
  aid = N gives S on account:N; the history INSERT names no row (no key);
- a key the transaction already holds is not requested again (an S then X
  upgrade is);
- client: the session, numbered in order of first row; hold_us: from the
  statement to its transaction's END/COMMIT/ROLLBACK in the same session
  (1 ms log resolution: a hold under 1 ms is written 1); statements
  without their transaction's end in the log are dropped.

Usage: pgbench_log_to_trace.py CSVLOG... > trace.csv
"""
import csv
import datetime
import re
import sys

ROW = [
    (re.compile(r"^UPDATE pgbench_accounts .* WHERE aid = (\d+)", re.I), "account", "X"),
    (re.compile(r"^SELECT abalance FROM pgbench_accounts WHERE aid = (\d+)", re.I), "account", "S"),
    (re.compile(r"^UPDATE pgbench_tellers .* WHERE tid = (\d+)", re.I), "teller", "X"),
    (re.compile(r"^UPDATE pgbench_branches .* WHERE bid = (\d+)", re.I), "branch", "X"),
]
END = re.compile(r"^(END|COMMIT|ROLLBACK)\b", re.I)


def main():
    open_rows = {}  # session -> [(ts, key, mode)]
    held = {}  # session -> {key: mode}
    rows = []
    for path in sys.argv[1:]:
        with open(path, newline="") as f:
            for rec in csv.reader(f):
                if len(rec) < 14 or not rec[13].startswith("statement: "):
                    continue
                when = datetime.datetime.strptime(rec[0][:23], "%Y-%m-%d %H:%M:%S.%f")
                ts = int(when.timestamp() * 1_000_000)
                session, statement = rec[5], rec[13][len("statement: "):].strip()
                if END.match(statement):
                    for (start, key, mode) in open_rows.pop(session, []):
                        rows.append((start, session, key, mode, max(1, ts - start)))
                    held.pop(session, None)
                    continue
                for pattern, table, mode in ROW:
                    m = pattern.match(statement)
                    if m:
                        key = f"{table}:{m.group(1)}"
                        have = held.setdefault(session, {})
                        if have.get(key) == "X" or have.get(key) == mode:
                            break
                        have[key] = mode
                        open_rows.setdefault(session, []).append((ts, key, mode))
                        break
    rows.sort(key=lambda r: r[0])
    if not rows:
        sys.exit("no rows")
    start = rows[0][0]
    clients = {}
    print("ts_us,client,key,mode,hold_us")
    for ts, session, key, mode, hold in rows:
        client = clients.setdefault(session, len(clients))
        print(f"{ts - start},{client},{key},{mode},{hold}")


main()
