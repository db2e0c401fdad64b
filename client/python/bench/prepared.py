"""Prepared acquire+release from Python: forelock beside fcntl.flock and
the filelock package, in one run (the numbers the issue's language row asks
for, until `forelock bench` has that row).

    python3 client/python/bench/prepared.py RUNTIME_DIR [ITERS]

Needs a running forelockd on RUNTIME_DIR (it prepares the key after the
first use) and `pip install filelock` for the last line.
"""

import fcntl
import os
import sys
import tempfile
import time

import forelock


def per_op_ns(body, iters):
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter_ns()
        body(iters)
        best = min(best, (time.perf_counter_ns() - start) / iters)
    return best


def main():
    runtime_dir = sys.argv[1]
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    client = forelock.Client(runtime_dir)
    for _ in range(2000):  # let the broker prepare the key
        client.lock("bench:py").release()
        time.sleep(0.0001)
    probe = client.lock("bench:py")
    fast = probe.fast_path
    probe.release()

    def with_forelock(n):
        lock = client.lock
        for _ in range(n):
            lock("bench:py").release()

    def with_context_manager(n):
        lock = client.lock
        for _ in range(n):
            with lock("bench:py"):
                pass

    path = os.path.join(tempfile.gettempdir(), f"fl-bench-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def with_flock(n):
        flock = fcntl.flock
        for _ in range(n):
            flock(fd, fcntl.LOCK_EX)
            flock(fd, fcntl.LOCK_UN)

    rows = [
        ("forelock (Python, lock().release())", per_op_ns(with_forelock, iters)),
        ("forelock (Python, with lock():)", per_op_ns(with_context_manager, iters)),
        ("fcntl.flock (same fd)", per_op_ns(with_flock, iters)),
    ]
    try:
        import filelock

        file_lock = filelock.FileLock(path + ".lock")

        def with_filelock(n):
            for _ in range(n):
                with file_lock:
                    pass

        rows.append(("filelock.FileLock", per_op_ns(with_filelock, max(iters // 10, 1000))))
    except ImportError:
        print("filelock is not installed: pip install filelock", file=sys.stderr)
    os.close(fd)
    os.unlink(path)
    base = rows[0][1]
    print(f"fast path taken: {bool(fast)}")
    for name, ns in rows:
        print(f"{name:40s} {ns:10.0f} ns/op   {ns / base:6.1f}x forelock")


if __name__ == "__main__":
    main()
