//! Tests of what can be checked without the real broker: key rules, the
//! errors for missing or bad runtime files, the fast path on a table built by
//! hand, and the slow path against a small scripted broker (`MockBroker`)
//! that speaks the wire protocol on a real SOCK_SEQPACKET socket.

use super::*;
use crate::mapped::fast_acquire;
use memmap2::MmapRaw;
use shm_layout::events::{EventsHeader, events_file_size, init_events};
use shm_layout::key_hash;
use shm_layout::lockword::{EXCLUSIVE, PREPARED};
use shm_layout::table::{CELL_GRANTED, GRANT_OWNER_DIED};
use shm_layout::table::{Geometry, Header, IndexEntry, TableView, init_header};
use shm_layout::wire::{self, decode_request, encode};
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;

const SLOTS: u32 = 8;
const CLIENTS: u32 = 4;
const RING_CAPACITY: u32 = 16;

/// Create `path` with `len` zero bytes and let `init` write into it through
/// a shared mapping.
fn create_file(path: &Path, len: usize, init: impl FnOnce(*mut u8)) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    file.set_len(len as u64).unwrap();
    let map = MmapRaw::map_raw(&file).unwrap();
    init(map.as_mut_ptr());
}

/// A lock table the way the broker creates it: header initialised, broker
/// epoch 1, everything else zero.
fn create_table(dir: &Path) -> Geometry {
    let geometry = Geometry::new(SLOTS, CLIENTS).unwrap();
    create_file(&dir.join(TABLE_FILE), geometry.file_size, |base| {
        // SAFETY:
        // - `base` is a fresh page-aligned mapping of `file_size` bytes, more
        //   than a Header, and nothing else maps the new file yet, so this
        //   is the only reference to it;
        // - all-zero bytes are a valid Header (integers and atomics).
        let header = unsafe { &mut *base.cast::<Header>() };
        init_header(header, &geometry);
        header.broker_epoch.store(1, Ordering::Relaxed);
    });
    geometry
}

fn create_events(dir: &Path) {
    create_events_of(dir, RING_CAPACITY);
}

fn create_events_of(dir: &Path, capacity: u32) {
    let rings = CLIENTS + 1;
    create_file(
        &dir.join(EVENTS_FILE),
        events_file_size(rings, capacity),
        |base| {
            // SAFETY: as in `create_table`: a fresh, exclusive, page-aligned
            // mapping larger than an EventsHeader, which all-zero is valid for.
            let header = unsafe { &mut *base.cast::<EventsHeader>() };
            init_events(header, rings, capacity);
        },
    );
}

// ---- the client's event ring -------------------------------------------------

/// A client used by one thread pushes its events without a locked
/// instruction; once a second thread pushes, every push claims its entry
/// with `fetch_add`, so threads that push at once lose nothing.
#[test]
fn a_ring_pushed_by_one_thread_then_by_several_at_once_loses_no_event() {
    const EACH: u64 = 50_000;
    let dir = runtime_dir();
    create_events_of(dir.path(), 1 << 18);
    let events = MappedEvents::open(&dir.path().join(EVENTS_FILE)).unwrap();
    let mut cursor = shm_layout::events::EventCursor::new(events.view());
    for i in 0..EACH {
        events.record(1, i, Outcome::FastHit);
    }
    let mut seen = 0u64;
    cursor.drain(events.view(), |_| seen += 1);
    assert_eq!((seen, cursor.lost), (EACH, 0), "the owner's own pushes");

    let start = std::sync::Barrier::new(3);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                start.wait();
                for i in 0..EACH {
                    events.record(1, i, Outcome::FastHit);
                }
            });
        }
    });
    seen = 0;
    cursor.drain(events.view(), |_| seen += 1);
    assert_eq!(
        (seen, cursor.lost),
        (3 * EACH, 0),
        "three threads at once, after the owner stopped"
    );
}

/// What the broker does to prepare `key` in `slot`: key, token base, a
/// prepared free word of `generation`, an index entry at its home position.
fn prepare(view: &TableView, slot: u32, key: &[u8], token_base: u64, generation: u16) {
    let hash = key_hash(key);
    let s = view.slot(slot).unwrap();
    s.store_key(key, hash, 0);
    s.token_base.store(token_base, Ordering::Relaxed);
    s.word
        .store(Word::new(generation, PREPARED, 0, 0).0, Ordering::Release);
    let home = hash as u32 & (view.geometry().index_len - 1);
    view.index_entry(home)
        .unwrap()
        .0
        .store(IndexEntry::pack(hash, slot), Ordering::Release);
}

fn runtime_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("forelock-client-test")
        .tempdir()
        .unwrap()
}

// ---- key rules and runtime-file errors -------------------------------------------

#[test]
fn connect_to_an_empty_directory_says_the_broker_is_not_running_and_names_the_socket() {
    let dir = runtime_dir();
    let err = Client::connect_to(dir.path()).unwrap_err();
    let socket = dir.path().join(SOCKET_FILE);
    assert!(
        matches!(&err, Error::BrokerNotRunning { socket: s, .. } if *s == socket),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&socket.display().to_string()), "{message}");
    assert!(message.contains("FORELOCK_RUNTIME_DIR"), "{message}");
}

#[test]
fn a_table_and_no_socket_says_the_broker_is_not_running() {
    let dir = runtime_dir();
    create_table(dir.path());
    create_events(dir.path());
    let err = Client::connect_to(dir.path()).unwrap_err();
    assert!(matches!(err, Error::BrokerNotRunning { .. }), "{err:?}");
}

#[test]
fn a_missing_table_beside_a_socket_is_reported_with_its_path() {
    let dir = runtime_dir();
    std::fs::write(dir.path().join(SOCKET_FILE), b"").unwrap();
    let err = Client::connect_to(dir.path()).unwrap_err();
    let table = dir.path().join(TABLE_FILE);
    assert!(
        matches!(&err, Error::TableUnreadable { path, .. } if *path == table),
        "{err:?}"
    );
}

#[test]
fn a_foreign_table_file_is_refused_as_foreign() {
    let dir = runtime_dir();
    std::fs::write(dir.path().join(TABLE_FILE), vec![0xA5u8; 4096]).unwrap();
    let err = Client::connect_to(dir.path()).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::TableUnavailable {
                cause: LayoutError::ForeignFile { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(TABLE_FILE));
}

#[test]
fn a_truncated_table_file_is_refused_as_truncated() {
    let dir = runtime_dir();
    let geometry = create_table(dir.path());
    let file = OpenOptions::new()
        .write(true)
        .open(dir.path().join(TABLE_FILE))
        .unwrap();
    file.set_len(geometry.file_size as u64 - 64).unwrap();
    let err = Client::connect_to(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TableUnavailable {
                cause: LayoutError::Truncated { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn an_empty_table_file_is_refused_as_truncated() {
    let dir = runtime_dir();
    std::fs::write(dir.path().join(TABLE_FILE), b"").unwrap();
    let err = Client::connect_to(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TableUnavailable {
                cause: LayoutError::Truncated { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_table_of_another_version_is_a_version_mismatch() {
    let dir = runtime_dir();
    create_table(dir.path());
    let table = MappedTable::open(&dir.path().join(TABLE_FILE)).unwrap();
    table
        .view()
        .header()
        .version
        .store(TABLE_VERSION + 1, Ordering::Release);
    let err = Client::connect_to(dir.path()).unwrap_err();
    assert!(matches!(err, Error::VersionMismatch { .. }), "{err:?}");
}

#[test]
fn a_missing_events_file_is_reported_with_its_path() {
    let dir = runtime_dir();
    create_table(dir.path());
    let err = Client::connect_to(dir.path()).unwrap_err();
    let events = dir.path().join(EVENTS_FILE);
    assert!(
        matches!(&err, Error::TableUnreadable { path, .. } if *path == events),
        "{err:?}"
    );
}

// ---- the fast path on a hand-built table -------------------------------------------

fn table_with(key: &[u8], token_base: u64) -> (tempfile::TempDir, MappedTable) {
    let dir = runtime_dir();
    create_table(dir.path());
    let table = MappedTable::open(&dir.path().join(TABLE_FILE)).unwrap();
    prepare(table.view(), 2, key, token_base, 7);
    (dir, table)
}

#[test]
fn a_prepared_key_is_granted_by_one_cas_with_token_base_plus_counter() {
    let (_dir, table) = table_with(b"orders:1", 1000);
    let view = table.view();
    let hold = fast_acquire(view, b"orders:1", key_hash(b"orders:1"), 3).unwrap();
    assert_eq!(hold.slot, 2);
    assert_eq!(hold.token, 1001);
    assert!(!hold.owner_died);
    let word = view.slot(2).unwrap().word_acquire();
    assert_eq!(word.exclusive_owner(), Some(3));
    assert!(word.is_prepared());
}

/// A global key's slot carries its lease's safe time: a grant the client
/// makes itself past it is given back at once, and the client asks the
/// broker (issue 11: a stopped broker cannot let its clients go on
/// granting themselves a global key).
#[test]
fn a_grant_past_the_slots_safe_time_is_given_back_not_kept() {
    let (_dir, table) = table_with(b"global/k", 1);
    let view = table.view();
    let hash = key_hash(b"global/k");
    let slot = view.slot(2).unwrap();
    slot.grant_until_ns.store(
        shm_layout::monotonic_ns() + 60_000_000_000,
        Ordering::Relaxed,
    );
    let hold = fast_acquire(view, b"global/k", hash, 0).expect("within the safe time");
    assert!(fast_release(view, &hold));
    slot.grant_until_ns.store(1, Ordering::Relaxed);
    assert_eq!(fast_acquire(view, b"global/k", hash, 0), None);
    assert!(slot.word_acquire().is_free(), "given back");
}

#[test]
fn a_held_key_declines_the_fast_path() {
    let (_dir, table) = table_with(b"k", 1);
    let view = table.view();
    let hash = key_hash(b"k");
    let _hold = fast_acquire(view, b"k", hash, 0).unwrap();
    assert_eq!(fast_acquire(view, b"k", hash, 1), None);
}

#[test]
fn release_frees_the_word_and_the_next_grant_gets_a_larger_token() {
    let (_dir, table) = table_with(b"k", 50);
    let view = table.view();
    let hash = key_hash(b"k");
    let first = fast_acquire(view, b"k", hash, 0).unwrap();
    assert!(fast_release(view, &first));
    assert!(view.slot(2).unwrap().word_acquire().is_free());
    let second = fast_acquire(view, b"k", hash, 1).unwrap();
    assert!(second.token > first.token);
    assert_eq!(second.token, 52);
}

#[test]
fn an_unindexed_or_unprepared_key_declines_the_fast_path() {
    let (_dir, table) = table_with(b"k", 1);
    let view = table.view();
    assert_eq!(fast_acquire(view, b"other", key_hash(b"other"), 0), None);
    let slot = view.slot(2).unwrap();
    slot.word.store(Word::new(7, 0, 0, 0).0, Ordering::Release);
    assert_eq!(fast_acquire(view, b"k", key_hash(b"k"), 0), None);
}

#[test]
fn a_hash_collision_with_another_key_declines_the_fast_path() {
    let (_dir, table) = table_with(b"k", 1);
    // The index entry matches "k"'s hash; a different key with that hash
    // (faked by passing it) must still fail the key comparison.
    assert_eq!(fast_acquire(table.view(), b"j", key_hash(b"k"), 0), None);
}

#[test]
fn owner_died_is_reported_by_the_next_fast_grant() {
    let (_dir, table) = table_with(b"k", 1);
    let view = table.view();
    let slot = view.slot(2).unwrap();
    slot.word.store(
        Word::new(7, PREPARED | shm_layout::lockword::OWNER_DIED, 0, 4).0,
        Ordering::Release,
    );
    let hold = fast_acquire(view, b"k", key_hash(b"k"), 0).unwrap();
    assert!(hold.owner_died);
    assert_eq!(hold.token, 6);
}

/// Defect 8 of "Never two holders": the 16-bit key generation can wrap
/// while a client stalls between its lookup and its CAS; the CAS then
/// succeeded on a slot that holds another key by now.
#[test]
fn a_generation_that_wrapped_during_a_stall_does_not_grant_another_key() {
    let (_dir, table) = table_with(b"k", 1);
    let view = table.view();
    let (slot_index, seen) = view.lookup(b"k", key_hash(b"k")).unwrap();
    // 65,536 re-keys later the slot holds "other", at the same generation.
    prepare(view, slot_index, b"other", 1, seen.generation());
    assert_eq!(
        crate::mapped::fast_acquire_seen(view, b"k", slot_index, seen, 0),
        None
    );
    let word = view.slot(slot_index).unwrap().word_acquire();
    assert!(word.is_free(), "the mistaken hold was given back: {word:?}");
}

/// A `Key` remembers its slot; once the broker moved the name to another
/// slot (the old one re-keyed: a new generation), the hint misses and the
/// table's index finds the new slot, which the hint then names.
#[test]
fn a_keys_hint_follows_its_name_to_another_slot() {
    let (_dir, table) = table_with(b"orders:1", 1000);
    let view = table.view();
    let key = Key::new("orders:1").unwrap();
    let name = key.lock_name().unwrap();
    assert_eq!(name.find(view).map(|(slot, _)| slot), Some(2));
    prepare(view, 2, b"other", 1, 8);
    prepare(view, 6, b"orders:1", 5000, 3);
    let (slot, seen) = name.find(view).unwrap();
    assert_eq!((slot, seen.generation()), (6, 3));
    let hold = crate::mapped::fast_acquire_seen(view, b"orders:1", slot, seen, 1).unwrap();
    assert_eq!(hold.token, 5001);
    // The index entry of slot 6 is gone: only the hint can find it now.
    view.index_entry(key_hash(b"orders:1") as u32 & (view.geometry().index_len - 1))
        .unwrap()
        .0
        .store(0, Ordering::Relaxed);
    assert_eq!(name.find(view).map(|(slot, _)| slot), Some(6));
}

/// The hint trusts the slot's generation, which can wrap: a slot re-keyed
/// 65,536 times since holds another name at the hinted generation. The
/// grant's check of the key after its CAS refuses it, as for a lookup.
#[test]
fn a_keys_hint_to_a_slot_rekeyed_at_the_same_generation_grants_nothing_there() {
    let (_dir, table) = table_with(b"k", 1);
    let view = table.view();
    let key = Key::new("k").unwrap();
    let name = key.lock_name().unwrap();
    let (slot, seen) = name.find(view).unwrap();
    prepare(view, slot, b"other", 1, seen.generation());
    let (hinted, word) = name.find(view).unwrap();
    assert_eq!(hinted, slot, "the hint still names the wrapped slot");
    assert_eq!(
        crate::mapped::fast_acquire_seen(view, b"k", hinted, word, 0),
        None
    );
    let word = view.slot(slot).unwrap().word_acquire();
    assert!(word.is_free(), "the mistaken hold was given back: {word:?}");
}

/// Every lock call takes a `Key` as it takes text, and checks text keys
/// the same way; a `Key` with a bad name cannot be made.
#[test]
fn a_key_locks_as_its_name_does() {
    let broker = MockBroker::start(defaults);
    prepare(broker.state.table.view(), 5, b"hot", 100, 1);
    let client = broker.client();
    let key = Key::new("hot").unwrap();
    let guard = client.lock(&key).unwrap();
    assert!(guard.fast_path());
    assert_eq!(guard.token(), 101);
    drop(guard);
    assert_eq!(client.lock("hot").unwrap().token(), 102);
    assert_eq!(client.lock(key).unwrap().token(), 103);
    assert!(matches!(Key::new(""), Err(Error::Key(KeyError::Empty))));
    assert_eq!(acquires(&broker.state), 0);
}

#[test]
fn fast_release_fails_once_the_broker_took_the_slot_over() {
    let (_dir, table) = table_with(b"k", 1);
    let view = table.view();
    let hold = fast_acquire(view, b"k", key_hash(b"k"), 0).unwrap();
    let slot = view.slot(2).unwrap();
    slot.word.store(hold.held.0 & !PREPARED, Ordering::Release);
    assert!(!fast_release(view, &hold));
    assert_eq!(slot.word_acquire().0 & EXCLUSIVE, EXCLUSIVE);
}

// ---- a scripted broker ------------------------------------------------------------

/// How the mock answers one request on the connection owning `cell`; `None`
/// falls back to the defaults (Welcome, Pong, Released, Cancelled, and
/// `Granted { slot: 1, token: 10 }` for an Acquire).
type Handler = dyn Fn(&Arc<MockState>, u32, &Request) -> Option<Response> + Send + Sync;

struct MockState {
    table: MappedTable,
    requests: Mutex<Vec<(u32, Request)>>,
    connections: Mutex<Vec<RawFd>>,
    epoch: AtomicU64,
    refuse_attach: AtomicBool,
    /// The connection that owns each wait cell (set at its Hello).
    cell_fds: Mutex<std::collections::HashMap<u32, RawFd>>,
    handler: Box<Handler>,
}

impl MockState {
    /// Hand the lock over to the waiter on `cell`, as the broker does: the
    /// grant on its connection, then the cell and a futex wake.
    fn grant_cell(&self, cell: u32, token: u64, flags: u32) {
        let owner_died = flags & GRANT_OWNER_DIED != 0;
        self.answer_cell(
            cell,
            &Response::Granted {
                slot: 3,
                token,
                owner_died,
            },
        );
    }

    /// Answer the queued request of the connection owning `cell`, then wake it.
    fn answer_cell(&self, cell: u32, response: &Response) {
        let fd = self.cell_fds.lock().unwrap()[&cell];
        let bytes = encode(response);
        // SAFETY: `fd` is a connection the serving thread keeps open; `bytes`
        // is readable for its length.
        unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        let record = self.table.view().client(0).unwrap();
        let cell = &record.cells[cell as usize];
        cell.state.store(CELL_GRANTED, Ordering::Release);
        // SAFETY:
        // - `cell.state` is a live, 4-aligned u32 in the mapped table;
        // - FUTEX_WAKE reads no other pointer argument.
        let _ = unsafe {
            libc::syscall(
                libc::SYS_futex,
                cell.state.as_ptr(),
                libc::FUTEX_WAKE,
                i32::MAX,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0u32,
            )
        };
    }

    /// What a broker restart looks like to a client: every connection closes
    /// and the epoch goes up.
    fn restart(&self) {
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        self.table
            .view()
            .header()
            .broker_epoch
            .store(epoch, Ordering::Relaxed);
        for fd in self.connections.lock().unwrap().drain(..) {
            // SAFETY: shutdown(2) on a descriptor number has no memory
            // preconditions; the connection thread still owns (and will
            // close) the descriptor.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    fn requests(&self) -> Vec<(u32, Request)> {
        self.requests.lock().unwrap().clone()
    }
}

struct MockBroker {
    dir: tempfile::TempDir,
    state: Arc<MockState>,
}

impl MockBroker {
    fn start(
        handler: impl Fn(&Arc<MockState>, u32, &Request) -> Option<Response> + Send + Sync + 'static,
    ) -> MockBroker {
        let dir = runtime_dir();
        create_table(dir.path());
        create_events(dir.path());
        let state = Arc::new(MockState {
            table: MappedTable::open(&dir.path().join(TABLE_FILE)).unwrap(),
            requests: Mutex::default(),
            connections: Mutex::default(),
            epoch: AtomicU64::new(1),
            refuse_attach: AtomicBool::new(false),
            cell_fds: Mutex::default(),
            handler: Box::new(handler),
        });
        let listener = listen(&dir.path().join(SOCKET_FILE));
        let accept_state = state.clone();
        std::thread::spawn(move || {
            loop {
                // SAFETY: accept(2) on our listening socket; null address
                // pointers are allowed (we do not want the peer's address).
                let raw = unsafe {
                    libc::accept4(
                        listener.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if raw < 0 {
                    return;
                }
                // SAFETY: `raw` is a freshly accepted descriptor nobody owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                accept_state.connections.lock().unwrap().push(raw);
                let state = accept_state.clone();
                std::thread::spawn(move || serve(state, fd));
            }
        });
        MockBroker { dir, state }
    }

    fn client(&self) -> Client {
        Client::connect_to(self.dir.path()).unwrap()
    }
}

fn listen(path: &Path) -> OwnedFd {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) has no memory preconditions.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: `raw` is a fresh descriptor nobody owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `addr` is an initialised sockaddr_un and the length its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    // SAFETY: listen(2) on our bound socket.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 128) };
    assert_eq!(rc, 0);
    fd
}

fn serve(state: Arc<MockState>, fd: OwnedFd) {
    let mut cell = u32::MAX;
    let mut buf = [0u8; wire::MAX_MESSAGE];
    loop {
        // SAFETY: `fd` is our open socket; `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return;
        }
        let request = decode_request(&buf[..n as usize]).unwrap();
        if let Request::Hello { cell: c, .. } = request {
            cell = c;
            state.cell_fds.lock().unwrap().insert(c, fd.as_raw_fd());
        }
        state.requests.lock().unwrap().push((cell, request.clone()));
        let scripted = (state.handler)(&state, cell, &request);
        let response = scripted.unwrap_or_else(|| match request {
            Request::Hello {
                client: Some(_), ..
            } if state.refuse_attach.load(Ordering::Relaxed) => Response::Error {
                code: ErrorCode::NotYourRecord,
                message: "record 0 belongs to no live process".into(),
            },
            Request::Hello { .. } => Response::Welcome {
                client: 0,
                epoch: state.epoch.load(Ordering::Relaxed),
            },
            Request::Acquire { .. } => Response::Granted {
                slot: 1,
                token: 10,
                owner_died: false,
            },
            Request::Cancel { .. } => Response::Cancelled,
            Request::Release { .. } => Response::Released,
            Request::Check { .. } => Response::Holding,
            Request::Ping => Response::Pong,
            Request::Bye => Response::Bye,
            Request::Waiters { .. } => Response::Waiters {
                waiters: Vec::new(),
                total: 0,
            },
        });
        let bytes = encode(&response);
        // SAFETY: `fd` is our open socket; `bytes` is readable for its length.
        let sent = unsafe {
            libc::send(
                fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if sent < 0 {
            return;
        }
    }
}

fn defaults(_: &Arc<MockState>, _: u32, _: &Request) -> Option<Response> {
    None
}

/// Acquires that would queue (a blocking acquire's first ask, which does
/// not queue, is not counted).
fn acquires(state: &MockState) -> usize {
    state
        .requests()
        .iter()
        .filter(|(_, r)| matches!(r, Request::Acquire { queue: true, .. }))
        .count()
}

// ---- the client against the scripted broker -----------------------------------------

#[test]
fn keys_that_break_the_rules_are_refused_before_anything_is_sent() {
    let broker = MockBroker::start(defaults);
    let client = broker.client();
    assert!(matches!(client.lock(""), Err(Error::Key(KeyError::Empty))));
    assert!(matches!(
        client.try_lock([b'x'; MAX_KEY_LEN + 1]),
        Err(Error::Key(KeyError::TooLong { len: 65, max: 64 }))
    ));
    assert!(matches!(
        client.lock_shared("a\0b"),
        Err(Error::Key(KeyError::ContainsNul { offset: 1 }))
    ));
    assert_eq!(acquires(&broker.state), 0);
}

#[test]
fn a_prepared_key_is_taken_without_the_broker_and_records_a_fast_hit() {
    let broker = MockBroker::start(defaults);
    prepare(broker.state.table.view(), 5, b"hot", 100, 1);
    let client = broker.client();
    let guard = client.lock("hot").unwrap();
    assert!(guard.fast_path());
    assert!(!guard.is_shared());
    assert_eq!(guard.token(), 101);
    guard.release().unwrap();
    let again = client.try_lock("hot").unwrap();
    assert_eq!(again.token(), 102);
    drop(again);
    assert_eq!(acquires(&broker.state), 0);
    assert!(
        !broker
            .state
            .requests()
            .iter()
            .any(|(_, r)| matches!(r, Request::Release { .. }))
    );
    let events = MappedEvents::open(&broker.dir.path().join(EVENTS_FILE)).unwrap();
    assert_eq!(events.view().head(0), 2);
    let event = events.view().read(0, 0).unwrap();
    assert_eq!(event.outcome, Outcome::FastHit);
    assert_eq!(event.key_hash, key_hash(b"hot"));
    assert_eq!(event.client, 0);
}

#[test]
fn an_unprepared_key_is_granted_by_the_broker_and_released_through_it() {
    let broker = MockBroker::start(defaults);
    let client = broker.client();
    let guard = client.lock("cold").unwrap();
    assert!(!guard.fast_path());
    assert_eq!(guard.token(), 10);
    drop(guard);
    let requests = broker.state.requests();
    // A free key off the fast path is granted by the client's first ask,
    // which does not queue (see `Client::acquire`).
    assert!(requests.iter().any(|(_, r)| matches!(r,
        Request::Acquire {
            key,
            shared: false,
            queue: false,
            request: 1..,
        } if key == b"cold")));
    assert!(
        requests
            .iter()
            .any(|(_, r)| *r == Request::Release { slot: 1, token: 10 })
    );
}

#[test]
fn try_lock_on_a_held_key_is_would_block() {
    let broker = MockBroker::start(|_, _, request| match request {
        Request::Acquire { queue: false, .. } => Some(Response::WouldBlock),
        _ => None,
    });
    let client = broker.client();
    let err = client.try_lock("busy").unwrap_err();
    assert!(
        matches!(&err, Error::WouldBlock { key } if key == "busy"),
        "{err:?}"
    );
    let err = client.try_lock_shared("busy").unwrap_err();
    assert!(matches!(err, Error::WouldBlock { .. }));
}

#[test]
fn a_queued_request_sleeps_until_the_hand_off_and_learns_the_owner_died() {
    let broker = MockBroker::start(|state, cell, request| match request {
        // The client's first ask does not queue: the key is held.
        Request::Acquire { queue: false, .. } => Some(Response::WouldBlock),
        Request::Acquire { queue: true, .. } => {
            let state = state.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                state.grant_cell(cell, 99, GRANT_OWNER_DIED);
            });
            Some(Response::Queued { slot: 3 })
        }
        _ => None,
    });
    let client = broker.client();
    let guard = client.lock_shared("contended").unwrap();
    assert_eq!(guard.token(), 99);
    assert!(guard.previous_owner_died());
    assert!(guard.is_shared());
    guard.release().unwrap();
    assert!(
        broker
            .state
            .requests()
            .iter()
            .any(|(_, r)| *r == Request::Release { slot: 3, token: 99 })
    );
    assert_eq!(
        broker.state.table.view().client(0).unwrap().cells[0]
            .state
            .load(Ordering::Relaxed),
        CELL_IDLE
    );
}

#[test]
fn a_timeout_cancels_the_queued_request_and_reports_how_long_it_waited() {
    let broker = MockBroker::start(|_, _, request| match request {
        // The client's first ask does not queue: the key is held.
        Request::Acquire { queue: false, .. } => Some(Response::WouldBlock),
        Request::Acquire { queue: true, .. } => Some(Response::Queued { slot: 3 }),
        _ => None,
    });
    let client = broker.client();
    let err = client
        .lock_timeout("never", Duration::from_millis(60))
        .unwrap_err();
    match err {
        Error::Timeout { key, waited } => {
            assert_eq!(key, "never");
            assert!(waited >= Duration::from_millis(60));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        broker
            .state
            .requests()
            .iter()
            .any(|(_, r)| matches!(r, Request::Cancel { .. }))
    );
}

#[test]
fn a_hand_off_that_wins_the_race_with_cancel_is_a_grant() {
    let broker = MockBroker::start(|_, _, request| match request {
        // The client's first ask does not queue: the key is held.
        Request::Acquire { queue: false, .. } => Some(Response::WouldBlock),
        Request::Acquire { queue: true, .. } => Some(Response::Queued { slot: 4 }),
        Request::Cancel { .. } => Some(Response::Granted {
            slot: 4,
            token: 7,
            owner_died: false,
        }),
        _ => None,
    });
    let client = broker.client();
    let guard = client
        .lock_timeout("raced", Duration::from_millis(20))
        .unwrap();
    assert_eq!(guard.token(), 7);
}

/// The caller polls for the answer a bounded while, then sleeps in `recv`:
/// an answer that comes after the poll (a busy broker) is still received,
/// and is the one for this request.
#[test]
fn an_answer_slower_than_the_poll_is_received_asleep() {
    let broker = MockBroker::start(|_, _, request| match request {
        Request::Ping => {
            std::thread::sleep(Duration::from_millis(20));
            Some(Response::Pong)
        }
        _ => None,
    });
    let client = broker.client();
    assert!(client.ping().unwrap() >= Duration::from_millis(20));
    let g = client.lock("k").unwrap();
    assert_eq!(g.token(), 10, "the next answer is the next request's");
}

#[test]
fn ping_is_one_round_trip() {
    let broker = MockBroker::start(defaults);
    let client = broker.client();
    assert!(client.ping().unwrap() > Duration::ZERO);
}

#[test]
fn observe_waiters_asks_without_hello_and_returns_the_queue_in_order() {
    let broker = MockBroker::start(|_, _, request| match request {
        Request::Waiters { key } if key == b"k" => Some(Response::Waiters {
            waiters: vec![
                crate::observe::WaiterInfo {
                    pid: 7,
                    shared: false,
                },
                crate::observe::WaiterInfo {
                    pid: 9,
                    shared: true,
                },
            ],
            total: 2,
        }),
        _ => None,
    });
    let w = crate::observe::waiters(broker.dir.path(), "k").unwrap();
    assert_eq!(
        w.waiters
            .iter()
            .map(|w| (w.pid, w.shared))
            .collect::<Vec<_>>(),
        [(7, false), (9, true)]
    );
    assert_eq!(w.total, 2);
    let mut observer =
        crate::observe::Observer::connect(broker.dir.path(), Duration::from_secs(1)).unwrap();
    assert_eq!(observer.waiters("other").unwrap().total, 0);
    assert_eq!(
        broker
            .state
            .requests()
            .iter()
            .filter(|(_, r)| matches!(r, Request::Hello { .. }))
            .count(),
        0,
        "an observer registers nothing"
    );
}

#[test]
fn observe_gives_up_on_a_broker_that_does_not_answer() {
    let dir = runtime_dir();
    // Listening, never accepting: a stopped or hung broker.
    let _listener = listen(&dir.path().join(SOCKET_FILE));
    let started = Instant::now();
    let err = crate::observe::waiters(dir.path(), "k").unwrap_err();
    assert!(
        matches!(&err, Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "{err:?}"
    );
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let gone = runtime_dir();
    let err = crate::observe::waiters(gone.path(), "k").unwrap_err();
    assert!(matches!(err, Error::BrokerNotRunning { .. }), "{err:?}");
}

#[test]
fn broker_errors_become_errors_a_person_can_act_on() {
    let broker = MockBroker::start(|_, _, request| match request {
        Request::Acquire { .. } => Some(Response::Error {
            code: ErrorCode::TableFull,
            message: "8 slots, all held".into(),
        }),
        _ => None,
    });
    let client = broker.client();
    let err = client.lock("x").unwrap_err();
    assert!(matches!(err, Error::TableFull { .. }), "{err:?}");
    assert!(err.to_string().contains("8 slots, all held"));
}

#[test]
fn a_broker_restart_reconnects_and_the_held_lock_is_released_through_the_new_one() {
    let broker = MockBroker::start(defaults);
    let client = broker.client();
    let guard = client.lock("cold").unwrap();
    broker.state.restart();
    guard.release().unwrap();
    let hellos = broker
        .state
        .requests()
        .iter()
        .filter(|(_, r)| {
            matches!(
                r,
                Request::Hello {
                    client: Some(0),
                    ..
                }
            )
        })
        .count();
    assert_eq!(hellos, 1, "one reattach after the restart");
    client.ping().unwrap();
}

#[test]
fn a_waiter_whose_broker_restarts_asks_the_new_broker_again() {
    let broker = MockBroker::start(|state, _, request| match request {
        // The first broker queues and never grants; after the restart
        // (epoch 2) the broker grants at once.
        // The client's first ask does not queue: the key is held.
        Request::Acquire { queue: false, .. } => Some(Response::WouldBlock),
        Request::Acquire { queue: true, .. } if state.epoch.load(Ordering::Relaxed) == 1 => {
            Some(Response::Queued { slot: 3 })
        }
        _ => None,
    });
    let client = broker.client();
    let state = broker.state.clone();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        state.restart();
    });
    let guard = client.lock("k").unwrap();
    restarter.join().unwrap();
    assert_eq!(guard.token(), 10);
    assert_eq!(acquires(&broker.state), 2);
}

#[test]
fn an_error_answered_to_a_queued_wait_is_reported() {
    let broker = MockBroker::start(|state, cell, request| match request {
        // The acquire queues, then the broker cannot hand over (the client's
        // hold list is full) and answers why on the connection.
        // The client's first ask does not queue: the key is held.
        Request::Acquire { queue: false, .. } => Some(Response::WouldBlock),
        Request::Acquire { queue: true, .. } => {
            let state = state.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                let refusal = Response::Error {
                    code: ErrorCode::TooManyHolds,
                    message: "64 held".into(),
                };
                state.answer_cell(cell, &refusal);
            });
            Some(Response::Queued { slot: 3 })
        }
        _ => None,
    });
    let client = broker.client();
    let err = client.lock("k").unwrap_err();
    assert!(matches!(err, Error::TooManyHolds { .. }), "{err:?}");
    assert_eq!(acquires(&broker.state), 1);
}

#[test]
fn a_grant_scribbled_into_the_wait_cell_is_not_taken_for_a_grant() {
    let broker = MockBroker::start(|state, cell, request| match request {
        // The client's first ask does not queue: the key is held.
        Request::Acquire { queue: false, .. } => Some(Response::WouldBlock),
        Request::Acquire { queue: true, .. } => {
            let state = state.clone();
            std::thread::spawn(move || {
                // A scribbler writes "granted" into the cell: a wake-up only.
                std::thread::sleep(Duration::from_millis(20));
                let c = &state.table.view().client(0).unwrap().cells[cell as usize];
                c.token.store(666, Ordering::Relaxed);
                c.state.store(CELL_GRANTED, Ordering::Release);
                // The broker's real hand-off comes later, on the connection.
                std::thread::sleep(Duration::from_millis(100));
                state.grant_cell(cell, 7, 0);
            });
            Some(Response::Queued { slot: 3 })
        }
        _ => None,
    });
    let client = broker.client();
    let guard = client.lock("k").unwrap();
    assert_eq!(
        guard.token(),
        7,
        "the token comes from the broker's answer, not the cell"
    );
}

#[test]
fn a_broker_that_forgot_the_client_is_reported_as_restarted_and_disables_the_fast_path() {
    let broker = MockBroker::start(defaults);
    prepare(broker.state.table.view(), 5, b"hot", 100, 1);
    let client = broker.client();
    broker.state.refuse_attach.store(true, Ordering::Relaxed);
    broker.state.restart();
    let err = client.ping().unwrap_err();
    assert!(matches!(err, Error::BrokerRestarted { .. }), "{err:?}");
    assert!(err.to_string().contains("create a new Client"));
    let err = client.lock("hot").unwrap_err();
    assert!(matches!(err, Error::BrokerRestarted { .. }), "{err:?}");
}

#[test]
fn a_recreated_table_is_reported_as_broker_restarted() {
    let broker = MockBroker::start(defaults);
    let client = broker.client();
    let table = broker.dir.path().join(TABLE_FILE);
    std::fs::remove_file(&table).unwrap();
    create_table(broker.dir.path());
    broker.state.restart();
    let err = client.ping().unwrap_err();
    assert!(matches!(err, Error::BrokerRestarted { .. }), "{err:?}");
}

#[test]
fn more_blocked_callers_than_wait_cells_share_the_64_connections() {
    let broker = MockBroker::start(|state, cell, request| match request {
        // The client's first ask does not queue: the key is held.
        Request::Acquire { queue: false, .. } => Some(Response::WouldBlock),
        Request::Acquire { queue: true, .. } => {
            let state = state.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                state.grant_cell(cell, 5, 0);
            });
            Some(Response::Queued { slot: 3 })
        }
        _ => None,
    });
    let client = broker.client();
    let callers = WAIT_CELLS + 16;
    std::thread::scope(|scope| {
        for i in 0..callers {
            let client = &client;
            scope.spawn(move || {
                let guard = client.lock(format!("k{i}")).unwrap();
                assert_eq!(guard.token(), 5);
            });
        }
    });
    let requests = broker.state.requests();
    let mut cells: Vec<u32> = requests
        .iter()
        .filter(|(_, r)| matches!(r, Request::Hello { .. }))
        .map(|(cell, _)| *cell)
        .collect();
    let connections = cells.len();
    cells.sort_unstable();
    cells.dedup();
    assert_eq!(
        cells.len(),
        connections,
        "every connection has its own cell"
    );
    assert!(connections <= WAIT_CELLS);
    assert!(cells.iter().all(|&c| (c as usize) < WAIT_CELLS));
    assert_eq!(acquires(&broker.state), callers);
}

#[test]
fn client_and_guard_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Client>();
    assert_send_sync::<LockGuard<'static>>();
}

/// CPU ns per call of `op` over `rounds` calls, the lowest of 3 tries.
fn cpu_ns_per_op(rounds: u32, mut op: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let start = shm_layout::thread_cpu_ns();
            for _ in 0..rounds {
                op();
            }
            (shm_layout::thread_cpu_ns() - start) as f64 / f64::from(rounds)
        })
        .fold(f64::INFINITY, f64::min)
}

/// Not a test, a measurement: `cargo test -p forelock --release --lib --
/// --ignored --nocapture fast_path_cost`. A prepared acquire+release by
/// name and by `Key`, beside an uncontended std `Mutex`, in CPU time.
#[test]
#[ignore = "a measurement, run on demand with --release"]
fn fast_path_cost() {
    let broker = MockBroker::start(defaults);
    prepare(broker.state.table.view(), 5, b"hot", 100, 1);
    let client = broker.client();
    let key = Key::new("hot").unwrap();
    let mutex = std::sync::Mutex::new(0u64);
    // 6M grants in all: the mock broker cannot rebase the word's 24-bit
    // counter (16.7M grants) as forelockd does.
    let rounds = 1_000_000;
    let by_name = cpu_ns_per_op(rounds, || {
        let guard = client.lock("hot").unwrap();
        debug_assert!(guard.fast_path());
    });
    let by_key = cpu_ns_per_op(rounds, || {
        let guard = client.lock(&key).unwrap();
        debug_assert!(guard.fast_path());
    });
    let std_mutex = cpu_ns_per_op(rounds, || {
        *std::hint::black_box(&mutex).lock().unwrap() += 1;
    });
    println!(
        "CPU per prepared acquire+release: by name {by_name:.1} ns ({:.2}x std Mutex), by Key \
         {by_key:.1} ns ({:.2}x), std Mutex {std_mutex:.1} ns",
        by_name / std_mutex,
        by_key / std_mutex,
    );
}
