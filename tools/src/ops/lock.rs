//! `forelock lock [-s] [-n] [-w SECS] [-E CODE] --pid PID KEY` and
//! `forelock unlock --pid PID KEY`: a lock held on behalf of process PID
//! (typically a shell script's `$$`) until PID exits or `unlock` releases it:
//! flock's `exec 9>f; flock -n 9 || exit` idiom, which `forelock run`
//! cannot express.
//!
//! ```sh
//! token=$(forelock lock -n --pid $$ nightly-backup) || exit 1   # held until the script exits
//! echo "backing up with fencing token $token"
//! forelock unlock --pid $$ nightly-backup                        # or just exit
//! ```
//!
//! How: `lock` starts a small detached holder process (this binary again,
//! with `--holder`, in a new session, its stdio on /dev/null). The holder is
//! an ordinary client: it takes the lock, reports the token to `lock` over a
//! pipe (which prints it and exits), then sleeps in poll(2) on
//!
//! - a pidfd of PID: when PID exits, the holder releases the lock (a clean
//!   release: the next holder is not told that an owner died) and exits;
//! - a control socket in the abstract Unix namespace named from the uid, the
//!   runtime directory, PID and KEY: `unlock` connects and asks for the
//!   release. Only a peer of the same uid (or root) is obeyed (SO_PEERCRED),
//!   and `unlock` only believes a holder of its own uid (or root).
//!
//! If the holder itself dies (SIGKILL), the broker, which watches every
//! client with a pidfd, releases the lock and tells the next holder that the
//! owner died. One hold per (uid, runtime dir, PID, KEY): a second `lock` of
//! the same key for the same PID fails with the conflict code. The abstract
//! namespace belongs to the network namespace: `lock` and `unlock` must run
//! in the same one.
//!
//! Exit codes of `lock`: 0 held (the token on stdout); the conflict code
//! (`-E`, default 1) when `-n` finds the lock held, `-w` times out or PID
//! already holds KEY; 64 for an invalid key; 69 when the broker, PID or the
//! holder process is not available. `unlock`: 0 released, 1 no such hold,
//! 75 (EX_TEMPFAIL) when the hold had ended without a release (a global
//! key's node grant lost, the broker's table recreated: another process
//! may have held the key meanwhile, so the script's writes must have been
//! fenced with its token).

use super::RuntimeDirArg;
use super::run::{
    EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, FlockFlags, hold_ended, saying_why_a_global_key_waits,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct LockArgs {
    #[command(flatten)]
    pub runtime: RuntimeDirArg,
    #[command(flatten)]
    pub flock: FlockFlags,
    /// Hold the lock until this process exits (a shell's `$$`).
    #[arg(long, value_name = "PID")]
    pub pid: u32,
    /// The lock's name.
    pub key: String,
    /// Internal: be the holder process (started by `forelock lock`).
    #[arg(long, hide = true)]
    pub holder: bool,
}

#[derive(clap::Args, Debug)]
pub struct UnlockArgs {
    #[command(flatten)]
    pub runtime: RuntimeDirArg,
    /// The process the lock is held for (as given to `forelock lock --pid`).
    #[arg(long, value_name = "PID")]
    pub pid: u32,
    /// The lock's name.
    pub key: String,
}

/// The abstract socket name of the hold of (`uid`, `dir`, `pid`, `key`).
fn control_name(dir: &std::path::Path, pid: u32, key: &str) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir_hash = shm_layout::key_hash(dir.as_os_str().as_bytes());
    let key_hash = shm_layout::key_hash(key.as_bytes());
    format!("forelock-lock/{uid}/{dir_hash:016x}/{pid}/{key_hash:016x}").into_bytes()
}

/// The uid of the peer of a connected Unix socket.
fn peer_uid(fd: RawFd) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` its size, as SO_PEERCRED
    // expects; `fd` is an open socket borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// A peer we obey (or believe): our own uid, or root.
fn trusted(uid: u32) -> bool {
    // SAFETY: getuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::getuid() }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    if pid == 0 || pid > i32::MAX as u32 {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: pidfd_open takes a pid and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `forelock lock`: start the holder, relay what it says; the exit code.
pub fn lock(args: &LockArgs) -> i32 {
    if args.holder {
        return hold(args);
    }
    if let Err(e) = shm_layout::validate_key(args.key.as_bytes()) {
        eprintln!("forelock lock: {e}");
        return EX_USAGE;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("forelock lock: cannot find this program to start the holder: {e}");
            return EX_UNAVAILABLE;
        }
    };
    let mut command = Command::new(exe);
    command
        .arg("lock")
        .arg("--holder")
        .arg("--runtime-dir")
        .arg(args.runtime.dir())
        .arg("--pid")
        .arg(args.pid.to_string());
    if args.flock.shared {
        command.arg("--shared");
    }
    if args.flock.nonblock {
        command.arg("--nonblock");
    }
    if let Some(timeout) = args.flock.timeout {
        command.arg("--timeout").arg(timeout.to_string());
    }
    command
        .arg("--")
        .arg(&args.key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let hook = || {
        // A session of its own: the terminal's signals (^C) are not its
        // business, only PID's exit is.
        // SAFETY: setsid has no memory preconditions and is async-signal-safe.
        if unsafe { libc::setsid() } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Keep no descriptor of the caller (a script's pipes) open for as
        // long as the lock is held: only stdio (/dev/null and the report
        // pipe) survives. Best effort: EXEC sets CLOEXEC on the rest anyway.
        // SAFETY: close_range takes plain integers and is async-signal-safe.
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and only calls
    // async-signal-safe functions (setsid, close_range); it allocates nothing.
    unsafe { command.pre_exec(hook) };
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("forelock lock: cannot start the holder process: {e}");
            return EX_UNAVAILABLE;
        }
    };
    let mut report = String::new();
    let stdout = child.stdout.take().expect("piped");
    // The holder waits for the lock; its stderr goes nowhere, so this
    // process says why a global key waits, if it can tell.
    let _ = saying_why_a_global_key_waits("forelock lock", &args.runtime.dir(), &args.key, || {
        BufReader::new(stdout).read_line(&mut report)
    });
    let mut words = report.trim_end().splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some("HELD"), Some(token), died) => {
            if died == Some("owner-died") {
                eprintln!(
                    "forelock lock: the previous holder of {:?} died holding it",
                    args.key
                );
            }
            println!("{token}");
            0
        }
        (Some("CONFLICT"), message, rest) => {
            if let Some(message) = message {
                eprintln!("forelock lock: {message} {}", rest.unwrap_or(""));
            }
            // The holder exits by itself: reap it so no zombie is left.
            let _ = child.wait();
            args.flock.conflict_exit_code
        }
        (Some("ERROR"), Some(code), message) => {
            eprintln!("forelock lock: {}", message.unwrap_or("failed"));
            let _ = child.wait();
            code.parse().unwrap_or(EX_UNAVAILABLE)
        }
        _ => {
            let status = child.wait();
            eprintln!(
                "forelock lock: the holder process ended without taking the lock ({status:?})"
            );
            EX_UNAVAILABLE
        }
    }
}

/// Set once the holder holds the lock: the watcher thread no longer ends
/// the process when PID exits (the main loop releases cleanly instead).
static HELD: AtomicBool = AtomicBool::new(false);

/// The holder process: take the lock, report, hold until PID exits or an
/// `unlock` arrives. Its exit code matters to nobody (it is detached).
fn hold(args: &LockArgs) -> i32 {
    let mut report = std::io::stdout();
    let mut say = |line: String| {
        let _ = writeln!(report, "{line}");
        let _ = report.flush();
    };
    let dir = args.runtime.dir();
    let pidfd = match pidfd_open(args.pid) {
        Ok(fd) => fd,
        Err(e) => {
            say(format!(
                "ERROR {EX_UNAVAILABLE} cannot watch process {}: {e} (is it running?)",
                args.pid
            ));
            return EX_UNAVAILABLE;
        }
    };
    let name = control_name(&dir, args.pid, &args.key);
    let listener = match SocketAddr::from_abstract_name(&name)
        .and_then(|addr| UnixListener::bind_addr(&addr))
    {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            say(format!(
                "CONFLICT process {} already holds {:?} through forelock lock (forelock unlock \
                 --pid {} releases it)",
                args.pid, args.key, args.pid
            ));
            return 1;
        }
        Err(e) => {
            say(format!(
                "ERROR {EX_UNAVAILABLE} cannot create the control socket: {e}"
            ));
            return EX_UNAVAILABLE;
        }
    };
    // While the lock is awaited, PID's exit ends the wait (and this process:
    // the broker withdraws the request of a dead client).
    let watched = pidfd.as_raw_fd();
    std::thread::spawn(move || {
        loop {
            if readable(&[watched], -1).first() == Some(&true) && !HELD.load(Ordering::SeqCst) {
                // SAFETY: _exit ends the process at once; nothing is held yet
                // (HELD is false), so nothing is left half-done.
                unsafe { libc::_exit(0) };
            }
            if HELD.load(Ordering::SeqCst) {
                return;
            }
        }
    });
    let client = match forelock::Client::connect_to(&dir) {
        Ok(client) => client,
        Err(e) => {
            say(format!("ERROR {EX_UNAVAILABLE} {e}"));
            return EX_UNAVAILABLE;
        }
    };
    let guard = args.flock.take(&client, &args.key);
    let guard = match guard {
        Ok(guard) => guard,
        Err(e @ (forelock::Error::WouldBlock { .. } | forelock::Error::Timeout { .. })) => {
            say(format!("CONFLICT {e}"));
            return 1;
        }
        Err(e) => {
            say(format!("ERROR {EX_UNAVAILABLE} {e}"));
            return EX_UNAVAILABLE;
        }
    };
    HELD.store(true, Ordering::SeqCst);
    let died = if guard.previous_owner_died() {
        " owner-died"
    } else {
        ""
    };
    say(format!("HELD {}{died}", guard.token()));
    // The caller has its token: close the pipe (it may be a `$(...)`
    // waiting for EOF) by putting /dev/null in its place.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1 with an open fd; stdout is not used after.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    loop {
        let ready = readable(&[pidfd.as_raw_fd(), listener.as_raw_fd()], -1);
        if ready[0] {
            // PID exited: release, as closing a flock(2) descriptor would.
            let _ = guard.release();
            return 0;
        }
        if ready[1]
            && let Ok((stream, _)) = listener.accept()
            && let Some(mut stream) = serve_unlock(stream)
        {
            let answer = match guard.release() {
                Err(e) if hold_ended(&e) => format!("lost {e}\n"),
                _ => "released\n".to_string(),
            };
            // The name is free again before `unlock` returns (it waits for
            // EOF on `stream`): a `lock` right after it may bind it.
            drop(listener);
            let _ = stream.write_all(answer.as_bytes());
            drop(stream);
            return 0;
        }
    }
}

/// Read one `unlock` request: the stream if the lock must be released
/// (to be answered after the release: `released`, or `lost` and why).
fn serve_unlock(mut stream: UnixStream) -> Option<UnixStream> {
    match peer_uid(stream.as_raw_fd()) {
        Ok(uid) if trusted(uid) => {}
        _ => return None,
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut request = [0u8; 7];
    if stream.read_exact(&mut request).is_err() || &request != b"unlock\n" {
        return None;
    }
    Some(stream)
}

/// poll(2) for readability; one flag per fd (all false on a timeout/error).
fn readable(fds: &[RawFd], timeout_ms: i32) -> Vec<bool> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `polls` is a valid array of `polls.len()` pollfd structures.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    polls.iter().map(|p| p.revents != 0).collect()
}

/// `forelock unlock`: ask the holder to release; 0 released, 1 no such hold,
/// 75 the hold had ended without a release.
pub fn unlock(args: &UnlockArgs) -> i32 {
    let name = control_name(&args.runtime.dir(), args.pid, &args.key);
    let stream =
        SocketAddr::from_abstract_name(&name).and_then(|addr| UnixStream::connect_addr(&addr));
    let mut stream = match stream {
        Ok(stream) => stream,
        Err(_) => {
            eprintln!(
                "forelock unlock: process {} holds no lock {:?} through forelock lock (here, \
                 for this user)",
                args.pid, args.key
            );
            return 1;
        }
    };
    match peer_uid(stream.as_raw_fd()) {
        Ok(uid) if trusted(uid) => {}
        _ => {
            eprintln!(
                "forelock unlock: the holder socket of {:?} belongs to another user: not a \
                 forelock holder",
                args.key
            );
            return 1;
        }
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut answer = String::new();
    if stream.write_all(b"unlock\n").is_err()
        || BufReader::new(&stream).read_line(&mut answer).is_err()
    {
        eprintln!(
            "forelock unlock: the holder of {:?} did not answer",
            args.key
        );
        return 1;
    }
    // The holder answers after its release and then closes the socket:
    // wait for that so that the lock is free when we return.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    match answer.strip_prefix("lost ") {
        None if answer == "released\n" => 0,
        Some(why) => {
            eprintln!("forelock unlock: {:?}: {}", args.key, why.trim_end());
            EX_TEMPFAIL
        }
        None => {
            eprintln!(
                "forelock unlock: the holder of {:?} answered {answer:?}",
                args.key
            );
            1
        }
    }
}
