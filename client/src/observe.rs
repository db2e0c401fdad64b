//! Questions about the broker's state that need no [`crate::Client`]: an
//! observer (`forelock locks`, a monitoring script) asks them on a
//! connection that never says Hello, so it takes no client record and can
//! take no lock.
//!
//! Every call is bounded by the timeout given at connect: a broker that is
//! busy, stopped (SIGSTOP) or hung makes the call fail after that long, never
//! wait.
//!
//! ```no_run
//! # fn main() -> Result<(), forelock::Error> {
//! let dir = std::path::Path::new("/run/forelock");
//! let w = forelock::observe::waiters(dir, "orders:42")?;
//! for waiter in &w.waiters {
//!     println!("pid {} waits ({})", waiter.pid, if waiter.shared { "shared" } else { "exclusive" });
//! }
//! # Ok(())
//! # }
//! ```

use crate::conn::{Conn, ConnError, connect_socket_within};
use crate::error::Error;
use shm_layout::SOCKET_FILE;
use shm_layout::wire::{Request, Response};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use shm_layout::wire::{WAITERS_MAX, WaiterInfo};

/// The timeout of [`waiters`]: an observer must not hang on a stuck broker.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

/// Who waits for a key, as the broker answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiters {
    /// The queued acquires, head of the queue (the next to be granted)
    /// first; at most [`WAITERS_MAX`] of them.
    pub waiters: Vec<WaiterInfo>,
    /// How many are queued in all (more than `waiters.len()` when the list
    /// was cut at [`WAITERS_MAX`]).
    pub total: u32,
}

/// A connection to the broker for observers (no Hello, no client record).
#[derive(Debug)]
pub struct Observer {
    conn: Conn,
    socket: PathBuf,
    timeout: Duration,
}

impl Observer {
    /// Connect to the broker serving `runtime_dir`. Connecting, and each
    /// later question, gives up after `timeout` (at least 1 ms).
    pub fn connect(runtime_dir: impl AsRef<Path>, timeout: Duration) -> Result<Observer, Error> {
        let socket = runtime_dir.as_ref().join(SOCKET_FILE);
        // A zero timeval means "no timeout" to the kernel.
        let timeout = timeout.max(Duration::from_millis(1));
        let fd = connect_socket_within(&socket, timeout, Some(timeout)).map_err(|cause| {
            if is_timeout(&cause) {
                did_not_answer(timeout)
            } else {
                Error::BrokerNotRunning {
                    socket: socket.clone(),
                    cause,
                }
            }
        })?;
        Ok(Observer {
            conn: Conn::unregistered(fd),
            socket,
            timeout,
        })
    }

    /// Who waits for `key` in the broker's queue, head first. An unknown
    /// key, or one nobody waits for, has none.
    pub fn waiters(&mut self, key: impl AsRef<[u8]>) -> Result<Waiters, Error> {
        let request = Request::Waiters {
            key: key.as_ref().to_vec(),
        };
        match self.conn.call(&request) {
            Ok(Response::Waiters { waiters, total }) => Ok(Waiters { waiters, total }),
            Ok(Response::Error { code, message }) => Err(Error::from_broker(code, message, None)),
            Ok(other) => Err(Error::Protocol {
                message: format!("answered Waiters with {other:?}"),
            }),
            Err(ConnError::Broken(cause)) if is_timeout(&cause) => {
                Err(did_not_answer(self.timeout))
            }
            Err(ConnError::Broken(cause)) => Err(Error::BrokerNotRunning {
                socket: self.socket.clone(),
                cause,
            }),
            Err(ConnError::Other(e)) => Err(e),
        }
    }
}

/// Who waits for `key` at the broker serving `runtime_dir`, asked on a
/// connection of its own within [`DEFAULT_TIMEOUT`].
pub fn waiters(runtime_dir: impl AsRef<Path>, key: impl AsRef<[u8]>) -> Result<Waiters, Error> {
    Observer::connect(runtime_dir, DEFAULT_TIMEOUT)?.waiters(key)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EINPROGRESS | libc::ETIMEDOUT)
    )
}

fn did_not_answer(timeout: Duration) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("forelockd did not answer within {timeout:?} (busy, stopped or hung)"),
    ))
}
