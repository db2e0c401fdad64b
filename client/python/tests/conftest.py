"""A real forelockd per test, on a private runtime directory.

The broker is $FORELOCK_BROKER_EXE, else target/debug/forelockd of this
checkout (or of $CARGO_TARGET_DIR): build it first with
`cargo build -p forelockd`.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
CONFIG = "[table]\nslots = 64\nclients = 16\n"


def broker_exe() -> pathlib.Path:
    if os.environ.get("FORELOCK_BROKER_EXE"):
        return pathlib.Path(os.environ["FORELOCK_BROKER_EXE"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    exe = target / "debug" / "forelockd"
    if not exe.is_file():
        pytest.fail(f"{exe} is missing: build it first: cargo build -p forelockd")
    return exe


@pytest.fixture
def broker_dir():
    """The runtime directory of a freshly started forelockd (killed after the test)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="fl-py-"))
    config = path / "forelockd-test.toml"
    config.write_text(CONFIG)
    proc = subprocess.Popen(
        [str(broker_exe()), "--config", str(config), "--runtime-dir", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FORELOCK_LOG": "info"},
    )
    ready = threading.Event()
    log = []

    def read():
        for line in proc.stderr:
            log.append(line)
            if "forelockd ready" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(20):
        proc.kill()
        pytest.fail("forelockd did not become ready:\n" + "".join(log))
    try:
        yield path
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(path, ignore_errors=True)
