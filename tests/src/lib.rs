//! forelock's integration tests start real processes: `forelockd` (built from
//! the broker's own `main.rs` as the `forelockd-under-test` binary) and
//! `fl-worker` client processes, and `forelock-predictor-under-test` (the
//! forecaster from its own `main.rs`). The tests are in `tests/tests/`, their
//! support code in `tests/tests/support/`.
//!
//! This library holds what the CLI's tests (`tools/tests/`) share with them:
//! a temporary runtime directory and a real broker process. Every wait is
//! bounded: a test that would hang fails with a message instead.

pub mod chaos;
pub mod cluster;
pub mod etcd;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bound of any single wait in a test.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A fresh runtime directory, removed on drop. On tmpfs (`/dev/shm`) where
/// there is one, as `/run` is for a deployed broker: a lock table mapped
/// from a disk filesystem has its pages written back, and a lock word's
/// store may then wait for the disk (seen: test clients asleep in
/// `folio_wait_bit` inside their critical sections while builds loaded the
/// disk, and the contended tests past their patience).
pub struct TempDir(pub PathBuf);

/// Where [`TempDir`]s go: `/dev/shm` if it is a writable directory, else
/// the system's temporary directory.
fn temp_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let writable =
        shm.is_dir() && std::fs::metadata(shm).is_ok_and(|m| !m.permissions().readonly());
    if writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = temp_root().join(format!("fl-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `forelockd` child, killed (SIGKILL) and reaped on drop.
pub struct Broker {
    pub dir: PathBuf,
    exe: PathBuf,
    /// A command the broker runs under (e.g. `ip netns exec h1`), or empty.
    wrapper: Vec<String>,
    config: PathBuf,
    env: Vec<(String, String)>,
    /// The process, while it runs.
    pub child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Broker {
    /// Start the broker `exe` on `dir` with `config` (TOML over the
    /// defaults) and extra environment `env`; wait until it logs "ready".
    pub fn launch(exe: &Path, dir: &Path, config: &str, env: &[(&str, &str)]) -> Broker {
        Broker::launch_wrapped(&[], exe, dir, config, env)
    }

    /// [`Broker::launch`] under `wrapper`, a command that ends by exec'ing
    /// its arguments in the same process (`ip netns exec h1`, `setpriv ...`),
    /// so that the child's pid is the broker's.
    pub fn launch_wrapped(
        wrapper: &[&str],
        exe: &Path,
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
    ) -> Broker {
        let path = dir.join("forelockd-test.toml");
        std::fs::write(&path, config).unwrap();
        let mut b = Broker {
            dir: dir.into(),
            exe: exe.into(),
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
            config: path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            log: Arc::default(),
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let mut command = match self.wrapper.split_first() {
            None => Command::new(&self.exe),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.exe);
                c
            }
        };
        let mut child = command
            .arg("--config")
            .arg(&self.config)
            .arg("--runtime-dir")
            .arg(&self.dir)
            .env("FORELOCK_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start forelockd");
        let (tx, rx) = channel();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("forelockd ready") {
                    let _ = tx.send(());
                }
                log.lock().unwrap().push(line);
            }
        });
        if rx.recv_timeout(PATIENCE).is_err() {
            let _ = child.kill();
            panic!(
                "forelockd did not become ready:\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL the broker and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL, then start it again on the same directory and configuration.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Start it again after [`Broker::kill9`], on the same directory and
    /// configuration.
    pub fn restart_stopped(&mut self) {
        assert!(self.child.is_none(), "the broker is still running");
        self.spawn();
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill with a valid pid and signal has no memory preconditions.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        wait_bounded(&mut c)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Wait for a child to exit, killing it if it outlives [`PATIENCE`].
pub fn wait_bounded(c: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("process {} did not exit in time", c.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
