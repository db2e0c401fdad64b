//! `forelock run KEY -- COMMAND [ARGS...]`: run a command while holding a
//! lock, with the flags and exit codes of flock(1).
//!
//! This process holds the lock (it is the registered client) and waits for
//! the command. SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to it are passed on
//! to the command, and the lock is released once the command has exited or
//! been killed. If this process itself is killed (SIGKILL), the broker
//! releases the lock when it sees the process die, and the command gets
//! SIGKILL too (PR_SET_PDEATHSIG), so it never runs on without the lock.
//!
//! Exit codes: the command's exit status; 128 + N if signal N killed it; the
//! conflict code (`-E`, default 1) when `-n` finds the lock held or `-w`
//! times out; 64 (EX_USAGE) for an invalid key; 69 (EX_UNAVAILABLE) when the
//! broker cannot be reached or the command cannot be started (as flock(1));
//! 71 (EX_OSERR) when waiting for the command fails; 75 (EX_TEMPFAIL) when
//! the lock was a global key's and this host lost it while the command ran
//! (its broker could not confirm its etcd lease in time, docs/cluster.md):
//! another host may have held the key meanwhile, so whatever the command
//! wrote must have been fenced with its token (`FORELOCK_TOKEN`). The command
//! is not stopped early when the hold is lost; it learns it from this code.

use super::RuntimeDirArg;
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::Duration;

pub const EX_USAGE: i32 = 64;
pub const EX_UNAVAILABLE: i32 = 69;
pub const EX_OSERR: i32 = 71;
pub const EX_TEMPFAIL: i32 = 75;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub runtime: RuntimeDirArg,
    /// Take a shared (read) lock instead of an exclusive one.
    #[arg(short = 's', long)]
    pub shared: bool,
    /// Fail with the conflict exit code instead of waiting if the lock is held.
    #[arg(short = 'n', long, visible_alias = "nb", conflicts_with = "timeout")]
    pub nonblock: bool,
    /// Give up after SECS seconds (fractions allowed) with the conflict exit
    /// code; 0 is --nonblock.
    #[arg(short = 'w', long, visible_alias = "wait", value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Exit code when the lock is held (-n) or the wait timed out (-w).
    #[arg(short = 'E', long, value_name = "N", default_value_t = 1)]
    pub conflict_exit_code: i32,
    /// The lock's name.
    pub key: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Signals passed on to the command.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Take the lock, run the command, release; the exit code.
pub fn run(args: &RunArgs) -> i32 {
    let dir = args.runtime.dir();
    if let Err(e) = shm_layout::validate_key(args.key.as_bytes()) {
        eprintln!("forelock run: {e}");
        return EX_USAGE;
    }
    let client = match forelock::Client::connect_to(&dir) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("forelock run: {e}");
            return EX_UNAVAILABLE;
        }
    };
    let guard = take_flock_style(&client, &args.key, args.shared, args.nonblock, args.timeout);
    let guard = match guard {
        Ok(guard) => guard,
        Err(forelock::Error::WouldBlock { .. } | forelock::Error::Timeout { .. }) => {
            return args.conflict_exit_code;
        }
        Err(e) => {
            eprintln!("forelock run: {e}");
            return EX_UNAVAILABLE;
        }
    };
    let code = run_command(args, guard.token(), guard.previous_owner_died());
    match guard.release() {
        Ok(()) => code,
        Err(e @ forelock::Error::Lost { .. }) => {
            eprintln!("forelock run: {:?}: {e}", args.key);
            EX_TEMPFAIL
        }
        Err(e) => {
            eprintln!("forelock run: releasing {:?}: {e}", args.key);
            code
        }
    }
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &signal in signals {
        // SAFETY: `set` is an initialised sigset_t and `signal` a valid signal.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// Spawn the command with the token in its environment and wait for it,
/// passing on termination signals. The exit code, as flock(1) computes it.
fn run_command(args: &RunArgs, token: u64, owner_died: bool) -> i32 {
    let mut all = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = signal_set(&all);
    // Blocked before the spawn, so none is lost between spawn and wait; the
    // command starts with an empty mask (the pre-exec hook resets it). This
    // process has one thread, so the thread mask is the process's.
    // SAFETY: `set` is initialised; the old mask is not wanted (null).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let parent = std::process::id();
    let mut command = Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("FORELOCK_TOKEN", token.to_string())
        .env("FORELOCK_KEY", &args.key);
    if owner_died {
        command.env("FORELOCK_PREVIOUS_OWNER_DIED", "1");
    }
    let empty = signal_set(&[]);
    let hook = move || {
        // Undo the mask inherited from this process: the command must see
        // the signals we pass on.
        // SAFETY: `empty` is an initialised sigset_t copied into the child;
        // sigprocmask is async-signal-safe.
        if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The holder died before the prctl took effect: do not run.
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } as u32 != parent {
            // SAFETY: _exit ends the child at once, as it must after fork.
            unsafe { libc::_exit(EX_UNAVAILABLE) };
        }
        Ok(())
    };
    // SAFETY: `hook` runs in the child between fork and exec and calls only
    // async-signal-safe functions (sigprocmask, prctl, getppid, _exit); it allocates
    // nothing and touches no lock.
    unsafe { command.pre_exec(hook) };
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "forelock run: failed to execute {}: {e}",
                args.command[0].to_string_lossy()
            );
            return EX_UNAVAILABLE;
        }
    };
    let pid = child.id() as libc::pid_t;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return match (status.code(), status.signal()) {
                    (Some(code), _) => code,
                    (None, Some(signal)) => 128 + signal,
                    (None, None) => EX_OSERR,
                };
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("forelock run: cannot wait for the command: {e}");
                return EX_OSERR;
            }
        }
        // Sleep until a signal: SIGCHLD (then try_wait again) or one to pass
        // on. The timeout bounds each sleep should a SIGCHLD be missed.
        let timeout = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // SAFETY: `set` is initialised, `timeout` is a valid timespec, and a
        // null siginfo pointer is allowed.
        let signal = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if FORWARDED.contains(&signal) {
            // SAFETY: kill takes plain integers; `pid` is our unreaped child,
            // so it cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// Take `key` the way flock(1)'s flags ask: `-s` shared, `-n` (or a zero
/// `-w`) a try-lock, `-w SECS` a bounded wait, else wait as long as it takes.
/// Shared by `forelock run` and `forelock lock`.
pub(crate) fn take_flock_style<'c>(
    client: &'c forelock::Client,
    key: &str,
    shared: bool,
    nonblock: bool,
    timeout_secs: Option<f64>,
) -> Result<forelock::LockGuard<'c>, forelock::Error> {
    let timeout = timeout_secs
        .filter(|t| t.is_finite())
        .map(|t| Duration::from_secs_f64(t.clamp(0.0, 1e9)));
    match (shared, nonblock, timeout) {
        (false, true, _) | (false, false, Some(Duration::ZERO)) => client.try_lock(key),
        (true, true, _) | (true, false, Some(Duration::ZERO)) => client.try_lock_shared(key),
        (false, false, Some(t)) => client.lock_timeout(key, t),
        (true, false, Some(t)) => client.lock_shared_timeout(key, t),
        (false, false, None) => client.lock(key),
        (true, false, None) => client.lock_shared(key),
    }
}
