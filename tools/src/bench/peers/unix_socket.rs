//! A bare Unix-socket round trip: 64 bytes to an echo thread and back. Not a
//! lock (it excludes nothing): the floor for forelock's broker round trip.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::bench::system::{
    BenchEnv, LockKey, LockSession, LockSystem, RunShape, Sharing, StartError, SystemEntry,
    SystemTraits, WorkerIdentity,
};

pub const ENTRY: SystemEntry = SystemEntry {
    name: "unix-socket",
    start,
    connect,
};

const MESSAGE_BYTES: usize = 64;

/// The echo server: an accept thread and one thread per connection, in the
/// bench's own process. Dropping it stops the accept thread; connection
/// threads end when their worker closes its end.
struct EchoServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

fn start(env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    let path = env.work_dir.join("echo.sock");
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let stop_flag = Arc::clone(&stopping);
    let accept_thread = std::thread::Builder::new()
        .name("bench-echo-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if stop_flag.load(Ordering::Acquire) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let _ = std::thread::Builder::new()
                    .name("bench-echo".into())
                    .spawn(move || echo(stream));
            }
        })
        .context("spawning the echo thread")?;
    Ok(Box::new(EchoServer {
        path,
        stopping,
        accept_thread: Some(accept_thread),
    }))
}

fn echo(mut stream: UnixStream) {
    let mut message = [0u8; MESSAGE_BYTES];
    while read_polling(&mut stream, &mut message).is_ok() {
        if stream.write_all(&message).is_err() {
            break;
        }
    }
}

/// How long each side polls for the other's bytes before it sleeps in
/// `read`: forelockd's default `spin_us` and the client's default answer
/// poll (`FORELOCK_ANSWER_SPIN_US`), so that the floor waits the way
/// forelock does. A blocking echo on an otherwise idle VM pays a halted
/// vCPU's wake-up per message (about 40 us here), which forelock's poll
/// avoids: the floor would not be one.
const POLL_FOR: Duration = Duration::from_micros(50);

/// Fill `buf` from `stream`: `recv(MSG_DONTWAIT)` and `sched_yield` for up to
/// [`POLL_FOR`], then a blocking read of the rest.
fn read_polling(stream: &mut UnixStream, buf: &mut [u8]) -> std::io::Result<()> {
    let started = Instant::now();
    let mut filled = 0;
    while filled < buf.len() && started.elapsed() < POLL_FOR {
        let rest = &mut buf[filled..];
        // SAFETY: recv writes at most `rest.len()` bytes into `rest`, a
        // valid writable buffer, on an fd `stream` owns.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                rest.as_mut_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => filled += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::Interrupted
                {
                    return Err(e);
                }
                std::thread::yield_now();
            }
        }
    }
    stream.read_exact(&mut buf[filled..])
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Wake the accept thread so that it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl LockSystem for EchoServer {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::CrossProcess,
            excludes: false,
            note: "unix-socket: 64-byte request/response over SOCK_STREAM to an echo thread (not a lock); both sides poll 50 us before they sleep, as forelock does",
        }
    }

    fn prepare_run(&mut self, _run: &RunShape) -> anyhow::Result<String> {
        Ok(self.path.display().to_string())
    }
}

struct EchoSession {
    stream: UnixStream,
    message: [u8; MESSAGE_BYTES],
}

fn connect(config: &str, worker: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let stream = UnixStream::connect(config).with_context(|| format!("connecting to {config}"))?;
    let mut message = [0u8; MESSAGE_BYTES];
    message[0] = worker.index as u8;
    Ok(Box::new(EchoSession { stream, message }))
}

impl LockSession for EchoSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        self.message[1..5].copy_from_slice(&key.index.to_le_bytes());
        self.stream
            .write_all(&self.message)
            .context("echo request")?;
        let mut reply = [0u8; MESSAGE_BYTES];
        read_polling(&mut self.stream, &mut reply).context("echo reply")?;
        anyhow::ensure!(
            reply == self.message,
            "the echo server answered other bytes"
        );
        critical();
        Ok(())
    }
}
