//! The native part of the Python package `forelock` (module
//! `forelock._forelock`): `Client`, `Guard` and the exceptions. The package
//! (`python/forelock/__init__.py`) adds the module-level `lock`, `try_lock`
//! and `lock_shared` over a default client.
//!
//! Every call that may wait (or talk to the broker) runs with the GIL
//! released (`Python::detach`, formerly `allow_threads`), so other Python
//! threads run while one waits for a lock.

use forelock::{Client as RustClient, Error, OwnedLockGuard};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use std::time::Duration;

create_exception!(
    _forelock,
    ForelockError,
    PyException,
    "Base class of every forelock error."
);
create_exception!(
    _forelock,
    InvalidKey,
    ForelockError,
    "The key is empty, too long or contains a NUL byte."
);
create_exception!(
    _forelock,
    BrokerNotRunning,
    ForelockError,
    "Nothing answers on the broker's socket: start forelockd or set FORELOCK_RUNTIME_DIR."
);
create_exception!(
    _forelock,
    RuntimeFileError,
    ForelockError,
    "A runtime file (lock table, event file) cannot be opened, used or trusted."
);
create_exception!(
    _forelock,
    VersionMismatch,
    ForelockError,
    "The client and forelockd come from different releases."
);
create_exception!(
    _forelock,
    Timeout,
    ForelockError,
    "A lock call with a timeout gave up."
);
create_exception!(
    _forelock,
    WouldBlock,
    ForelockError,
    "A try-lock found the key held."
);
create_exception!(
    _forelock,
    TableFull,
    ForelockError,
    "forelockd's lock table is full."
);
create_exception!(
    _forelock,
    TooManyClients,
    ForelockError,
    "forelockd has no free client record."
);
create_exception!(
    _forelock,
    TooManyHolds,
    ForelockError,
    "This client holds as many broker-granted locks as a client may."
);
create_exception!(
    _forelock,
    NotHolder,
    ForelockError,
    "forelockd says this client does not hold the lock it released."
);
create_exception!(
    _forelock,
    BrokerRestarted,
    ForelockError,
    "forelockd restarted and lost this client: create a new Client."
);
create_exception!(
    _forelock,
    LockLost,
    ForelockError,
    "A global key's hold was lost: this host's broker lost its etcd lease, so another host may have held the key since."
);
create_exception!(
    _forelock,
    ProtocolError,
    ForelockError,
    "forelockd answered something this client does not expect."
);

/// The Python exception for a client error, with the client's message.
fn to_py(error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::Key(_) => InvalidKey::new_err(message),
        Error::BrokerNotRunning { .. } => BrokerNotRunning::new_err(message),
        Error::TableUnavailable { .. }
        | Error::TableUnreadable { .. }
        | Error::RuntimeFileUntrusted { .. } => RuntimeFileError::new_err(message),
        Error::VersionMismatch { .. } => VersionMismatch::new_err(message),
        Error::Timeout { .. } => Timeout::new_err(message),
        Error::WouldBlock { .. } => WouldBlock::new_err(message),
        Error::TableFull { .. } => TableFull::new_err(message),
        Error::TooManyClients { .. } => TooManyClients::new_err(message),
        Error::TooManyHolds { .. } => TooManyHolds::new_err(message),
        Error::NotHolder { .. } => NotHolder::new_err(message),
        Error::BrokerRestarted { .. } => BrokerRestarted::new_err(message),
        Error::Protocol { .. } => ProtocolError::new_err(message),
        Error::Lost { .. } => LockLost::new_err(message),
        _ => ForelockError::new_err(message),
    }
}

/// A key: `str` (encoded as UTF-8) or `bytes`.
#[derive(FromPyObject)]
enum Key {
    Text(String),
    Bytes(Vec<u8>),
}

impl Key {
    fn bytes(&self) -> &[u8] {
        match self {
            Key::Text(text) => text.as_bytes(),
            Key::Bytes(bytes) => bytes,
        }
    }
}

/// How long a lock call may wait.
#[derive(Clone, Copy)]
enum Wait {
    Forever,
    Try,
    For(Duration),
}

fn wait_from(timeout: Option<f64>) -> PyResult<Wait> {
    match timeout {
        None => Ok(Wait::Forever),
        Some(t) if t.is_nan() || t < 0.0 => Err(PyValueError::new_err(format!(
            "timeout must be None or a number of seconds >= 0, not {t}"
        ))),
        Some(0.0) => Ok(Wait::Try),
        Some(t) => Ok(Wait::For(Duration::from_secs_f64(t.min(1e9)))),
    }
}

/// A connection to forelockd and a mapping of its lock table. Thread-safe:
/// share one per process.
#[pyclass(module = "forelock._forelock", frozen)]
struct Client {
    client: RustClient,
}

#[pymethods]
impl Client {
    /// Connect to the broker serving `runtime_dir` (default:
    /// $FORELOCK_RUNTIME_DIR, else forelock's default runtime directory).
    #[new]
    #[pyo3(signature = (runtime_dir = None))]
    fn new(py: Python<'_>, runtime_dir: Option<std::path::PathBuf>) -> PyResult<Client> {
        let client = py
            .detach(|| match runtime_dir {
                Some(dir) => RustClient::connect_to(dir),
                None => RustClient::connect(),
            })
            .map_err(to_py)?;
        Ok(Client { client })
    }

    /// Take `key` (exclusive, or shared if `shared`), waiting up to `timeout`
    /// seconds (None: as long as it takes; 0: do not wait).
    #[pyo3(signature = (key, *, timeout = None, shared = false))]
    fn lock(
        &self,
        py: Python<'_>,
        key: Key,
        timeout: Option<f64>,
        shared: bool,
    ) -> PyResult<Guard> {
        self.acquire(py, key, shared, wait_from(timeout)?)
    }

    /// Take `key` if it is free, else raise WouldBlock.
    #[pyo3(signature = (key, *, shared = false))]
    fn try_lock(&self, py: Python<'_>, key: Key, shared: bool) -> PyResult<Guard> {
        self.acquire(py, key, shared, Wait::Try)
    }

    /// Take `key` shared (many readers, no writer).
    #[pyo3(signature = (key, *, timeout = None))]
    fn lock_shared(&self, py: Python<'_>, key: Key, timeout: Option<f64>) -> PyResult<Guard> {
        self.acquire(py, key, true, wait_from(timeout)?)
    }

    /// The runtime directory this client serves from.
    #[getter]
    fn runtime_dir(&self) -> std::path::PathBuf {
        self.client.runtime_dir().to_owned()
    }

    fn __repr__(&self) -> String {
        format!(
            "forelock.Client(runtime_dir={:?})",
            self.client.runtime_dir()
        )
    }
}

impl Client {
    fn acquire(&self, py: Python<'_>, key: Key, shared: bool, wait: Wait) -> PyResult<Guard> {
        let client = &self.client;
        let key = key.bytes();
        let guard = py
            .detach(|| {
                let guard = match (shared, wait) {
                    (false, Wait::Forever) => client.lock(key),
                    (false, Wait::Try) => client.try_lock(key),
                    (false, Wait::For(t)) => client.lock_timeout(key, t),
                    (true, Wait::Forever) => client.lock_shared(key),
                    (true, Wait::Try) => client.try_lock_shared(key),
                    (true, Wait::For(t)) => client.lock_shared_timeout(key, t),
                };
                guard.map(|guard| guard.into_owned(client))
            })
            .map_err(to_py)?;
        Ok(Guard {
            token: guard.token(),
            previous_owner_died: guard.previous_owner_died(),
            shared: guard.is_shared(),
            fast_path: guard.fast_path(),
            guard: Some(guard),
        })
    }
}

/// A held lock: a context manager (`with client.lock(key) as g:`) that
/// releases on exit, or call `release()`.
#[pyclass(module = "forelock._forelock")]
struct Guard {
    guard: Option<OwnedLockGuard>,
    token: u64,
    previous_owner_died: bool,
    shared: bool,
    fast_path: bool,
}

#[pymethods]
impl Guard {
    /// The fencing token of this grant: larger than every earlier grant's
    /// token for the same key.
    #[getter]
    fn token(&self) -> u64 {
        self.token
    }

    /// The previous holder died holding the lock: what it protected may be
    /// half-updated.
    #[getter]
    fn previous_owner_died(&self) -> bool {
        self.previous_owner_died
    }

    /// Held in shared mode.
    #[getter]
    fn shared(&self) -> bool {
        self.shared
    }

    /// Granted by this process's own CAS on a prepared key (no broker).
    #[getter]
    fn fast_path(&self) -> bool {
        self.fast_path
    }

    /// Still held (not released yet).
    #[getter]
    fn held(&self) -> bool {
        self.guard.is_some()
    }

    /// Raise `forelock.LockLost` if the hold no longer stands (one round
    /// trip to the broker, the lock untouched): this host lost the node
    /// grant of a global key under it, so another host may hold the key
    /// now; stop writing under it and release it. A local key's hold stands
    /// while its process lives. `ValueError` after `release()`.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        match &self.guard {
            Some(guard) => py.detach(|| guard.check()).map_err(to_py),
            None => Err(pyo3::exceptions::PyValueError::new_err(
                "check() on a released forelock.Guard",
            )),
        }
    }

    /// Release the lock now (a second call does nothing).
    fn release(&mut self, py: Python<'_>) -> PyResult<()> {
        match self.guard.take() {
            Some(guard) => py.detach(|| guard.release()).map_err(to_py),
            None => Ok(()),
        }
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(
        &mut self,
        py: Python<'_>,
        _exc: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<bool> {
        self.release(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "forelock.Guard(token={}, shared={}, previous_owner_died={}, held={})",
            self.token,
            if self.shared { "True" } else { "False" },
            if self.previous_owner_died {
                "True"
            } else {
                "False"
            },
            if self.guard.is_some() {
                "True"
            } else {
                "False"
            },
        )
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Released by the drop of the OwnedLockGuard (a garbage-collected
        // guard releases its lock, silently).
        self.guard.take();
    }
}

#[pymodule]
fn _forelock(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Client>()?;
    m.add_class::<Guard>()?;
    m.add("Error", py.get_type::<ForelockError>())?;
    m.add("InvalidKey", py.get_type::<InvalidKey>())?;
    m.add("BrokerNotRunning", py.get_type::<BrokerNotRunning>())?;
    m.add("RuntimeFileError", py.get_type::<RuntimeFileError>())?;
    m.add("VersionMismatch", py.get_type::<VersionMismatch>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("WouldBlock", py.get_type::<WouldBlock>())?;
    m.add("TableFull", py.get_type::<TableFull>())?;
    m.add("TooManyClients", py.get_type::<TooManyClients>())?;
    m.add("TooManyHolds", py.get_type::<TooManyHolds>())?;
    m.add("NotHolder", py.get_type::<NotHolder>())?;
    m.add("LockLost", py.get_type::<LockLost>())?;
    m.add("BrokerRestarted", py.get_type::<BrokerRestarted>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("MAX_KEY_LEN", forelock::MAX_KEY_LEN)?;
    Ok(())
}
