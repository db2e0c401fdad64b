//! Advisory file locks: flock(2) on one file per key, and open file
//! description (OFD) record locks, fcntl(F_OFD_SETLKW), on one byte per key of
//! a single file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use anyhow::Context;

use crate::bench::support::open_files_limit;
use crate::bench::system::{
    BenchEnv, LockKey, LockSession, LockSystem, RunShape, Sharing, StartError, SystemEntry,
    SystemTraits, WorkerIdentity,
};

pub const FLOCK_ENTRY: SystemEntry = SystemEntry {
    name: "flock",
    start: start_flock,
    connect: connect_flock,
};

pub const OFD_ENTRY: SystemEntry = SystemEntry {
    name: "ofd-fcntl",
    start: start_ofd,
    connect: connect_ofd,
};

/// Open files a flock session keeps at most; past this (or a quarter of
/// RLIMIT_NOFILE, if lower), one is closed before the next is opened: a Zipf
/// run over 10,000 keys would otherwise run out of file descriptors.
const FLOCK_OPEN_FILES_MAX: usize = 4_096;

struct FlockSystem;
struct OfdSystem;

fn start_flock(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    Ok(Box::new(FlockSystem))
}

fn start_ofd(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    Ok(Box::new(OfdSystem))
}

impl LockSystem for FlockSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::CrossProcess,
            excludes: true,
            note: "flock: flock(LOCK_EX) on one file per key in a temporary directory, fds cached",
        }
    }

    fn prepare_run(&mut self, run: &RunShape) -> anyhow::Result<String> {
        let dir = run.run_dir.join("flock");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir.display().to_string())
    }
}

impl LockSystem for OfdSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::CrossProcess,
            excludes: true,
            note: "ofd-fcntl: F_OFD_SETLKW write lock on byte <key> of one file, one open file per process",
        }
    }

    fn prepare_run(&mut self, run: &RunShape) -> anyhow::Result<String> {
        let path = run.run_dir.join("ofd-locks");
        File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(path.display().to_string())
    }
}

fn retry_on_interrupt(mut call: impl FnMut() -> libc::c_int, what: &str) -> anyhow::Result<()> {
    loop {
        if call() == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error).context(what.to_string());
        }
    }
}

struct FlockSession {
    dir: PathBuf,
    files: HashMap<u32, File>,
    open_files_max: usize,
}

fn connect_flock(config: &str, _worker: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let limit = open_files_limit().map_or(256, |limit| (limit / 4).max(16));
    let open_files_max = FLOCK_OPEN_FILES_MAX.min(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok(Box::new(FlockSession {
        dir: PathBuf::from(config),
        files: HashMap::new(),
        open_files_max,
    }))
}

impl FlockSession {
    fn file(&mut self, index: u32) -> anyhow::Result<&File> {
        if !self.files.contains_key(&index) {
            if self.files.len() >= self.open_files_max {
                let victim = *self.files.keys().next().expect("map is not empty");
                self.files.remove(&victim);
            }
            let path = self.dir.join(format!("k{index}"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            self.files.insert(index, file);
        }
        Ok(&self.files[&index])
    }
}

impl LockSession for FlockSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        let fd = self.file(key.index)?.as_raw_fd();
        let take = || {
            // SAFETY:
            // - `fd` is an open file owned by `self.files`, alive during the call.
            unsafe { libc::flock(fd, libc::LOCK_EX) }
        };
        retry_on_interrupt(take, "flock(LOCK_EX)")?;
        critical();
        let give_back = || {
            // SAFETY:
            // - as above; the file stays open (and locked by us) until here.
            unsafe { libc::flock(fd, libc::LOCK_UN) }
        };
        retry_on_interrupt(give_back, "flock(LOCK_UN)")
    }
}

struct OfdSession {
    file: File,
}

fn connect_ofd(config: &str, _worker: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(config)
        .with_context(|| format!("opening {config}"))?;
    Ok(Box::new(OfdSession { file }))
}

fn byte_range(lock_type: libc::c_int, index: u32) -> libc::flock {
    libc::flock {
        l_type: lock_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: libc::off_t::from(index),
        l_len: 1,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}

impl LockSession for OfdSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        let fd = self.file.as_raw_fd();
        let lock = byte_range(libc::F_WRLCK, key.index);
        let take = || {
            // SAFETY:
            // - `fd` is our open file; `lock` is a valid struct flock on our
            //   stack that the kernel only reads.
            unsafe { libc::fcntl(fd, libc::F_OFD_SETLKW, &lock as *const libc::flock) }
        };
        retry_on_interrupt(take, "fcntl(F_OFD_SETLKW, F_WRLCK)")?;
        critical();
        let unlock = byte_range(libc::F_UNLCK, key.index);
        let give_back = || {
            // SAFETY:
            // - as above, with `unlock`.
            unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &unlock as *const libc::flock) }
        };
        retry_on_interrupt(give_back, "fcntl(F_OFD_SETLK, F_UNLCK)")
    }
}
