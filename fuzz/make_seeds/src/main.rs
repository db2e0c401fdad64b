//! `make_seeds <corpus dir>`: writes the seeds of each fuzz target under
//! `<corpus dir>/<target>/`, one file per input, named for what it holds.

use shm_layout::events::{EventsView, Outcome, events_file_size, init_events};
use shm_layout::scores::{ScoresView, init_scores, scores_file_size};
use shm_layout::table::{Geometry, Header, IndexEntry, TableView, init_header};
use shm_layout::wire::{ErrorCode, Request, Response, encode};
use shm_layout::{key_hash, lockword};
use std::path::Path;
use std::sync::atomic::Ordering;

/// 64 bytes on a 64-byte boundary.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A zeroed, 64-byte-aligned buffer of `len` bytes (rounded up to 64).
fn aligned(len: usize) -> Vec<Line> {
    vec![Line([0; 64]); len.div_ceil(64)]
}

fn bytes_of(buf: &[Line], len: usize) -> Vec<u8> {
    buf.iter().flat_map(|l| l.0).take(len).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn wire(dir: &Path) {
    let requests = [
        (
            "hello-new",
            Request::Hello {
                protocol: 1,
                table_version: 1,
                client: None,
                cell: 0,
            },
        ),
        (
            "hello-attach",
            Request::Hello {
                protocol: 1,
                table_version: 1,
                client: Some(3),
                cell: 63,
            },
        ),
        (
            "acquire",
            Request::Acquire {
                key: b"orders:42".to_vec(),
                shared: false,
                queue: true,
                request: 1,
            },
        ),
        (
            "acquire-shared-try",
            Request::Acquire {
                key: vec![b'k'; 64],
                shared: true,
                queue: false,
                request: 2,
            },
        ),
        ("cancel", Request::Cancel { request: 1 }),
        ("bye", Request::Bye),
        (
            "waiters",
            Request::Waiters {
                key: b"orders:42".to_vec(),
            },
        ),
        (
            "release",
            Request::Release {
                slot: 7,
                token: u64::MAX,
            },
        ),
        ("ping", Request::Ping),
        (
            "check",
            Request::Check {
                slot: 7,
                token: 1 << 24,
            },
        ),
    ];
    for (name, r) in requests {
        write(dir, &format!("request-{name}"), &encode(&r));
    }
    let responses = [
        (
            "welcome",
            Response::Welcome {
                client: 2,
                epoch: 9,
            },
        ),
        (
            "granted",
            Response::Granted {
                slot: 1,
                token: 1 << 40,
                owner_died: true,
            },
        ),
        ("queued", Response::Queued { slot: 5 }),
        ("wouldblock", Response::WouldBlock),
        ("cancelled", Response::Cancelled),
        ("released", Response::Released),
        ("pong", Response::Pong),
        ("bye", Response::Bye),
        ("holding", Response::Holding),
        (
            "error",
            Response::Error {
                code: ErrorCode::TableFull,
                message: "full".into(),
            },
        ),
    ];
    for (name, r) in responses {
        write(dir, &format!("response-{name}"), &encode(&r));
    }
}

fn table(dir: &Path) {
    for (slots, clients) in [(1u32, 1u32), (4, 2)] {
        let g = Geometry::new(slots, clients).unwrap();
        let mut buf = aligned(g.file_size);
        let base = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: the buffer is 64-aligned and at least HEADER_SIZE bytes (the
        // file size includes the header), and nothing else refers to it.
        let header = unsafe { &mut *base.cast::<Header>() };
        init_header(header, &g);
        // SAFETY: `base` is valid and aligned for `g.file_size` bytes while
        // `buf` lives, which outlives the view.
        let view = unsafe { TableView::new(base, g.file_size) }.unwrap();
        // One prepared key, indexed, so lookups of it succeed.
        let key = b"orders:42";
        let hash = key_hash(key);
        let slot = view.slot(0).unwrap();
        slot.store_key(key, hash, 0);
        slot.token_base.store(1, Ordering::Relaxed);
        let word = lockword::Word::new(1, lockword::PREPARED, 0, 0);
        slot.word.store(word.0, Ordering::Release);
        let home = hash as u32 & (g.index_len - 1);
        view.index_entry(home)
            .unwrap()
            .0
            .store(IndexEntry::pack(hash, 0), Ordering::Relaxed);
        write(
            dir,
            &format!("table-{slots}-slots-{clients}-clients"),
            &bytes_of(&buf, g.file_size),
        );
    }
}

fn events(dir: &Path) {
    let (rings, capacity) = (2, 4);
    let len = events_file_size(rings, capacity);
    let mut buf = aligned(len);
    let base = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: 64-aligned, at least the header's size, no other reference.
    init_events(unsafe { &mut *base.cast() }, rings, capacity);
    // SAFETY: valid and aligned for `len` bytes while `buf` lives.
    let view = unsafe { EventsView::new(base, len) }.unwrap();
    view.push(0, 7, 100, Outcome::FastHit, false, 0);
    view.push(1, 8, 200, Outcome::SlowPath, true, 1);
    write(dir, "events-2-rings-4-events", &bytes_of(&buf, len));
}

fn scores(dir: &Path) {
    let capacity = 3;
    let len = scores_file_size(capacity);
    let mut buf = aligned(len);
    let base = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: 64-aligned, at least the header's size, no other reference.
    init_scores(unsafe { &mut *base.cast() }, capacity);
    // SAFETY: valid and aligned for `len` bytes while `buf` lives.
    let view = unsafe { ScoresView::new(base, len) }.unwrap();
    view.write("recency", 500, 1, [(7u64, 0.25f32), (8, 0.75)]);
    write(dir, "scores-3-entries", &bytes_of(&buf, len));
}

fn main() {
    let corpus = std::env::args()
        .nth(1)
        .expect("usage: make_seeds <corpus dir>");
    let corpus = Path::new(&corpus);
    wire(&corpus.join("wire_decode"));
    let files = corpus.join("table_open");
    table(&files);
    events(&files);
    scores(&files);
}
