//! The broker's transport against hostile or unlucky peers: a peer that never
//! reads, a connection that outlives its welcome, a flood of connections, the
//! broker out of file descriptors. Each test is named after what broke.
//!
//! The attacker speaks the wire protocol over a raw SOCK_SEQPACKET socket
//! (messages from `shm_layout::wire::encode`); the victims are ordinary
//! `fl-worker` clients.

mod support;
use shm_layout::wire::{self, Request, Response};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

const NO_PREPARE: &str = "[allocator]\npolicy = \"none\"\n";

/// A raw connection to the broker's socket, as any local process can open.
struct RawConn {
    fd: OwnedFd,
}

impl RawConn {
    fn connect(dir: &Path) -> std::io::Result<RawConn> {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: socket() takes no pointers.
        let fd =
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: socket() returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let path = dir.join(shm_layout::SOCKET_FILE);
        for (dst, src) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: `addr` is a valid sockaddr_un and the length is its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a valid timeval and the length is its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(RawConn { fd })
    }

    /// Send one request; `wait` false fails with WouldBlock instead of waiting.
    fn send(&self, request: &Request, wait: bool) -> std::io::Result<()> {
        let bytes = wire::encode(request);
        let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
        // SAFETY: `bytes` is valid for reads of its length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                bytes.as_ptr() as *const libc::c_void,
                bytes.len(),
                flags,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receive one packet: `Ok(None)` at end of stream; waits at most 5 s.
    fn recv(&self, wait: bool) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                flags,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }

    fn response(&self) -> Response {
        let bytes = self
            .recv(true)
            .expect("an answer from the broker")
            .expect("the broker closed the connection instead of answering");
        wire::decode_response(&bytes).expect("a valid response")
    }

    fn hello(&self) -> u32 {
        self.send(
            &Request::Hello {
                protocol: wire::PROTOCOL_VERSION,
                table_version: shm_layout::table::TABLE_VERSION,
                client: None,
                cell: 0,
            },
            true,
        )
        .unwrap();
        match self.response() {
            Response::Welcome { client, .. } => client,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Whether the broker makes room for another packet within `wait`.
    fn writable_within(&self, wait: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd, and the count says one.
        let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
        n > 0 && pfd.revents & libc::POLLOUT != 0
    }

    fn shutdown_read(&self) {
        // SAFETY: shutdown on an fd we own takes no pointers.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RD) };
    }
}

/// A normal client still takes and releases a lock.
fn a_normal_client_still_locks(dir: &Path, key: &str) {
    let mut w = Worker::spawn(dir, &["hold", key, "--hold-ms", "0"]);
    parse_held(&w.next_line("HELD"));
    assert_eq!(w.next_line("RELEASED"), "RELEASED");
}

#[test]
fn a_peer_that_floods_pings_without_reading_cannot_panic_the_broker() {
    let dir = TempDir::new("ping-flood");
    let mut b = Broker::start(dir.path(), NO_PREPARE);
    let attacker = RawConn::connect(dir.path()).unwrap();
    // 3000 Pings without reading a single Pong. A broker that stops reading
    // from us leaves our socket full: that is the backpressure we want, so a
    // socket that stays full ends the flood instead of blocking the test.
    // (The kernel still buffers a few hundred packets each way, charged to
    // each side's SO_SNDBUF: measured 487 Pings with the default 208 KiB.)
    let mut sent = 0;
    while sent < 3000 {
        match attacker.send(&Request::Ping, false) {
            Ok(()) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !attacker.writable_within(Duration::from_millis(300)) {
                    break;
                }
            }
            Err(e) => panic!(
                "flood send failed after {sent} Pings ({e}): the broker dropped a peer that \
                 only sent Pings; broker log:\n{}",
                broker_log_after_exit(&b)
            ),
        }
    }
    eprintln!("flood: the broker took {sent} Pings before its peer's socket stayed full");
    assert!(
        b.is_running(),
        "forelockd died during a flood of {sent} Pings:\n{}",
        broker_log_after_exit(&b)
    );
    // A peer that never reads costs the broker no CPU once it stops reading.
    let cpu = cpu_share_over_a_second(b.pid());
    assert!(
        cpu < 0.3,
        "with a peer that never reads, the broker used {cpu:.2} of a core"
    );
    attacker.shutdown_read();
    while let Ok(Some(_)) = attacker.recv(false) {}
    let _ = attacker.send(&Request::Ping, false);
    // Let the broker serve what it was sent.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        b.is_running(),
        "forelockd died after {sent} Pings, SHUT_RD and one more Ping:\n{}",
        broker_log_after_exit(&b)
    );
    assert!(
        sent < 3000,
        "the broker read all {sent} Pings of a peer that reads none of its answers: no \
         backpressure"
    );
    a_normal_client_still_locks(dir.path(), "k");
    drop(attacker);
    a_normal_client_still_locks(dir.path(), "k");
    assert!(b.is_running(), "forelockd died:\n{}", b.log());
}

#[test]
fn a_release_on_a_closed_connection_cannot_release_another_connections_lock() {
    let dir = TempDir::new("stale-release");
    let mut b = Broker::start(dir.path(), NO_PREPARE);
    // The attacker registers a client record, then makes the broker's next
    // answer fail (EPIPE: it shut its read side), so the broker closes the
    // connection (and frees its slab entry) while the attacker can still
    // write. Its record stays: only its process's death frees that.
    let attacker = RawConn::connect(dir.path()).unwrap();
    let _record = attacker.hello();
    attacker.shutdown_read();
    attacker.send(&Request::Ping, true).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A victim registers (its connection likely reusing the slab entry)
    // and takes a lock.
    let mut victim = Worker::spawn(dir.path(), &["hold", "k"]);
    let (token, _, _) = parse_held(&victim.next_line("HELD"));
    let slot = with_table(dir.path(), |t| {
        t.lookup(b"k", shm_layout::key_hash(b"k"))
            .expect("k has a slot")
            .0
    });
    // The attacker's old connection names the victim's lock. The broker
    // closed that connection: nothing sent on it may act.
    let _ = attacker.send(&Request::Release { slot, token }, true);
    std::thread::sleep(Duration::from_millis(200));
    let mut probe = Worker::spawn(dir.path(), &["hold", "k", "--try"]);
    let line = probe.next_line("ERR WouldBlock");
    assert!(
        line.starts_with("ERR WouldBlock"),
        "after a Release on a closed connection, a second would-be holder of the victim's \
         lock got {line:?}; broker log:\n{}",
        broker_log_after_exit(&b)
    );
    victim.release();
    assert_eq!(victim.next_line("RELEASED"), "RELEASED");
    assert!(b.is_running(), "forelockd died:\n{}", b.log());
}

/// The broker's log; if it died, after giving its last words (a panic
/// message) time to arrive.
fn broker_log_after_exit(b: &Broker) -> String {
    std::thread::sleep(Duration::from_millis(200));
    b.log()
}

/// Share of one core `pid` used over about a second (from /proc, in clock
/// ticks: coarse, so only for bounds like "far below a busy core").
fn cpu_share_over_a_second(pid: u32) -> f64 {
    // SAFETY: sysconf takes no pointers.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (cpu_before, wall_before) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let cpu = (cpu_ticks(pid) - cpu_before) as f64 / ticks_per_second;
    cpu / wall_before.elapsed().as_secs_f64()
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of the whole line are 12 and 13 after the command.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

#[test]
fn accept_backs_off_when_out_of_file_descriptors() {
    let dir = TempDir::new("emfile");
    let mut b = Broker::start(dir.path(), NO_PREPARE);
    let pid = b.pid();
    // Leave the broker room for a handful of connections only.
    let limit = open_fds(pid) + 4;
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: `rlimit` is a valid rlimit; the old value is not wanted (null).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &rlimit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    // More connections than it has descriptors for: the rest wait in the
    // listen backlog, and each accept fails with EMFILE.
    let flood: Vec<RawConn> = (0..16)
        .map(|_| RawConn::connect(dir.path()).unwrap())
        .collect();
    let deadline = Instant::now() + PATIENCE;
    while open_fds(pid) < limit {
        assert!(Instant::now() < deadline, "the broker never ran out of fds");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let cpu = cpu_share_over_a_second(pid);
    assert!(b.is_running(), "forelockd died:\n{}", b.log());
    assert!(
        cpu < 0.3,
        "out of file descriptors, the broker used {cpu:.2} of a core: accept spins"
    );
    let failures_logged = b
        .log()
        .lines()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(
        failures_logged <= 5,
        "{failures_logged} accept failures logged in about a second: the log is flooded"
    );
    drop(flood);
    a_normal_client_still_locks(dir.path(), "k");
    assert!(b.is_running(), "forelockd died:\n{}", b.log());
}

#[test]
fn connections_past_the_per_uid_limit_are_refused_and_the_rest_still_served() {
    let dir = TempDir::new("per-uid");
    let mut b = Broker::start(
        dir.path(),
        &format!("{NO_PREPARE}[broker]\nmax_connections_per_uid = 4\n"),
    );
    let conns: Vec<RawConn> = (0..4)
        .map(|_| RawConn::connect(dir.path()).unwrap())
        .collect();
    for c in &conns {
        c.send(&Request::Ping, true).unwrap();
        assert_eq!(c.response(), Response::Pong, "within the limit: served");
    }
    let fifth = RawConn::connect(dir.path()).unwrap();
    let _ = fifth.send(&Request::Ping, true);
    match fifth.recv(true) {
        Ok(None) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
        other => panic!("a fifth connection of one uid was served: {other:?}"),
    }
    // Below the limit again, a normal client connects.
    drop(conns);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let c = RawConn::connect(dir.path()).unwrap();
        let _ = c.send(&Request::Ping, true);
        if let Ok(Some(_)) = c.recv(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "closing connections never made room"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    a_normal_client_still_locks(dir.path(), "k");
    assert!(b.is_running(), "forelockd died:\n{}", b.log());
}
