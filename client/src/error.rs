//! The one error type of the client: each variant says what happened and what
//! a person can do about it.

use shm_layout::wire::ErrorCode;
use shm_layout::{KeyError, LayoutError};
use std::path::PathBuf;
use std::time::Duration;

/// Everything a [`crate::Client`] call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key is empty, longer than [`shm_layout::MAX_KEY_LEN`] or contains a
    /// NUL byte: nothing was sent anywhere.
    #[error(transparent)]
    Key(#[from] KeyError),

    /// Nothing answers on the broker's socket.
    #[error(
        "forelockd is not running at {}: {cause}; start forelockd, or set \
         FORELOCK_RUNTIME_DIR to the directory it serves",
        socket.display()
    )]
    BrokerNotRunning {
        /// The socket path that was tried.
        socket: PathBuf,
        cause: std::io::Error,
    },

    /// A runtime file (the lock table or the access-event file) exists but its
    /// contents cannot be used.
    #[error("the forelock runtime file {} cannot be used: {cause}", path.display())]
    TableUnavailable { path: PathBuf, cause: LayoutError },

    /// A runtime file could not be opened or mapped.
    #[error(
        "cannot open the forelock runtime file {}: {cause}; is forelockd running and serving \
         this directory (FORELOCK_RUNTIME_DIR), and may this user read and write it?",
        path.display()
    )]
    TableUnreadable {
        path: PathBuf,
        cause: std::io::Error,
    },

    /// A runtime file (the lock table or the access-event file) failed the
    /// client's trust checks before it was mapped: it must be a regular file
    /// (not a symbolic link), owned by the owner of its runtime directory,
    /// and not writable by other users (nor may the directory be).
    #[error(
        "the forelock runtime file {} is not trustworthy: {problem}; forelockd makes its files          regular files of its own user, not writable by other users, in a directory of its own:          check FORELOCK_RUNTIME_DIR, restart forelockd to recreate its files, and find out who          changed them (docs/security.md)",
        path.display()
    )]
    RuntimeFileUntrusted { path: PathBuf, problem: String },

    /// The client and the broker (or the files it wrote) come from different
    /// forelock releases.
    #[error(
        "version mismatch: {detail}; run a client (forelock {}) and a forelockd of the same \
         release, or restart forelockd to recreate its files",
        env!("CARGO_PKG_VERSION")
    )]
    VersionMismatch { detail: String },

    /// `lock_timeout` / `lock_shared_timeout` gave up.
    #[error("timed out after {waited:?} waiting for lock {key:?}: another holder kept it")]
    Timeout { key: String, waited: Duration },

    /// `try_lock` / `try_lock_shared` found the key held.
    #[error("lock {key:?} is held by someone else (try-lock does not wait)")]
    WouldBlock { key: String },

    /// The broker has no free slot and no idle one to evict.
    #[error(
        "forelockd's lock table is full ({message}): raise its slot count in the broker \
         configuration, or release locks"
    )]
    TableFull { message: String },

    /// Every client record of the table is taken.
    #[error(
        "forelockd has no free client record ({message}): too many processes use it at once; \
         raise its client count, or close idle clients"
    )]
    TooManyClients { message: String },

    /// This client holds as many broker-granted locks as a client may.
    #[error(
        "this client already holds {max} broker-granted locks (shared or slow-path): release \
         some first ({message})",
        max = shm_layout::table::BROKER_HOLDS
    )]
    TooManyHolds { message: String },

    /// The broker says this client does not hold the lock it tried to release.
    #[error(
        "forelockd says this client does not hold the lock on slot {slot} with token {token} \
         ({message}); it was released already, or its holder was declared dead"
    )]
    NotHolder {
        slot: u32,
        token: u64,
        message: String,
    },

    /// The broker restarted and no longer knows this client: its locks are gone.
    #[error(
        "forelockd restarted and lost this client's registration ({detail}): every lock it held \
         is gone; create a new Client"
    )]
    BrokerRestarted { detail: String },

    /// The broker broke the protocol (or refused a request as malformed).
    #[error(
        "forelockd answered something this client does not expect: {message}; run a client and \
         broker of the same release"
    )]
    Protocol { message: String },

    /// A global key's hold ended without a release: this host's broker lost
    /// its node grant (its etcd lease could not be confirmed in time), so
    /// another host may hold the key now. Anything done under the lock must
    /// have been fenced with its token; see docs/cluster.md.
    #[error("lock lost: {message}")]
    Lost { message: String },
    /// Any other system error while talking to the broker.
    #[error("I/O error talking to forelockd: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The error for a broker `Error` response to a request about `key` (or
    /// about `slot`/`token` for a release).
    pub(crate) fn from_broker(
        code: ErrorCode,
        message: String,
        release: Option<(u32, u64)>,
    ) -> Error {
        match code {
            ErrorCode::TableFull => Error::TableFull { message },
            ErrorCode::TooManyClients => Error::TooManyClients { message },
            ErrorCode::TooManyHolds => Error::TooManyHolds { message },
            ErrorCode::NotHolder => {
                let (slot, token) = release.unwrap_or((u32::MAX, 0));
                Error::NotHolder {
                    slot,
                    token,
                    message,
                }
            }
            ErrorCode::NotYourRecord => Error::BrokerRestarted { detail: message },
            ErrorCode::VersionMismatch => Error::VersionMismatch { detail: message },
            ErrorCode::BadKey | ErrorCode::BadRequest => Error::Protocol { message },
            ErrorCode::Lost => Error::Lost { message },
        }
    }

    /// For a file problem: a version mismatch is its own variant, the rest say
    /// which file is unusable.
    pub(crate) fn from_layout(path: PathBuf, cause: LayoutError) -> Error {
        match cause {
            LayoutError::VersionMismatch { .. } => Error::VersionMismatch {
                detail: format!("{}: {cause}", path.display()),
            },
            cause => Error::TableUnavailable { path, cause },
        }
    }
}

pub(crate) fn key_text(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}
