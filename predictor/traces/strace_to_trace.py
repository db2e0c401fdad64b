#!/usr/bin/env python3
"""Converts `strace -f -ttt -yy` output to the lock-trace CSV of
../shared/traces/README.md, with the rules of build-strace-a there:

- each successful openat of a file that is not a directory (nor O_PATH, nor
  under /proc, /sys, /dev; -yy names sockets and pipes otherwise) is a row;
- key: the path's last two components, '@', 6 hex digits of the SHA-1 of
  the full path with the temporary root (argv[2]) replaced by '<tmp>';
- mode: X if opened O_WRONLY or O_RDWR, else S;
- client: the fd table (threads created with CLONE_FILES share their
  parent's), numbered in order of first row;
- hold_us: until the matching close in the same fd table, else exec (for
  O_CLOEXEC fds), close_range or exit of the table's last process; 1 if
  none of these was seen.

Usage: strace_to_trace.py STRACE_LOG TMP_ROOT > trace.csv
"""
import hashlib
import os
import re
import sys

LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)(<([^>]*)>)?")

def main():
    log, root = sys.argv[1], sys.argv[2].rstrip("/")
    pending = {}
    table_of = {}  # pid -> fd-table id
    open_fds = {}  # (table, fd) -> row index
    cloexec = {}  # (table, fd) -> bool
    rows = []  # [ts_us, table, key, mode, end_ts_or_None]
    def table(pid):
        return table_of.setdefault(pid, pid)
    def finish(table_id, fd, ts):
        row = open_fds.pop((table_id, fd), None)
        cloexec.pop((table_id, fd), None)
        if row is not None and rows[row][4] is None:
            rows[row][4] = ts
    for raw in open(log, errors="replace"):
        m = LINE.match(raw.rstrip("\n"))
        if not m:
            continue
        pid, ts, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")]
            continue
        if rest.startswith("<... "):
            head = pending.pop(pid, None)
            if head is None:
                continue
            rest = head + rest[rest.index("resumed>") + len("resumed>"):]
        if rest.startswith("+++ exited") or rest.startswith("+++ killed"):
            t = table(pid)
            if sum(1 for p, tt in table_of.items() if tt == t) <= 1:
                for (tt, fd) in [k for k in open_fds if k[0] == t]:
                    finish(tt, fd, ts)
            table_of.pop(pid, None)
            continue
        c = CALL.match(rest)
        if not c:
            continue
        name, args, ret, target = c.group(1), c.group(2), int(c.group(3)), c.group(5)
        t = table(pid)
        if name in ("clone", "clone3", "fork", "vfork") and ret > 0:
            table_of[ret] = t if "CLONE_FILES" in args else ret
            if "CLONE_FILES" not in args:
                # A copy of the parent's table: its fds stay with the parent's rows.
                pass
        elif name == "execve" and ret == 0:
            for key in [k for k in open_fds if k[0] == t and cloexec.get(k)]:
                finish(key[0], key[1], ts)
        elif name == "close_range" and ret == 0:
            numbers = re.findall(r"\d+", args)
            if len(numbers) >= 2:
                low, high = int(numbers[0]), int(numbers[1])
                for key in [k for k in open_fds if k[0] == t and low <= k[1] <= high]:
                    finish(key[0], key[1], ts)
        elif name == "close" and ret == 0:
            fd = re.match(r"(\d+)", args)
            if fd:
                finish(t, int(fd.group(1)), ts)
        elif name == "openat" and ret >= 0 and target:
            path = target
            if any(f in args for f in ("O_DIRECTORY", "O_PATH")):
                continue
            if path.startswith(("/proc", "/sys", "/dev")) or ":[" in path:
                continue
            if os.path.isdir(path):
                continue
            write = "O_WRONLY" in args or "O_RDWR" in args
            named = path.replace(root, "<tmp>", 1) if path.startswith(root) else path
            digest = hashlib.sha1(named.encode()).hexdigest()[:6]
            parts = [p for p in named.split("/") if p]
            key = "/".join(parts[-2:]) + "@" + digest
            key = "".join(ch if 32 < ord(ch) < 127 and ch not in ',"' else "_" for ch in key)
            key = key[-64:]
            finish(t, ret, ts)
            open_fds[(t, ret)] = len(rows)
            cloexec[(t, ret)] = "O_CLOEXEC" in args
            rows.append([ts, t, key, "X" if write else "S", None])
    if not rows:
        sys.exit("no rows")
    start = min(r[0] for r in rows)
    rows.sort(key=lambda r: r[0])  # stable: capture order on ties
    clients = {}
    print("ts_us,client,key,mode,hold_us")
    for ts, t, key, mode, end in rows:
        client = clients.setdefault(t, len(clients))
        hold = max(1, round((end - ts) * 1e6)) if end is not None else 1
        print(f"{round((ts - start) * 1e6)},{client},{key},{mode},{hold}")

main()
