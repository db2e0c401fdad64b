//! One connection to the broker (SOCK_SEQPACKET: one message per packet), and
//! the shared futex wait on a wait cell.

use crate::error::Error;
use shm_layout::sync::shm::AtomicU32;
use shm_layout::wire::{self, Request, Response};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// How long one answer from the broker may take before the connection is
/// considered broken. Every request is answered at once (a queued acquire is
/// answered `Queued`), so this only bounds a hung broker.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a call polls for the broker's answer before it sleeps in `recv`
/// (environment variable `FORELOCK_ANSWER_SPIN_US`, microseconds; 0 sleeps
/// at once). The broker answers most requests in a few microseconds, and a
/// caller asleep in `recv` must then be woken: on a virtual machine whose
/// idle vCPU halted, that wake-up costs tens of microseconds, more than the
/// request itself. The poll yields the CPU between looks
/// (`sched_yield`), so on a busy CPU the broker or any other runnable
/// process goes first. Bounded: at most this much CPU per call. Measured
/// (`forelock bench --systems forelock-fresh,unix-socket --workloads
/// uncontended-2p`, 2-core VM, lightly loaded): an unprepared key's
/// acquire+release 44.9 us without the poll, 10.9 us with it.
const ANSWER_SPIN_DEFAULT: Duration = Duration::from_micros(50);

fn answer_spin() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        std::env::var("FORELOCK_ANSWER_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map_or(ANSWER_SPIN_DEFAULT, Duration::from_micros)
    })
}

/// What went wrong on a connection: the broker went away (reconnect and retry)
/// or something else (report).
#[derive(Debug)]
pub(crate) enum ConnError {
    /// EOF, ECONNRESET, EPIPE, ENOTCONN, or no answer in time: the broker is
    /// gone or hung.
    Broken(io::Error),
    /// Any other failure.
    Other(Error),
}

impl From<Error> for ConnError {
    fn from(e: Error) -> ConnError {
        ConnError::Other(e)
    }
}

fn classify(e: io::Error) -> ConnError {
    match e.raw_os_error() {
        Some(
            libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN | libc::EAGAIN | libc::ECONNREFUSED,
        ) => ConnError::Broken(e),
        _ => ConnError::Other(Error::Io(e)),
    }
}

/// A connection that said Hello and owns wait cell `cell`.
#[derive(Debug)]
pub(crate) struct Conn {
    fd: OwnedFd,
    pub(crate) cell: u32,
    /// The table header's broker epoch read just after this connection was
    /// welcomed (set by the caller, which has the table): a different epoch
    /// later means the broker that welcomed us is gone.
    pub(crate) epoch: u64,
}

/// A connected, not yet greeted SOCK_SEQPACKET socket to `path`.
pub(crate) fn connect_socket(path: &Path) -> io::Result<OwnedFd> {
    connect_socket_within(path, RESPONSE_TIMEOUT, None)
}

/// Set socket option `option` (SO_RCVTIMEO or SO_SNDTIMEO) of `fd` to `timeout`.
fn set_timeout(fd: &OwnedFd, option: libc::c_int, timeout: Duration) -> io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY:
    // - `fd` is an open socket;
    // - `timeout` is a valid timeval, and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`connect_socket`] with an answer timeout of `recv_timeout` and, if
/// `send_timeout` is given, a bound on the connect (a broker that does not
/// accept fills its backlog) and on each send.
pub(crate) fn connect_socket_within(
    path: &Path,
    recv_timeout: Duration,
    send_timeout: Option<Duration>,
) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain integers and bytes; all-zero is a valid
    // (empty) address that we fill in below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path is {} bytes, the limit is {}: use a shorter runtime directory",
                bytes.len(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) has no memory preconditions; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, open descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_timeout(&fd, libc::SO_RCVTIMEO, recv_timeout)?;
    if let Some(timeout) = send_timeout {
        set_timeout(&fd, libc::SO_SNDTIMEO, timeout)?;
    }
    // SAFETY:
    // - `fd` is an open socket we own;
    // - `addr` is an initialised sockaddr_un and the length is its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Whether a failed connect to the broker's socket is worth retrying while
/// it restarts: no socket (yet), nobody listening, a full accept backlog,
/// or a connection reset because the listener died while it was queued
/// (seen: a client's connect during a broker's SIGKILL failed with
/// ECONNRESET, and the client gave up instead of waiting for the restart).
fn connect_retryable(cause: &io::Error) -> bool {
    matches!(
        cause.raw_os_error(),
        Some(libc::ENOENT | libc::ECONNREFUSED | libc::EAGAIN | libc::ECONNRESET)
    )
}

impl Conn {
    /// A connection on `fd` that says no Hello (an observer's): it owns no
    /// wait cell.
    pub(crate) fn unregistered(fd: OwnedFd) -> Conn {
        Conn {
            fd,
            cell: 0,
            epoch: 0,
        }
    }

    /// Connect and say Hello. `client: None` registers a new client record.
    /// Returns the connection and the record index the broker welcomed.
    pub(crate) fn open(
        socket: &Path,
        client: Option<u32>,
        cell: u32,
    ) -> Result<(Conn, u32), ConnError> {
        let fd = connect_socket(socket).map_err(|cause| {
            if connect_retryable(&cause) {
                ConnError::Broken(cause)
            } else {
                ConnError::Other(Error::BrokerNotRunning {
                    socket: socket.to_owned(),
                    cause,
                })
            }
        })?;
        let mut conn = Conn { fd, cell, epoch: 0 };
        let hello = Request::Hello {
            protocol: wire::PROTOCOL_VERSION,
            table_version: shm_layout::table::TABLE_VERSION,
            client,
            cell,
        };
        match conn.call(&hello)? {
            Response::Welcome { client: index, .. } => {
                if client.is_some_and(|asked| asked != index) {
                    return Err(ConnError::Other(Error::Protocol {
                        message: format!("attached to record {client:?}, welcomed as {index}"),
                    }));
                }
                Ok((conn, index))
            }
            Response::Error { code, message } => {
                Err(ConnError::Other(Error::from_broker(code, message, None)))
            }
            other => Err(ConnError::Other(Error::Protocol {
                message: format!("answered Hello with {other:?}"),
            })),
        }
    }

    /// Bound the wait for each answer on this connection to `timeout`.
    pub(crate) fn set_answer_timeout(&self, timeout: Duration) -> io::Result<()> {
        set_timeout(&self.fd, libc::SO_RCVTIMEO, timeout)
    }

    /// Send one request and read its answer.
    pub(crate) fn call(&mut self, request: &Request) -> Result<Response, ConnError> {
        self.send(request)?;
        let spin = answer_spin();
        if !spin.is_zero() {
            let start = std::time::Instant::now();
            loop {
                if let Some(answer) = self.recv_flags(libc::MSG_DONTWAIT)? {
                    return Ok(answer);
                }
                if start.elapsed() >= spin {
                    break;
                }
                // SAFETY: sched_yield takes no arguments and touches no memory.
                unsafe { libc::sched_yield() };
            }
        }
        self.recv()
    }

    pub(crate) fn send(&mut self, request: &Request) -> Result<(), ConnError> {
        let bytes = wire::encode(request);
        // SAFETY:
        // - `self.fd` is an open socket we own;
        // - `bytes` is valid for reads of `bytes.len()` bytes for the call.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if sent < 0 {
            return Err(classify(io::Error::last_os_error()));
        }
        if sent as usize != bytes.len() {
            return Err(ConnError::Broken(io::Error::new(
                io::ErrorKind::WriteZero,
                "short send on a SOCK_SEQPACKET socket",
            )));
        }
        Ok(())
    }

    pub(crate) fn recv(&mut self) -> Result<Response, ConnError> {
        loop {
            if let Some(answer) = self.recv_flags(0)? {
                return Ok(answer);
            }
        }
    }

    /// One `recv` with `flags`: `None` when it would block (with
    /// `MSG_DONTWAIT`) or was interrupted by a signal.
    fn recv_flags(&mut self, flags: libc::c_int) -> Result<Option<Response>, ConnError> {
        let mut buf = [0u8; wire::MAX_MESSAGE + 1];
        // SAFETY:
        // - `self.fd` is an open socket we own;
        // - `buf` is valid for writes of `buf.len()` bytes for the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(None),
                // Without MSG_DONTWAIT, EAGAIN is SO_RCVTIMEO passing: no
                // answer in time (classify says broken).
                io::ErrorKind::WouldBlock if flags & libc::MSG_DONTWAIT != 0 => Ok(None),
                _ => Err(classify(e)),
            };
        }
        let received = n as usize;
        if received == 0 {
            return Err(ConnError::Broken(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "forelockd closed the connection",
            )));
        }
        wire::decode_response(&buf[..received])
            .map(Some)
            .map_err(|e| {
                ConnError::Other(Error::Protocol {
                    message: e.to_string(),
                })
            })
    }

    /// The next message if one is waiting, without blocking.
    pub(crate) fn try_recv(&mut self) -> Result<Option<Response>, ConnError> {
        if !self.wait_readable(Duration::ZERO) {
            return Ok(None);
        }
        self.recv().map(Some)
    }

    /// Wait up to `timeout` for a message (or the peer's close) to be
    /// readable. True if it is.
    pub(crate) fn wait_readable(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is one valid pollfd for the call's duration.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n > 0
    }
}

/// Sleep on `word` while it reads `expected`, for at most `timeout`. Shared
/// futex (no FUTEX_PRIVATE_FLAG): the waker is the broker, another process.
/// Returns on wake, timeout, signal or a changed value: the caller re-reads.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY:
    // - `word` is a valid, 4-aligned u32 (an AtomicU32) that stays alive and
    //   mapped for the call (it lives in the table mapping the caller holds);
    // - `ts` is a valid relative timeout for the call's duration;
    // - FUTEX_WAIT ignores the remaining arguments (uaddr2, val3).
    let _ = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &raw const ts,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::connect_retryable;
    use std::io::Error;

    #[test]
    fn a_connect_reset_by_a_dying_broker_is_retried_like_a_refused_one() {
        for errno in [
            libc::ENOENT,
            libc::ECONNREFUSED,
            libc::EAGAIN,
            libc::ECONNRESET,
        ] {
            assert!(
                connect_retryable(&Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        // A socket we may not open, or a path that is no socket: report.
        for errno in [libc::EACCES, libc::ENOTSOCK, libc::ENAMETOOLONG] {
            assert!(
                !connect_retryable(&Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }
}
