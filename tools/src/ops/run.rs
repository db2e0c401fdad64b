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
//! While the command runs, this process asks the broker every
//! [`CHECK_EVERY`] whether the hold still stands (one round trip,
//! [`forelock::LockGuard::check`]). It ends without a release when this
//! host's broker loses a global key's node grant (its etcd lease could not
//! be confirmed in time, docs/cluster.md), or when the broker lost this
//! client's registration (it recreated its table). Then the command is sent
//! `--on-lost`'s signal (SIGTERM unless told otherwise; `none` lets it run
//! on): another holder may come, and with a global key the broker fences
//! `fence_margin_ms` plus the drift allowance before its lease can expire
//! at etcd, and another host waits `lock_delay_ms` more, so a command that
//! stops on SIGTERM is usually gone before anyone else holds the key. That
//! is a courtesy, not the guarantee: a paused or slow command can still
//! write late, so whatever it writes must be fenced with its token
//! (`FORELOCK_TOKEN`). A broker that cannot be reached is not a lost hold
//! (a restarted broker re-adopts its table, holds included): the command
//! runs on, and this process says so once on stderr.
//!
//! Exit codes: the command's exit status; 128 + N if signal N killed it; the
//! conflict code (`-E`, default 1) when `-n` finds the lock held or `-w`
//! times out; 2 for a flag it cannot parse (a bad `--on-lost` signal
//! among them); 64 (EX_USAGE) for an invalid key; 69 (EX_UNAVAILABLE) when
//! the broker cannot be reached or the command cannot be started (as
//! flock(1)); 71 (EX_OSERR) when waiting for the command
//! fails; 75 (EX_TEMPFAIL) when the hold ended while the command ran (found
//! by a check or at the release), whatever the command's own status.

use super::RuntimeDirArg;
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

pub const EX_USAGE: i32 = 64;
pub const EX_UNAVAILABLE: i32 = 69;
pub const EX_OSERR: i32 = 71;
pub const EX_TEMPFAIL: i32 = 75;

/// flock(1)'s flags, shared by `forelock run` and `forelock lock`.
#[derive(clap::Args, Debug)]
pub struct FlockFlags {
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
    /// Exit code when the lock is held (-n) or the wait timed out (-w) (for
    /// `lock`: or PID already holds KEY).
    #[arg(short = 'E', long, value_name = "N", default_value_t = 1)]
    pub conflict_exit_code: i32,
}

impl FlockFlags {
    /// Take `key` the way the flags ask: `-s` shared, `-n` (or a zero `-w`)
    /// a try-lock, `-w SECS` a bounded wait, else wait as long as it takes.
    pub fn take<'c>(
        &self,
        client: &'c forelock::Client,
        key: &str,
    ) -> Result<forelock::LockGuard<'c>, forelock::Error> {
        let timeout = self
            .timeout
            .filter(|t| t.is_finite())
            .map(|t| Duration::from_secs_f64(t.clamp(0.0, 1e9)));
        match (self.shared, self.nonblock, timeout) {
            (false, true, _) | (false, false, Some(Duration::ZERO)) => client.try_lock(key),
            (true, true, _) | (true, false, Some(Duration::ZERO)) => client.try_lock_shared(key),
            (false, false, Some(t)) => client.lock_timeout(key, t),
            (true, false, Some(t)) => client.lock_shared_timeout(key, t),
            (false, false, None) => client.lock(key),
            (true, false, None) => client.lock_shared(key),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub runtime: RuntimeDirArg,
    #[command(flatten)]
    pub flock: FlockFlags,
    /// Signal sent to the command when the hold ends without a release (a
    /// global key's node grant lost, the broker's table recreated): a name
    /// (TERM, SIGKILL) or a number; `none` lets the command run on.
    #[arg(long, value_name = "SIGNAL", default_value = "TERM")]
    pub on_lost: OnLost,
    /// The lock's name.
    pub key: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `--on-lost`: the signal for the command when the hold ends, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnLost(Option<nix::sys::signal::Signal>);

impl std::str::FromStr for OnLost {
    type Err = String;

    fn from_str(text: &str) -> Result<OnLost, String> {
        use nix::sys::signal::Signal;
        if text.eq_ignore_ascii_case("none") {
            return Ok(OnLost(None));
        }
        let upper = text.to_ascii_uppercase();
        let signal = match upper.parse::<i32>() {
            Ok(number) => Signal::try_from(number).ok(),
            Err(_) if upper.starts_with("SIG") => upper.parse().ok(),
            Err(_) => format!("SIG{upper}").parse().ok(),
        };
        signal.map(|s| OnLost(Some(s))).ok_or_else(|| {
            format!("{text:?} is not a signal: give a name (TERM, KILL, INT) or a number, or none")
        })
    }
}

/// How often the hold is checked while the command runs.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Does this error say the hold ended without a release (as opposed to the
/// broker being unreachable for now)?
pub(crate) fn hold_ended(error: &forelock::Error) -> bool {
    matches!(
        error,
        forelock::Error::Lost { .. }
            | forelock::Error::BrokerRestarted { .. }
            | forelock::Error::NotHolder { .. }
    )
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
    let guard = saying_why_a_global_key_waits("forelock run", &dir, &args.key, || {
        args.flock.take(&client, &args.key)
    });
    let guard = match guard {
        Ok(guard) => guard,
        Err(forelock::Error::WouldBlock { .. } | forelock::Error::Timeout { .. }) => {
            return args.flock.conflict_exit_code;
        }
        Err(e) => {
            eprintln!("forelock run: {e}");
            return EX_UNAVAILABLE;
        }
    };
    let (code, ended) = run_command(args, &guard);
    match (ended, guard.release()) {
        // Said on stderr when the check found it; the release is only
        // bookkeeping now.
        (true, _) => EX_TEMPFAIL,
        (false, Ok(())) => code,
        (false, Err(e)) if hold_ended(&e) => {
            eprintln!("forelock run: {:?}: {e}", args.key);
            EX_TEMPFAIL
        }
        (false, Err(e)) => {
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
/// passing on termination signals and checking the hold. The exit code, as
/// flock(1) computes it, and whether the hold ended while the command ran.
fn run_command(args: &RunArgs, guard: &forelock::LockGuard<'_>) -> (i32, bool) {
    let mut all = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = signal_set(&all);
    // Blocked before the spawn, so none is lost between spawn and wait; the
    // command starts with an empty mask (the pre-exec hook resets it). This
    // process has one thread until the hold's checker starts below, and the
    // checker inherits this mask, so no thread takes these signals but the
    // main thread's sigtimedwait.
    // SAFETY: `set` is initialised; the old mask is not wanted (null).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let parent = std::process::id();
    let mut command = Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("FORELOCK_TOKEN", guard.token().to_string())
        .env("FORELOCK_KEY", &args.key);
    if guard.previous_owner_died() {
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
            return (EX_UNAVAILABLE, false);
        }
    };
    let (stop, ended) = (AtomicBool::new(false), AtomicBool::new(false));
    std::thread::scope(|scope| {
        let checker = scope.spawn(|| watch_hold(&args.key, guard, &stop, &ended));
        let code = wait_for(&mut child, &set, args.on_lost, &ended);
        stop.store(true, Ordering::Relaxed);
        checker.thread().unpark();
        (code, ended.load(Ordering::Relaxed))
    })
}

/// Wait for the command, passing on the signals in `set` but SIGCHLD, and
/// sending it `on_lost`'s signal once `ended` is set. Its exit code.
fn wait_for(
    child: &mut std::process::Child,
    set: &libc::sigset_t,
    on_lost: OnLost,
    ended: &AtomicBool,
) -> i32 {
    let pid = child.id() as libc::pid_t;
    let mut signalled = false;
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
        // Relaxed: see watch_hold.
        if !signalled && ended.load(Ordering::Relaxed) {
            signalled = true;
            if let OnLost(Some(signal)) = on_lost {
                eprintln!("forelock run: sending {signal} to the command");
                // SAFETY: kill takes plain integers; `pid` is our unreaped
                // child (only this thread reaps it), so it was not reused.
                unsafe { libc::kill(pid, signal as libc::c_int) };
            }
        }
        // Sleep until a signal: SIGCHLD (the command's, or the checker's
        // wake-up) or one to pass on. The timeout bounds each sleep should a
        // SIGCHLD be missed.
        let timeout = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // SAFETY: `set` is initialised, `timeout` is a valid timespec, and a
        // null siginfo pointer is allowed.
        let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
        if FORWARDED.contains(&signal) {
            // SAFETY: kill takes plain integers; `pid` is our unreaped child,
            // so it cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// After this long waiting for a global key, say why if the broker grants
/// none now.
const WAIT_NOTE_AFTER: Duration = Duration::from_secs(2);

/// Run `take` (a lock call that may wait). If it still waits after
/// [`WAIT_NOTE_AFTER`] for a global key while the broker grants none (it
/// cannot reach etcd, or has no lease it can vouch for), say so on stderr
/// once, with the broker's last etcd error: a shell user must not wait in
/// silence for something that cannot come until etcd is back.
pub(crate) fn saying_why_a_global_key_waits<T>(
    program: &str,
    dir: &std::path::Path,
    key: &str,
    take: impl FnOnce() -> T,
) -> T {
    let (done, waiting) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            if waiting.recv_timeout(WAIT_NOTE_AFTER) != Err(RecvTimeoutError::Timeout) {
                return; // `take` returned (the sender is gone)
            }
            let Some(cluster) = super::status::read_cluster(dir) else {
                return;
            };
            let global = cluster["key_prefix"]
                .as_str()
                .is_some_and(|prefix| key.starts_with(prefix));
            if let Some(why) = super::status::not_granting(&cluster).filter(|_| global) {
                eprintln!(
                    "{program}: waiting for {key:?}: this host's broker grants no global key \
                     now, and will once it reaches etcd again (forelock status; \
                     docs/cluster.md): {why}"
                );
            }
        });
        let taken = take();
        drop(done);
        taken
    })
}

/// Check the hold every [`CHECK_EVERY`] until `stop` is set or the hold
/// is found ended; then set `ended` and wake the main thread (a SIGCHLD to
/// this process, which every thread blocks and the main thread's
/// `sigtimedwait` takes). On a thread of its own because a check waits up to
/// 5 s for a broker that is restarting, and the command's exit and the
/// signals passed on to it must not wait for that.
fn watch_hold(key: &str, guard: &forelock::LockGuard<'_>, stop: &AtomicBool, ended: &AtomicBool) {
    let mut warned = false;
    // Relaxed: the flags carry no data; the main thread reads `ended` after
    // the SIGCHLD below or at its next wake-up, and sets `stop` before the
    // unpark that ends this park.
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(CHECK_EVERY);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match guard.check() {
            Ok(()) => {}
            Err(e) if hold_ended(&e) => {
                eprintln!("forelock run: {key:?}: {e}");
                ended.store(true, Ordering::Relaxed);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::this(),
                    nix::sys::signal::Signal::SIGCHLD,
                );
                return;
            }
            Err(e) if !warned => {
                eprintln!(
                    "forelock run: cannot check the hold of {key:?} (the command runs on): {e}"
                );
                warned = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::OnLost;
    use nix::sys::signal::Signal;

    #[test]
    fn on_lost_takes_signal_names_numbers_and_none() {
        let parse = |text: &str| text.parse::<OnLost>();
        assert_eq!(parse("TERM"), Ok(OnLost(Some(Signal::SIGTERM))));
        assert_eq!(parse("sigkill"), Ok(OnLost(Some(Signal::SIGKILL))));
        assert_eq!(parse("int"), Ok(OnLost(Some(Signal::SIGINT))));
        assert_eq!(parse("10"), Ok(OnLost(Some(Signal::SIGUSR1))));
        assert_eq!(parse("None"), Ok(OnLost(None)));
        for bad in ["FOO", "0", "999", "", "-15"] {
            let error = parse(bad).expect_err(bad);
            assert!(error.contains("not a signal"), "{bad}: {error}");
        }
    }
}
