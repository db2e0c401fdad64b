"""forelock: named locks shared by the processes of one host, served by forelockd.

    import forelock

    with forelock.lock("orders:42") as g:      # waits (FIFO), the GIL released
        if g.previous_owner_died:
            ...                                # repair what the dead holder left
        store.write(data, fence=g.token)       # tokens only grow, per key

    try:
        with forelock.try_lock("orders:43"):
            ...
    except forelock.WouldBlock:
        ...

    with forelock.lock("config", shared=True, timeout=0.5):
        ...

A call takes the lock at once (the ``with`` only releases it on exit). The
module-level functions use one default `Client` per process, connected on
first use to $FORELOCK_RUNTIME_DIR (or forelock's default runtime directory);
`connect(runtime_dir)` chooses another. Errors are subclasses of
`forelock.Error`, each with the client's message (what happened, what to do).
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Union

from ._forelock import (
    MAX_KEY_LEN,
    BrokerNotRunning,
    BrokerRestarted,
    Client,
    Error,
    Guard,
    InvalidKey,
    NotHolder,
    LockLost,
    ProtocolError,
    RuntimeFileError,
    TableFull,
    Timeout,
    TooManyClients,
    TooManyHolds,
    VersionMismatch,
    WouldBlock,
)

__all__ = [
    "MAX_KEY_LEN",
    "BrokerNotRunning",
    "BrokerRestarted",
    "Client",
    "Error",
    "Guard",
    "InvalidKey",
    "NotHolder",
    "LockLost",
    "ProtocolError",
    "RuntimeFileError",
    "TableFull",
    "Timeout",
    "TooManyClients",
    "TooManyHolds",
    "VersionMismatch",
    "WouldBlock",
    "connect",
    "default_client",
    "lock",
    "lock_shared",
    "try_lock",
]

Key = Union[str, bytes]

_default: Optional[Client] = None
_default_pid: Optional[int] = None
_default_lock = threading.Lock()


def connect(runtime_dir: Optional[Union[str, os.PathLike]] = None) -> Client:
    """Connect the default client to the broker serving `runtime_dir`."""
    global _default, _default_pid
    client = Client(runtime_dir)
    with _default_lock:
        _default, _default_pid = client, os.getpid()
    return client


def default_client() -> Client:
    """The process's default client, connected on first use (again after a fork)."""
    global _default, _default_pid
    with _default_lock:
        if _default is None or _default_pid != os.getpid():
            _default, _default_pid = Client(), os.getpid()
        return _default


def lock(key: Key, *, timeout: Optional[float] = None, shared: bool = False) -> Guard:
    """Take `key` through the default client (see `Client.lock`)."""
    return default_client().lock(key, timeout=timeout, shared=shared)


def try_lock(key: Key, *, shared: bool = False) -> Guard:
    """Take `key` if it is free, else raise `WouldBlock`."""
    return default_client().try_lock(key, shared=shared)


def lock_shared(key: Key, *, timeout: Optional[float] = None) -> Guard:
    """Take `key` shared through the default client."""
    return default_client().lock_shared(key, timeout=timeout)
