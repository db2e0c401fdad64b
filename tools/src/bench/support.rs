//! Small pieces the benchmark needs everywhere: temporary directories, child
//! processes that die with us, free loopback ports, a clock shared by processes.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A directory removed (with everything in it) when dropped, also on panic.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory `forelock-bench-<pid>-<n>-<label>` under the
    /// system temporary directory (tmpfs on most hosts).
    pub fn new(label: &str) -> anyhow::Result<TempDir> {
        TempDir::new_in(&std::env::temp_dir(), label)
    }

    /// Like [`TempDir::new`], but in memory (/dev/shm) where the host has it:
    /// for lock files and shared memory, as forelock keeps its table in tmpfs,
    /// so that file locks are not measured against a disk file system.
    pub fn new_in_memory(label: &str) -> anyhow::Result<TempDir> {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            TempDir::new_in(shm, label).or_else(|_| TempDir::new(label))
        } else {
            TempDir::new(label)
        }
    }

    fn new_in(parent: &Path, label: &str) -> anyhow::Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!(
            "forelock-bench-{}-{}-{}",
            std::process::id(),
            n,
            label
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating temporary directory {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes the temporary directories of bench runs whose process is gone
/// (killed with SIGKILL, so their Drop guards never ran). Bounded: looks at
/// no more than 10,000 entries per directory.
pub fn sweep_stale_temp_dirs() {
    for parent in [PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten().take(10_000) {
            let name = entry.file_name();
            let Some(rest) = name
                .to_str()
                .and_then(|name| name.strip_prefix("forelock-bench-"))
            else {
                continue;
            };
            let Some(pid) = rest
                .split('-')
                .next()
                .and_then(|pid| pid.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            if pid > 0 && !process_exists(pid) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY:
    // - kill with signal 0 sends nothing; it only checks that `pid` exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Makes a child get SIGKILL when this process dies, however it dies (the
/// Drop guards below do not run on SIGKILL or an abort).
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    let hook = || {
        // PR_SET_PDEATHSIG takes the signal as an unsigned long argument.
        let signal = libc::SIGKILL as libc::c_ulong;
        // SAFETY:
        // - prctl with PR_SET_PDEATHSIG reads no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY:
    // - the hook runs between fork and exec in the child; it calls only
    //   prctl(2), which is async-signal-safe, and allocates nothing.
    unsafe { command.pre_exec(hook) }
}

/// A child process killed and reaped when dropped, also on panic.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    /// The exit status if the child has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY:
            // - kill(2) takes plain integers; `pid` is our own unreaped child,
            //   so the number cannot have been reused by another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it).
pub fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// One etcd member (`binary`) on free loopback ports, its data and its log
/// (`etcd.log`) in `dir`, killed with the bench: the server and its client
/// port. Readiness is the caller's to check (see `etcd_log` on failure).
pub fn spawn_loopback_etcd(binary: &Path, dir: &TempDir) -> anyhow::Result<(ChildGuard, u16)> {
    let client_port = free_loopback_port()?;
    let mut peer_port = free_loopback_port()?;
    while peer_port == client_port {
        peer_port = free_loopback_port()?;
    }
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).context("etcd log")?;
    let mut command = Command::new(binary);
    command
        .args(["--name", "forelock-bench"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("forelock-bench={peer_url}")])
        .args(["--initial-cluster-state", "new"])
        .args(["--logger", "zap", "--log-level", "error"])
        .env_remove("ETCD_DATA_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(
            log.try_clone().context("etcd log")?,
        ))
        .stderr(std::process::Stdio::from(log));
    let child = die_with_parent(&mut command)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok((ChildGuard::new(child), client_port))
}

/// What etcd started by [`spawn_loopback_etcd`] in `dir` logged.
pub fn etcd_log(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.path().join("etcd.log")).unwrap_or_default()
}

/// Whether `binary` is an executable file on `PATH` (or an absolute path).
pub fn find_binary(binary: &str) -> Option<PathBuf> {
    let candidate = Path::new(binary);
    if candidate.is_absolute() {
        return candidate.is_file().then(|| candidate.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    // Debian puts daemons such as redis-server in /usr/bin, but also look in sbin.
    let extra = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(binary))
        .find(|full| full.is_file())
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host,
/// so a time stamp written by one process can be subtracted by another.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY:
    // - `now` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    debug_assert_eq!(rc, 0);
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// What one `Instant::now()` pair costs here (the median of 1,001 tries):
/// every latency in the tables includes it once.
pub fn clock_pair_ns() -> u64 {
    let mut samples: Vec<u64> = (0..1_001)
        .map(|_| {
            let before = Instant::now();
            let after = Instant::now();
            (after - before).as_nanos() as u64
        })
        .collect();
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// The soft limit on open files of this process (RLIMIT_NOFILE), if known.
pub fn open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY:
    // - `limit` is a valid, writable rlimit for the duration of the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur)
}

/// Waits until `done()` holds, polling every `interval`; false on timeout.
pub fn poll_until(timeout: Duration, interval: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}

/// Standard base64 (RFC 4648, with padding): etcd's JSON gateway wants keys so.
pub fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b0 = u32::from(chunk[0]);
        let b1 = u32::from(chunk.get(1).copied().unwrap_or(0));
        let b2 = u32::from(chunk.get(2).copied().unwrap_or(0));
        let triple = (b0 << 16) | (b1 << 8) | b2;
        for i in 0..4 {
            if i <= chunk.len() {
                let index = (triple >> (18 - 6 * i)) & 0x3f;
                out.push(char::from(ALPHABET[index as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Start `forelockd` (`binary`) on `<dir>/rt` with `config` (TOML over the
/// embedded defaults), its log in `<dir>/forelockd.log`, and wait (at most
/// 10 s) until a client can connect. Returns the broker and its runtime dir.
pub fn start_forelockd(
    binary: &Path,
    dir: &Path,
    config: &str,
) -> anyhow::Result<(ChildGuard, PathBuf)> {
    let runtime_dir = dir.join("rt");
    let config_path = dir.join("forelockd.toml");
    std::fs::write(&config_path, config).context("writing the broker's configuration")?;
    let log_path = dir.join("forelockd.log");
    let log = std::fs::File::create(&log_path).context("broker log")?;
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(&config_path)
        .arg("--runtime-dir")
        .arg(&runtime_dir)
        // `FORELOCK_BENCH_BROKER_LOG` (a FORELOCK_LOG filter) lets a run
        // log more, e.g. `warn,forelock::grant_timing=debug`.
        .env(
            "FORELOCK_LOG",
            std::env::var("FORELOCK_BENCH_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log));
    let child = die_with_parent(&mut command)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut broker = ChildGuard::new(child);
    let exited = |b: &mut ChildGuard| matches!(b.try_wait(), Ok(Some(_)));
    let ready = poll_until(Duration::from_secs(10), Duration::from_millis(10), || {
        exited(&mut broker) || forelock::Client::connect_to(&runtime_dir).is_ok()
    });
    if !ready || exited(&mut broker) {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        anyhow::bail!("forelockd did not start: {}", log.trim());
    }
    Ok((broker, runtime_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }
}
