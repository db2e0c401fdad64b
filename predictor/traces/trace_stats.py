#!/usr/bin/env python3
"""Validates a lock trace (../shared/traces/README.md format) and prints the
README table's figures. Usage: trace_stats.py TRACE.csv.gz..."""
import gzip, os, statistics, sys

def stats(path):
    with gzip.open(path, "rt", newline="") as f:
        header = f.readline().rstrip("\n")
        assert header == "ts_us,client,key,mode,hold_us", header
        last = {}
        rows = xs = rec_lt = rec_le = seen = 0
        clients = set(); holds = []; prev_ts = None; first_ts = None
        for n, line in enumerate(f, 2):
            parts = line.rstrip("\n").split(",")
            assert len(parts) == 5, (n, line)
            ts, client, key, mode, hold = int(parts[0]), int(parts[1]), parts[2], parts[3], int(parts[4])
            assert parts[0] == str(ts) and parts[4] == str(hold) and parts[1] == str(client), (n, line)
            if first_ts is None:
                first_ts = ts
                assert ts == 0, "first ts not 0"
            assert prev_ts is None or ts >= prev_ts, ("unsorted", n)
            prev_ts = ts
            assert 0 < len(key.encode()) <= 64 and all(32 <= ord(c) < 127 and c not in "\"'" for c in key), (n, key)
            assert mode in ("X", "S"), (n, mode)
            assert hold >= 1, (n, hold)
            assert client <= len(clients), ("client not numbered in order of first appearance", n)
            rows += 1; clients.add(client); holds.append(hold); xs += mode == "X"
            if key in last:
                seen += 1
                gap = ts - last[key]
                rec_lt += gap < 500_000
                rec_le += gap <= 500_000
            last[key] = ts
    holds.sort()
    print(f"{os.path.basename(path)}: valid; rows {rows:,}, distinct keys {len(last):,}, clients {len(clients)}, "
          f"duration {prev_ts/1e6:.2f} s, X share {xs/rows:.3f}, median hold {statistics.median(holds)} us "
          f"(low {statistics.median_low(holds)}), recent500 {rec_le/rows:.3f} (strict {rec_lt/rows:.3f}), "
          f"seen before {seen/rows:.3f}, size {os.path.getsize(path):,} B")

for p in sys.argv[1:]:
    stats(p)
