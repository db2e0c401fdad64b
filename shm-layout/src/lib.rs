//! The byte formats forelock processes share: the runtime files under the
//! runtime directory and the messages on the broker's socket.
//!
//! | file (under the runtime dir) | module | written by | read by |
//! |---|---|---|---|
//! | `table` | [`table`], [`lockword`] | broker; clients CAS prepared lock words | broker, clients |
//! | `events` | [`events`] | clients and broker, lossy | forecaster |
//! | `scores` | [`scores`] | forecaster | broker's allocator |
//! | `broker.sock` (SOCK_SEQPACKET) | [`wire`] | both | both |
//!
//! No I/O and no policy live here: only `#[repr(C)]` types that assert their
//! own size and offsets, the state machine of the lock word, validation that
//! names what is wrong, and the key rules.
//!
//! ```
//! use shm_layout::{validate_key, key_hash, KeyError};
//! assert!(validate_key(b"orders:1:2").is_ok());
//! assert!(matches!(validate_key(b""), Err(KeyError::Empty)));
//! assert_eq!(key_hash(b"a"), key_hash(b"a"));
//! ```

pub mod events;
pub mod lockword;
pub mod scores;
pub mod sync;
pub mod table;
pub mod wire;

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 64;

/// File names under the runtime directory.
pub const TABLE_FILE: &str = "table";
pub const EVENTS_FILE: &str = "events";
pub const SCORES_FILE: &str = "scores";
pub const SOCKET_FILE: &str = "broker.sock";
pub const PID_FILE: &str = "forelockd.lock";

/// The hash every process uses for a key: xxh3-64 with the default seed. Part
/// of the table format ([`table::TABLE_VERSION`]): changing it is a version bump.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("empty lock key: a key names the lock, give it at least one byte")]
    Empty,
    #[error("lock key is {len} bytes, longer than the {max}-byte limit: hash or shorten it")]
    TooLong { len: usize, max: usize },
    #[error("lock key contains a NUL byte at offset {offset}: keys are text without NUL")]
    ContainsNul { offset: usize },
}

/// Check a key: 1 to [`MAX_KEY_LEN`] bytes, no NUL.
#[inline]
pub fn validate_key(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    if let Some(offset) = key.iter().position(|&b| b == 0) {
        return Err(KeyError::ContainsNul { offset });
    }
    Ok(())
}

/// Why a runtime file cannot be used. Each says what was found and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "file is {found} bytes, shorter than the {needed} its header needs: it was truncated; stop \
         forelockd, remove the runtime directory's files and start forelockd again"
    )]
    Truncated { found: u64, needed: u64 },
    #[error(
        "not a forelock {what} file (magic bytes {found:02x?}): the runtime directory holds \
         someone else's file; point FORELOCK_RUNTIME_DIR at forelock's directory"
    )]
    ForeignFile { what: &'static str, found: [u8; 8] },
    #[error("the file was written on a machine of the other byte order: it cannot be shared")]
    WrongEndianness,
    #[error("the file is still being created (version word is 0): retry in a moment")]
    NotReady,
    #[error(
        "{what} format version {found}, this build supports {supported}: run a client and \
         broker of the same forelock release (or restart forelockd to recreate the table)"
    )]
    VersionMismatch {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{what} of {found} is out of range ({allowed})")]
    BadGeometry {
        what: &'static str,
        found: u64,
        allowed: &'static str,
    },
    #[error(
        "corrupted: {what}; stop forelockd, remove the runtime directory's files and start it again"
    )]
    Corrupted { what: &'static str },
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock every timestamp in the
/// runtime files uses (shared by all processes on the host).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// The calling thread's CPU time, in nanoseconds: what the cost
/// measurements read, since it holds on a shared machine (a thread that is
/// not running accrues none), unlike wall time.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration, and
    // both clocks used here are always supported on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where the system broker serves: systemd's `RuntimeDirectory=forelock`.
pub const SYSTEM_RUNTIME_DIR: &str = "/run/forelock";

/// The runtime directory every forelock process uses unless told otherwise:
/// `$FORELOCK_RUNTIME_DIR` if set; else `/run/forelock` if it exists, whatever
/// our uid (the systemd broker serves there, and its clients are ordinary
/// users of its access group); else `/run/forelock` for root (a broker about
/// to create it); else `$XDG_RUNTIME_DIR/forelock`; else
/// `/tmp/forelock-<uid>` (forelockd creates it 0700 and refuses one another
/// user owns).
pub fn default_runtime_dir() -> std::path::PathBuf {
    default_runtime_dir_from(
        std::env::var_os("FORELOCK_RUNTIME_DIR"),
        std::path::Path::new(SYSTEM_RUNTIME_DIR).is_dir(),
        // SAFETY: getuid has no preconditions and cannot fail.
        unsafe { libc::getuid() },
        std::env::var_os("XDG_RUNTIME_DIR"),
    )
}

/// [`default_runtime_dir`]'s rule over its inputs (the environment, whether
/// `/run/forelock` exists, the uid), so that it can be tested.
pub fn default_runtime_dir_from(
    forelock_runtime_dir: Option<std::ffi::OsString>,
    system_dir_exists: bool,
    uid: u32,
    xdg_runtime_dir: Option<std::ffi::OsString>,
) -> std::path::PathBuf {
    if let Some(dir) = forelock_runtime_dir.filter(|d| !d.is_empty()) {
        return dir.into();
    }
    if system_dir_exists || uid == 0 {
        return SYSTEM_RUNTIME_DIR.into();
    }
    if let Some(xdg) = xdg_runtime_dir.filter(|d| !d.is_empty()) {
        return std::path::PathBuf::from(xdg).join("forelock");
    }
    format!("/tmp/forelock-{uid}").into()
}

#[cfg(test)]
mod runtime_dir_tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn the_default_runtime_dir_follows_the_documented_order() {
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        let rule = default_runtime_dir_from;
        assert_eq!(rule(some("/x"), true, 0, some("/xdg")), PathBuf::from("/x"));
        // A user's client finds the systemd broker, not its own XDG dir.
        assert_eq!(
            rule(None, true, 1000, some("/run/user/1000")),
            PathBuf::from("/run/forelock")
        );
        assert_eq!(
            rule(None, false, 0, some("/xdg")),
            PathBuf::from("/run/forelock")
        );
        assert_eq!(
            rule(None, false, 1000, some("/run/user/1000")),
            PathBuf::from("/run/user/1000/forelock")
        );
        assert_eq!(
            rule(None, false, 1000, None),
            PathBuf::from("/tmp/forelock-1000")
        );
        assert_eq!(
            rule(some(""), false, 1000, some("")),
            PathBuf::from("/tmp/forelock-1000")
        );
    }
}
