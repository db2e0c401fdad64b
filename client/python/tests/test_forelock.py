"""The Python package against a real forelockd (see conftest.py)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import forelock


def test_a_with_block_holds_the_lock_and_releases_it(broker_dir):
    client = forelock.Client(broker_dir)
    other = forelock.Client(broker_dir)
    with client.lock("orders:42") as g:
        assert g.held and g.token > 0
        assert not g.previous_owner_died and not g.shared
        g.check()  # a local hold stands while this process lives
        with pytest.raises(forelock.WouldBlock) as raised:
            other.try_lock("orders:42")
        assert "orders:42" in str(raised.value)
        first = g.token
    assert not g.held
    with pytest.raises(ValueError):
        g.check()
    with other.try_lock("orders:42") as g2:
        assert g2.token > first


def test_the_module_functions_use_the_default_client(broker_dir):
    forelock.connect(broker_dir)
    with forelock.lock("orders:1") as g:
        assert forelock.default_client().runtime_dir is not None
        with pytest.raises(forelock.WouldBlock):
            forelock.Client(broker_dir).try_lock("orders:1")
    with forelock.try_lock(b"orders:1") as g2:
        assert g2.token > g.token
    with forelock.lock_shared("orders:1", timeout=1) as r:
        assert r.shared


def test_a_timeout_raises_timeout_with_the_clients_message(broker_dir):
    a, b = forelock.Client(broker_dir), forelock.Client(broker_dir)
    with a.lock("k"):
        start = time.monotonic()
        with pytest.raises(forelock.Timeout) as raised:
            b.lock("k", timeout=0.05)
        assert time.monotonic() - start < 5
        assert "timed out" in str(raised.value)
        with pytest.raises(forelock.WouldBlock):
            b.lock("k", timeout=0)
    with pytest.raises(ValueError):
        a.lock("k", timeout=-1)


def test_shared_locks_admit_readers_and_keep_writers_out(broker_dir):
    a, b = forelock.Client(broker_dir), forelock.Client(broker_dir)
    with a.lock_shared("cfg") as r1, b.lock("cfg", shared=True, timeout=1) as r2:
        assert r1.shared and r2.shared
        with pytest.raises(forelock.WouldBlock):
            b.try_lock("cfg")
    with b.try_lock("cfg") as w:
        assert not w.shared


def test_errors_are_forelock_errors_with_their_message(broker_dir):
    with pytest.raises(forelock.BrokerNotRunning) as raised:
        forelock.Client("/nonexistent/forelock")
    assert "not running" in str(raised.value)
    client = forelock.Client(broker_dir)
    with pytest.raises(forelock.InvalidKey):
        client.lock("")
    with pytest.raises(forelock.Error):
        client.lock("x" * (forelock.MAX_KEY_LEN + 1))
    g = client.lock("twice")
    g.release()
    g.release()  # a second release does nothing


def test_the_gil_is_released_while_a_lock_waits(broker_dir):
    a, b = forelock.Client(broker_dir), forelock.Client(broker_dir)
    held = a.lock("gil")
    outcome = {}

    def wait():
        # Bounded: were the GIL kept, this thread would stop the main one
        # for 3 s and the progress check below would fail, not hang.
        try:
            with b.lock("gil", timeout=3) as g:
                outcome["token"] = g.token
        except forelock.Timeout:
            outcome["timeout"] = True

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    steps, gaps, last = 0, [], time.monotonic()
    while steps < 50:
        time.sleep(0.002)
        now = time.monotonic()
        gaps.append(now - last)
        last, steps = now, steps + 1
    assert max(gaps) < 1.0, f"the main thread stalled {max(gaps):.2f} s while a lock waited"
    assert waiter.is_alive()
    first = held.token
    held.release()
    waiter.join(10)
    assert outcome.get("token", 0) > first, outcome


def test_the_next_holder_learns_that_the_previous_one_died(broker_dir):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import forelock, sys, time\n"
            "g = forelock.Client(sys.argv[1]).lock('dying')\n"
            "print('HELD', flush=True)\n"
            "time.sleep(60)\n",
            str(broker_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert holder.stdout.readline().strip() == "HELD"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with forelock.Client(broker_dir).lock("dying", timeout=10) as g:
        assert g.previous_owner_died
