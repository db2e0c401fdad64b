//! The C ABI of the forelock client: `libforelock_capi.so` (cdylib),
//! `libforelock_capi.a` (staticlib) and `include/forelock.h`, generated from
//! this file by cbindgen (see `build.rs`).
//!
//! ```c
//! #include <forelock.h>
//! forelock_client *client;
//! if (forelock_connect(NULL, &client) != FORELOCK_OK) {
//!     fprintf(stderr, "%s\n", forelock_last_error());
//!     return 1;
//! }
//! forelock_guard *guard;
//! if (forelock_lock(client, "orders:42", &guard) == FORELOCK_OK) {
//!     printf("token %llu\n", (unsigned long long)forelock_guard_token(guard));
//!     forelock_release(guard);
//! }
//! forelock_client_free(client);
//! ```
//!
//! - Every call that can fail returns an error code (`FORELOCK_OK` is 0);
//!   `forelock_strerror(code)` names the code and `forelock_last_error()`
//!   gives the full message of the last failure on the calling thread (what
//!   happened and what to do, as the Rust client words it).
//! - A `forelock_client` is thread-safe: share one per process, call it from
//!   any thread at once. A `forelock_guard` may be released from any thread,
//!   but by one thread only, once.
//! - A guard keeps its client alive: `forelock_client_free` may come before
//!   the guards are released.
//! - A panic inside the library never crosses into C: the call returns
//!   `FORELOCK_E_PANIC`.

// The C names of the handle types (`forelock_client`, `forelock_guard`).
#![allow(non_camel_case_types)]

use forelock::{Client, Error, OwnedLockGuard};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Duration;

/// Success.
pub const FORELOCK_OK: c_int = 0;
/// A required pointer argument was NULL, or a string was not valid.
pub const FORELOCK_E_INVALID_ARGUMENT: c_int = 1;
/// The key is empty, longer than `FORELOCK_MAX_KEY_LEN` bytes, or not allowed.
pub const FORELOCK_E_KEY: c_int = 2;
/// Nothing answers on the broker's socket: forelockd is not running there.
pub const FORELOCK_E_BROKER_NOT_RUNNING: c_int = 3;
/// A runtime file exists but cannot be used, cannot be opened, or failed
/// the trust checks.
pub const FORELOCK_E_RUNTIME_FILE: c_int = 4;
/// The client and the broker come from different forelock releases.
pub const FORELOCK_E_VERSION_MISMATCH: c_int = 5;
/// A lock call with a timeout gave up.
pub const FORELOCK_E_TIMEOUT: c_int = 6;
/// A try-lock found the key held.
pub const FORELOCK_E_WOULD_BLOCK: c_int = 7;
/// The broker's lock table is full.
pub const FORELOCK_E_TABLE_FULL: c_int = 8;
/// The broker has no free client record.
pub const FORELOCK_E_TOO_MANY_CLIENTS: c_int = 9;
/// This client holds as many broker-granted locks as a client may.
pub const FORELOCK_E_TOO_MANY_HOLDS: c_int = 10;
/// The broker says this client does not hold the lock it released.
pub const FORELOCK_E_NOT_HOLDER: c_int = 11;
/// The broker restarted and lost this client: connect again.
pub const FORELOCK_E_BROKER_RESTARTED: c_int = 12;
/// The broker answered something this client does not expect.
pub const FORELOCK_E_PROTOCOL: c_int = 13;
/// Any other system error.
pub const FORELOCK_E_IO: c_int = 14;
/// A bug: the library panicked (the message says where).
pub const FORELOCK_E_PANIC: c_int = 15;
/// A global key's hold was lost: this host's broker could not confirm its
/// etcd lease in time, so another host may have held the key since. The
/// release is done; what was written under the lock must carry its token.
pub const FORELOCK_E_LOST: c_int = 16;

/// The longest key, in bytes (without the terminating NUL).
pub const FORELOCK_MAX_KEY_LEN: usize = 64;
const _: () = assert!(FORELOCK_MAX_KEY_LEN == forelock::MAX_KEY_LEN);

/// A connection to forelockd and a mapping of its lock table. Thread-safe.
pub struct forelock_client {
    client: Client,
}

/// A held lock. Release it with `forelock_release`, which frees it.
pub struct forelock_guard {
    guard: OwnedLockGuard,
}

thread_local! {
    /// The message of the last failed call on this thread.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
}

fn error_code(error: &Error) -> c_int {
    match error {
        Error::Key(_) => FORELOCK_E_KEY,
        Error::BrokerNotRunning { .. } => FORELOCK_E_BROKER_NOT_RUNNING,
        Error::TableUnavailable { .. }
        | Error::TableUnreadable { .. }
        | Error::RuntimeFileUntrusted { .. } => FORELOCK_E_RUNTIME_FILE,
        Error::VersionMismatch { .. } => FORELOCK_E_VERSION_MISMATCH,
        Error::Timeout { .. } => FORELOCK_E_TIMEOUT,
        Error::WouldBlock { .. } => FORELOCK_E_WOULD_BLOCK,
        Error::TableFull { .. } => FORELOCK_E_TABLE_FULL,
        Error::TooManyClients { .. } => FORELOCK_E_TOO_MANY_CLIENTS,
        Error::TooManyHolds { .. } => FORELOCK_E_TOO_MANY_HOLDS,
        Error::NotHolder { .. } => FORELOCK_E_NOT_HOLDER,
        Error::BrokerRestarted { .. } => FORELOCK_E_BROKER_RESTARTED,
        Error::Protocol { .. } => FORELOCK_E_PROTOCOL,
        Error::Lost { .. } => FORELOCK_E_LOST,
        _ => FORELOCK_E_IO,
    }
}

/// Run `body`, turning an error or a panic into a code and the thread's
/// last message.
fn guarded(body: impl FnOnce() -> Result<(), (c_int, String)>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => FORELOCK_OK,
        Ok(Err((code, message))) => {
            set_last_error(message);
            code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!(
                "forelock panicked (a bug, please report it): {what}"
            ));
            FORELOCK_E_PANIC
        }
    }
}

fn client_error(error: Error) -> (c_int, String) {
    (error_code(&error), error.to_string())
}

fn invalid(what: &str) -> (c_int, String) {
    (FORELOCK_E_INVALID_ARGUMENT, what.to_string())
}

/// The name of an error code, for messages: "FORELOCK_E_TIMEOUT: a lock call
/// with a timeout gave up". Never NULL; the string is static.
#[unsafe(no_mangle)]
pub extern "C" fn forelock_strerror(code: c_int) -> *const c_char {
    let text: &'static CStr = match code {
        FORELOCK_OK => c"FORELOCK_OK: success",
        FORELOCK_E_INVALID_ARGUMENT => {
            c"FORELOCK_E_INVALID_ARGUMENT: a NULL pointer or an invalid string was passed"
        }
        FORELOCK_E_KEY => c"FORELOCK_E_KEY: the key is empty or too long",
        FORELOCK_E_BROKER_NOT_RUNNING => {
            c"FORELOCK_E_BROKER_NOT_RUNNING: forelockd is not running at the runtime directory"
        }
        FORELOCK_E_RUNTIME_FILE => {
            c"FORELOCK_E_RUNTIME_FILE: a forelock runtime file cannot be opened, used or trusted"
        }
        FORELOCK_E_VERSION_MISMATCH => {
            c"FORELOCK_E_VERSION_MISMATCH: client and forelockd come from different releases"
        }
        FORELOCK_E_TIMEOUT => c"FORELOCK_E_TIMEOUT: timed out waiting for the lock",
        FORELOCK_E_WOULD_BLOCK => c"FORELOCK_E_WOULD_BLOCK: the lock is held by someone else",
        FORELOCK_E_TABLE_FULL => c"FORELOCK_E_TABLE_FULL: forelockd's lock table is full",
        FORELOCK_E_TOO_MANY_CLIENTS => {
            c"FORELOCK_E_TOO_MANY_CLIENTS: forelockd has no free client record"
        }
        FORELOCK_E_TOO_MANY_HOLDS => {
            c"FORELOCK_E_TOO_MANY_HOLDS: this client holds too many broker-granted locks"
        }
        FORELOCK_E_NOT_HOLDER => {
            c"FORELOCK_E_NOT_HOLDER: forelockd says this client does not hold the lock"
        }
        FORELOCK_E_BROKER_RESTARTED => {
            c"FORELOCK_E_BROKER_RESTARTED: forelockd restarted and lost this client; connect again"
        }
        FORELOCK_E_PROTOCOL => c"FORELOCK_E_PROTOCOL: forelockd answered something unexpected",
        FORELOCK_E_IO => c"FORELOCK_E_IO: I/O error talking to forelockd",
        FORELOCK_E_PANIC => c"FORELOCK_E_PANIC: the library panicked (a bug)",
        _ => c"unknown forelock error code",
    };
    text.as_ptr()
}

/// The full message of the last failed call on the calling thread ("" if
/// none failed yet). Never NULL. Valid until the next failing call on this
/// thread.
#[unsafe(no_mangle)]
pub extern "C" fn forelock_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// Connect to the broker serving `runtime_dir`, or the default runtime
/// directory if it is NULL (`$FORELOCK_RUNTIME_DIR`, else `/run/forelock`
/// when it exists or for root, else `$XDG_RUNTIME_DIR/forelock`, else
/// `/tmp/forelock-<uid>`). On success `*out` is a new client, to be freed
/// with `forelock_client_free`.
///
/// # Safety
/// - `runtime_dir` is NULL or points to a NUL-terminated string;
/// - `out` points to writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_connect(
    runtime_dir: *const c_char,
    out: *mut *mut forelock_client,
) -> c_int {
    guarded(|| {
        if out.is_null() {
            return Err(invalid("forelock_connect: `out` is NULL"));
        }
        let result = if runtime_dir.is_null() {
            Client::connect()
        } else {
            // SAFETY: `runtime_dir` is non-NULL and NUL-terminated (the
            // caller's contract).
            let dir = unsafe { CStr::from_ptr(runtime_dir) };
            use std::os::unix::ffi::OsStrExt;
            Client::connect_to(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
        };
        let client = result.map_err(client_error)?;
        let handle = Box::into_raw(Box::new(forelock_client { client }));
        // SAFETY: `out` is non-NULL and writable (the caller's contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Free a client made by `forelock_connect`. Guards taken through it stay
/// valid (they keep what they need alive). NULL is ignored.
///
/// # Safety
/// `client` is NULL or a pointer returned by `forelock_connect` that was not
/// freed yet; no other thread uses it during or after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_client_free(client: *mut forelock_client) {
    if client.is_null() {
        return;
    }
    // SAFETY: `client` came from Box::into_raw in `forelock_connect` and is
    // freed once (the caller's contract).
    let client = unsafe { Box::from_raw(client) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(client)));
}

#[derive(Clone, Copy)]
enum Wait {
    Forever,
    Try,
    Timeout(Duration),
}

/// # Safety
/// As for `forelock_lock`.
unsafe fn acquire(
    client: *const forelock_client,
    key: *const c_char,
    shared: bool,
    wait: Wait,
    out: *mut *mut forelock_guard,
) -> c_int {
    guarded(|| {
        if client.is_null() || key.is_null() || out.is_null() {
            return Err(invalid("a NULL client, key or out pointer"));
        }
        // SAFETY: `client` is non-NULL and a live client from
        // `forelock_connect`, shared only by reference across threads
        // (`Client` is Sync).
        let client = unsafe { &(*client).client };
        // SAFETY: `key` is non-NULL and NUL-terminated (the caller's contract).
        let key = unsafe { CStr::from_ptr(key) }.to_bytes();
        let guard = match (shared, wait) {
            (false, Wait::Forever) => client.lock(key),
            (false, Wait::Try) => client.try_lock(key),
            (false, Wait::Timeout(t)) => client.lock_timeout(key, t),
            (true, Wait::Forever) => client.lock_shared(key),
            (true, Wait::Try) => client.try_lock_shared(key),
            (true, Wait::Timeout(t)) => client.lock_shared_timeout(key, t),
        }
        .map_err(client_error)?;
        let guard = guard.into_owned(client);
        let handle = Box::into_raw(Box::new(forelock_guard { guard }));
        // SAFETY: `out` is non-NULL and writable (the caller's contract).
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Take `key` exclusively, waiting as long as it takes. On success `*out`
/// is the held lock, to be given to `forelock_release`.
///
/// # Safety
/// - `client` is a live pointer from `forelock_connect`;
/// - `key` points to a NUL-terminated string;
/// - `out` points to writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_lock(
    client: *const forelock_client,
    key: *const c_char,
    out: *mut *mut forelock_guard,
) -> c_int {
    // SAFETY: the same contract as ours.
    unsafe { acquire(client, key, false, Wait::Forever, out) }
}

/// Take `key` exclusively if it is free; `FORELOCK_E_WOULD_BLOCK` if held.
///
/// # Safety
/// As for `forelock_lock`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_try_lock(
    client: *const forelock_client,
    key: *const c_char,
    out: *mut *mut forelock_guard,
) -> c_int {
    // SAFETY: the same contract as ours.
    unsafe { acquire(client, key, false, Wait::Try, out) }
}

/// Take `key` exclusively, waiting at most `timeout_ms` milliseconds
/// (`FORELOCK_E_TIMEOUT` then).
///
/// # Safety
/// As for `forelock_lock`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_lock_timeout(
    client: *const forelock_client,
    key: *const c_char,
    timeout_ms: u64,
    out: *mut *mut forelock_guard,
) -> c_int {
    let wait = Wait::Timeout(Duration::from_millis(timeout_ms));
    // SAFETY: the same contract as ours.
    unsafe { acquire(client, key, false, wait, out) }
}

/// Take `key` shared (many readers, no writer), waiting as long as it takes.
///
/// # Safety
/// As for `forelock_lock`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_lock_shared(
    client: *const forelock_client,
    key: *const c_char,
    out: *mut *mut forelock_guard,
) -> c_int {
    // SAFETY: the same contract as ours.
    unsafe { acquire(client, key, true, Wait::Forever, out) }
}

/// Take `key` shared if no writer holds or awaits it;
/// `FORELOCK_E_WOULD_BLOCK` otherwise.
///
/// # Safety
/// As for `forelock_lock`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_try_lock_shared(
    client: *const forelock_client,
    key: *const c_char,
    out: *mut *mut forelock_guard,
) -> c_int {
    // SAFETY: the same contract as ours.
    unsafe { acquire(client, key, true, Wait::Try, out) }
}

/// Take `key` shared, waiting at most `timeout_ms` milliseconds.
///
/// # Safety
/// As for `forelock_lock`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_lock_shared_timeout(
    client: *const forelock_client,
    key: *const c_char,
    timeout_ms: u64,
    out: *mut *mut forelock_guard,
) -> c_int {
    let wait = Wait::Timeout(Duration::from_millis(timeout_ms));
    // SAFETY: the same contract as ours.
    unsafe { acquire(client, key, true, wait, out) }
}

/// The fencing token of the grant: larger than every earlier grant's token
/// for the same key. 0 if `guard` is NULL.
///
/// # Safety
/// `guard` is NULL or a live pointer from a lock call, not yet released.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_guard_token(guard: *const forelock_guard) -> u64 {
    // SAFETY: NULL or live (the caller's contract); read by reference only.
    unsafe { guard.as_ref() }.map_or(0, |g| g.guard.token())
}

/// Whether the previous holder died holding the lock (what it protected may
/// be half-updated). false if `guard` is NULL.
///
/// # Safety
/// `guard` is NULL or a live pointer from a lock call, not yet released.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_guard_previous_owner_died(guard: *const forelock_guard) -> bool {
    // SAFETY: NULL or live (the caller's contract); read by reference only.
    unsafe { guard.as_ref() }.is_some_and(|g| g.guard.previous_owner_died())
}

/// Whether the lock is held shared. false if `guard` is NULL.
///
/// # Safety
/// `guard` is NULL or a live pointer from a lock call, not yet released.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_guard_is_shared(guard: *const forelock_guard) -> bool {
    // SAFETY: NULL or live (the caller's contract); read by reference only.
    unsafe { guard.as_ref() }.is_some_and(|g| g.guard.is_shared())
}

/// Whether the hold still stands: one round trip to the broker, the lock
/// untouched. `FORELOCK_E_LOST` once this host lost the node grant of a
/// global key under it (another host may hold the key now: stop writing
/// under it and release it); a local key's hold stands while its process
/// lives. NULL is `FORELOCK_E_INVALID_ARGUMENT`.
///
/// # Safety
/// `guard` is NULL or a live pointer from a lock call, not yet released.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_guard_check(guard: *const forelock_guard) -> c_int {
    guarded(|| {
        // SAFETY: NULL or live (the caller's contract); read by reference only.
        let Some(guard) = (unsafe { guard.as_ref() }) else {
            return Err(invalid("forelock_guard_check: `guard` is NULL"));
        };
        guard.guard.check().map_err(client_error)
    })
}

/// Release the lock and free `guard` (whatever the result: do not use it
/// again). NULL is `FORELOCK_E_INVALID_ARGUMENT`.
///
/// # Safety
/// `guard` is NULL or a live pointer from a lock call, released once, and
/// used by no other thread during or after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forelock_release(guard: *mut forelock_guard) -> c_int {
    guarded(|| {
        if guard.is_null() {
            return Err(invalid("forelock_release: `guard` is NULL"));
        }
        // SAFETY: `guard` came from Box::into_raw in a lock call and is
        // released once (the caller's contract).
        let guard = unsafe { Box::from_raw(guard) };
        guard.guard.release().map_err(client_error)
    })
}
