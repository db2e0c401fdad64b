//! The lock table file: `<runtime dir>/table`, created and sized by the broker,
//! mapped shared by the broker and every client.
//!
//! ```text
//! offset                         size                          region
//! 0                              HEADER_SIZE (512)             Header
//! slots_offset = 512             slot_count * 128              Slot[slot_count]
//! index_offset                   index_len * 8                 IndexEntry[index_len]
//! clients_offset                 client_count * 1344           ClientRecord[client_count]
//! file_size                      (end)
//! ```
//!
//! Every region starts on a 64-byte boundary; [`Geometry::new`] derives the
//! offsets from the counts and the tests below check this drawing against it.
//!
//! Who writes what:
//! - header: the broker only.
//! - slots: the broker, except the lock word of a *prepared* slot, which clients
//!   CAS (see [`crate::lockword`]).
//! - key index: the broker only; clients read it lock-free and verify every hit
//!   against the slot's key, so a stale or scribbled entry costs a slow path,
//!   never a wrong grant.
//! - client records: the broker; a client reads its own wait cells.
//!
//! Nothing in this file is trusted by the broker for its own memory safety: every
//! index read from it is bounds-checked by the reader.

use crate::sync::shm::{AtomicU32, AtomicU64, Ordering};
use crate::{LayoutError, MAX_KEY_LEN};
use core::mem::{align_of, offset_of, size_of};

/// `b"FRLKTBL1"` read as a little-endian u64.
pub const TABLE_MAGIC: [u8; 8] = *b"FRLKTBL1";
/// Written in native order by the creator; read back as this value only on a
/// machine of the same byte order.
pub const ENDIAN_CHECK: u32 = 0x0102_0304;
/// Version of this file format (header, slot, index, client record layout and
/// the key hash function). Bump on any change.
pub const TABLE_VERSION: u32 = 3;

pub const HEADER_SIZE: usize = 512;
pub const SLOT_SIZE: usize = 128;
pub const INDEX_ENTRY_SIZE: usize = 8;
/// Waiters per client: one per concurrent blocking call of one `Client`.
pub const WAIT_CELLS: usize = 64;
/// Locks one client may hold through the broker at once (shared locks, and
/// exclusive locks granted on the slow path).
pub const BROKER_HOLDS: usize = 64;
pub const CLIENT_RECORD_SIZE: usize = 64 + BROKER_HOLDS * 4 + WAIT_CELLS * 16;
/// Clients probe at most this many index entries from a key's home bucket;
/// the broker never places an entry farther (it leaves the key unindexed).
pub const INDEX_MAX_PROBE: usize = 16;

/// The table header. One writer: the broker.
#[repr(C, align(64))]
pub struct Header {
    /// [`TABLE_MAGIC`].
    pub magic: [u8; 8],
    /// [`ENDIAN_CHECK`] in the creator's byte order.
    pub endian_check: u32,
    /// [`TABLE_VERSION`], stored last at creation with Release: 0 = not ready.
    /// SYNC POINT: readers load it with Acquire, pairing with that store, before
    /// reading any other field.
    pub version: AtomicU32,
    pub file_size: u64,
    pub slot_count: u32,
    pub index_len: u32,
    pub client_count: u32,
    pub wait_cells: u32,
    pub broker_holds: u32,
    pub _reserved0: u32,
    /// Bumped (by one) at each broker start that adopts or creates the table.
    pub broker_epoch: AtomicU64,
    pub broker_pid: AtomicU32,
    pub _reserved1: u32,
    /// CLOCK_MONOTONIC nanoseconds of the broker's last tick.
    pub heartbeat_ns: AtomicU64,
    /// Unix milliseconds when the current broker started.
    pub broker_started_unix_ms: AtomicU64,
    /// Every token issued so far is below this; a new preparation's token base
    /// starts here. Persisted so tokens keep increasing across restarts.
    pub token_floor: AtomicU64,
    pub _reserved2: [u8; 40],
    /// Broker counters (feedback for the forecaster and `forelock status`).
    pub stats: Stats,
    pub _reserved3: [u8; HEADER_SIZE - 128 - size_of::<Stats>()],
}

/// Counters the broker publishes; Relaxed, monotonic, for observers.
#[repr(C)]
pub struct Stats {
    /// Grants a client made itself on a prepared slot (counted by the broker
    /// from slot counters when it reclaims or samples them).
    pub hits: AtomicU64,
    /// Grants through the broker for a key that was not prepared.
    pub misses: AtomicU64,
    /// Requests that found their key held and queued.
    pub contended: AtomicU64,
    /// Queue hand-offs (release straight to the head waiter).
    pub handoffs: AtomicU64,
    /// Locks released because their holder died.
    pub owner_deaths: AtomicU64,
    /// Slots prepared ahead of a request by the allocator.
    pub preparations: AtomicU64,
    /// Preparations reclaimed without any grant (waste).
    pub wasted: AtomicU64,
    /// Requests that arrived while their key was being prepared.
    pub late: AtomicU64,
    /// Clients currently registered.
    pub clients: AtomicU64,
    /// Slots holding a key / prepared right now.
    pub slots_used: AtomicU64,
    pub slots_prepared: AtomicU64,
    /// Requests refused because the table was full.
    pub table_full: AtomicU64,
    /// Words the broker found malformed and repaired.
    pub repairs: AtomicU64,
    /// Keys whose contention-resolution state (slot, reserved waiter queue)
    /// the broker prepared because the forecaster predicted contention.
    ///
    /// This counter and the next were `_reserved` words, zero in every table
    /// written before them: an older broker leaves them 0 ("none"), and older
    /// readers never look, so they do not change [`TABLE_VERSION`].
    pub contention_prepared: AtomicU64,
    /// Contention preparations that a queued waiter used (counted once per
    /// preparation, when the first waiter queues on the prepared key).
    pub contention_prepared_hits: AtomicU64,
    pub _reserved: [u64; 1],
}

/// One lock slot: a hot cache line (the lock word and what a grant reads) and
/// a cold one (the key). The hot line is alone on its line so a CAS on one key
/// never invalidates another key's word (no false sharing between slots).
#[repr(C, align(64))]
pub struct Slot {
    /// See [`crate::lockword`]. The only field clients write.
    pub word: AtomicU64,
    /// Token of a grant = `token_base + counter`. Written by the broker only
    /// while no one holds the slot and before publishing the word (Release).
    pub token_base: AtomicU64,
    /// Key length in bytes; 0 = no key.
    pub key_len: AtomicU32,
    /// [`KEY_FLAG_GLOBAL`] reserved for cross-host keys.
    pub key_flags: AtomicU32,
    pub key_hash: AtomicU64,
    /// Until when clients may grant themselves this prepared slot's key:
    /// 0 for a local key (no limit); for a global key (docs/cluster.md),
    /// the CLOCK_MONOTONIC ns at which this host's lease stops being safe.
    /// A client that took the word checks it *after* its CAS
    /// ([`Slot::may_grant_now`]) and gives a grant made past it back: so a
    /// broker that is stopped or slow cannot let its clients go on granting
    /// themselves a global key after its node grant may have ended. Written
    /// by the broker before it publishes the prepared word (Release), and
    /// raised as the lease is renewed. Client-writable like every slot
    /// field: a scribbled value breaks that key only.
    pub grant_until_ns: AtomicU64,
    /// Latest forecaster score for the key (f32 bits), for observers.
    pub score_bits: AtomicU32,
    /// Waiters queued in the broker, for observers.
    pub waiters: AtomicU32,
    /// Broker clock (ms) when the current holder got the lock, for observers.
    pub held_since_ms: AtomicU64,
    /// Futex word of the contended path's sleepers within their bound: a
    /// sequence number, bumped (Release) by every release that wakes one of
    /// them, never a lock state (see [`crate::lockword`], "The contended
    /// path"). Written by clients: a scribbled value costs a spurious wake.
    /// On the hot line because every contended release touches it next to
    /// the word.
    pub park: AtomicU32,
    /// Futex word of the sleepers past their bound, waiting for a hand-off;
    /// bumped like [`Slot::park`] by a release that hands off.
    pub hungry: AtomicU32,
    /// The key's bytes, in native-endian 8-byte words. Written by the broker
    /// only while the word is not prepared, then published by the word's
    /// generation (the word is the seqlock of these bytes).
    pub key: [AtomicU64; MAX_KEY_LEN / 8],
}

/// The key will be arbitrated across hosts (reserved: cross-host locks are not
/// built yet).
pub const KEY_FLAG_GLOBAL: u32 = 1;

/// Index entry: `(hash >> 32) << 32 | (slot + 1)`; 0 = empty. Clients probe
/// linearly from `hash & (index_len - 1)` for at most [`INDEX_MAX_PROBE`].
#[repr(C)]
pub struct IndexEntry(pub AtomicU64);

impl IndexEntry {
    pub const fn pack(hash: u64, slot: u32) -> u64 {
        (hash & 0xFFFF_FFFF_0000_0000) | (slot as u64 + 1)
    }
    /// `Some(slot)` if the entry is occupied and its tag matches `hash`.
    pub const fn matches(raw: u64, hash: u64) -> Option<u32> {
        let slot_plus_one = raw & 0xFFFF_FFFF;
        if slot_plus_one != 0 && (raw ^ hash) & 0xFFFF_FFFF_0000_0000 == 0 {
            Some(slot_plus_one as u32 - 1)
        } else {
            None
        }
    }
}

/// Client record states.
pub const CLIENT_FREE: u32 = 0;
pub const CLIENT_ACTIVE: u32 = 1;

/// Wait cell states (the futex word).
pub const CELL_IDLE: u32 = 0;
/// The client sleeps on the cell; the broker will move it on.
pub const CELL_WAITING: u32 = 1;
/// The broker answered this wait on the connection (a grant, or an error):
/// read the answer there. `token` and `flags` mirror a grant for observers;
/// the client never takes a grant from the cell, which any client could
/// overwrite.
pub const CELL_GRANTED: u32 = 2;
/// The broker that queued this wait is gone; ask the new one again.
pub const CELL_ABANDONED: u32 = 3;

/// One blocked call's wake-up: the client sleeps on `state` with FUTEX_WAIT
/// (shared futex: the broker is another process); the grant itself arrives
/// on the connection.
#[repr(C)]
pub struct WaitCell {
    pub state: AtomicU32,
    /// Grant flags: [`GRANT_OWNER_DIED`].
    pub flags: AtomicU32,
    pub token: AtomicU64,
}
pub const GRANT_OWNER_DIED: u32 = 1;

/// One registered client (a `forelock::Client`). Written by the broker.
#[repr(C, align(64))]
pub struct ClientRecord {
    pub state: AtomicU32,
    pub pid: AtomicU32,
    /// The process's start time (clock ticks since boot, /proc/PID/stat field
    /// 22): with the pid, identifies the process across pid reuse.
    pub start_time: AtomicU64,
    pub uid: AtomicU32,
    pub _reserved0: u32,
    /// Broker epoch at registration.
    pub registered_epoch: AtomicU64,
    pub _reserved1: [u64; 4],
    /// Locks held through the broker: `(slot + 1) | HOLD_SHARED`, 0 = empty.
    /// The broker's own record, persisted so a restarted broker knows them.
    pub broker_holds: [AtomicU32; BROKER_HOLDS],
    pub cells: [WaitCell; WAIT_CELLS],
}
pub const HOLD_SHARED: u32 = 1 << 31;

// ---- compile-time layout checks -------------------------------------------------

const _: () = {
    assert!(size_of::<Header>() == HEADER_SIZE);
    assert!(offset_of!(Header, version) == 12);
    assert!(offset_of!(Header, file_size) == 16);
    assert!(offset_of!(Header, broker_epoch) == 48);
    assert!(offset_of!(Header, token_floor) == 80);
    assert!(offset_of!(Header, stats) == 128);
    assert!(size_of::<Stats>() == 16 * 8);
    assert!(offset_of!(Stats, repairs) == 12 * 8);
    assert!(
        offset_of!(Stats, contention_prepared) == 13 * 8,
        "taken from the reserved words after `repairs`"
    );
    assert!(offset_of!(Stats, contention_prepared_hits) == 14 * 8);
    assert!(size_of::<Slot>() == SLOT_SIZE);
    assert!(align_of::<Slot>() == 64);
    assert!(offset_of!(Slot, word) == 0);
    assert!(offset_of!(Slot, token_base) == 8);
    assert!(offset_of!(Slot, key_hash) == 24);
    assert!(offset_of!(Slot, held_since_ms) == 48);
    assert!(offset_of!(Slot, park) == 56);
    assert!(offset_of!(Slot, hungry) == 60);
    assert!(
        offset_of!(Slot, key) == 64,
        "the key starts the slot's second cache line"
    );
    assert!(size_of::<IndexEntry>() == INDEX_ENTRY_SIZE);
    assert!(size_of::<WaitCell>() == 16);
    assert!(offset_of!(ClientRecord, broker_holds) == 64);
    assert!(offset_of!(ClientRecord, cells) == 64 + BROKER_HOLDS * 4);
    assert!(size_of::<ClientRecord>() == CLIENT_RECORD_SIZE);
    assert!(CLIENT_RECORD_SIZE % 64 == 0);
    assert!(MAX_KEY_LEN % 8 == 0);
};

/// Counts and offsets of one table. Derived, never stored apart from the counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub slot_count: u32,
    pub index_len: u32,
    pub client_count: u32,
    pub slots_offset: usize,
    pub index_offset: usize,
    pub clients_offset: usize,
    pub file_size: usize,
}

/// Largest slot count (index_len = 2 * slots must fit in u32, and the file in
/// a few GiB).
pub const MAX_SLOTS: u32 = 1 << 24;
/// Client record index + 1 must fit the lock word's holders field.
pub const MAX_CLIENTS: u32 = crate::lockword::MAX_OWNER_INDEX + 1;

impl Geometry {
    /// The geometry for `slot_count` slots and `client_count` client records:
    /// the index gets the next power of two at or above twice the slots.
    pub fn new(slot_count: u32, client_count: u32) -> Result<Geometry, LayoutError> {
        if slot_count == 0 || slot_count > MAX_SLOTS {
            return Err(LayoutError::BadGeometry {
                what: "slot count",
                found: slot_count as u64,
                allowed: "1 to 16777216",
            });
        }
        if client_count == 0 || client_count > MAX_CLIENTS {
            return Err(LayoutError::BadGeometry {
                what: "client count",
                found: client_count as u64,
                allowed: "1 to 65535",
            });
        }
        let index_len = (slot_count as u64 * 2).next_power_of_two() as u32;
        let slots_offset = HEADER_SIZE;
        let index_offset = slots_offset + slot_count as usize * SLOT_SIZE;
        let clients_offset =
            (index_offset + index_len as usize * INDEX_ENTRY_SIZE).next_multiple_of(64);
        let file_size = clients_offset + client_count as usize * CLIENT_RECORD_SIZE;
        Ok(Geometry {
            slot_count,
            index_len,
            client_count,
            slots_offset,
            index_offset,
            clients_offset,
            file_size,
        })
    }
}

/// A validated view of a mapped table. Holds the base pointer; every accessor
/// bounds-checks its index, so a scribbled index can never reach outside.
pub struct TableView {
    base: *const u8,
    geometry: Geometry,
}

// SAFETY: a TableView is a pointer into a shared mapping whose every field is
// an atomic (or written once before the Release that publishes `version`), so
// sharing or sending it across threads adds no data race; the mapping's
// lifetime is the owner's business (see `TableView::new`'s contract).
unsafe impl Send for TableView {}
// SAFETY: as for Send: all access goes through atomics.
unsafe impl Sync for TableView {}

impl TableView {
    /// Validate the header of a mapped table and return a view of it.
    ///
    /// # Safety
    /// - `base` points to a mapping of at least `len` bytes, aligned to 64
    ///   (mmap gives page alignment), which stays mapped, shared and writable or
    ///   readable as the caller uses it, for as long as the view lives;
    /// - other processes may write it concurrently only through atomics (true
    ///   for forelock processes; a scribbler's writes are racy but can only
    ///   produce arbitrary bit patterns, which every field accepts).
    pub unsafe fn new(base: *const u8, len: usize) -> Result<TableView, LayoutError> {
        if len < HEADER_SIZE {
            return Err(LayoutError::Truncated {
                found: len as u64,
                needed: HEADER_SIZE as u64,
            });
        }
        debug_assert!(base as usize % 64 == 0);
        // SAFETY:
        // - `base` is valid for HEADER_SIZE bytes (checked above) and 64-aligned
        //   (caller's contract), which is Header's size and alignment;
        // - Header holds only integers and atomics, valid for any bit pattern.
        let header = unsafe { &*(base as *const Header) };
        let geometry = validate_header(header, len as u64)?;
        Ok(TableView { base, geometry })
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn header(&self) -> &Header {
        // SAFETY: validated in `new`: in bounds, aligned, any bit pattern valid.
        unsafe { &*(self.base as *const Header) }
    }

    /// The slot at `index`, or None if out of bounds.
    #[inline]
    pub fn slot(&self, index: u32) -> Option<&Slot> {
        if index >= self.geometry.slot_count {
            return None;
        }
        let offset = self.geometry.slots_offset + index as usize * SLOT_SIZE;
        debug_assert!(offset + SLOT_SIZE <= self.geometry.file_size);
        // SAFETY:
        // - in bounds: index < slot_count, and the geometry (validated against
        //   the mapping length) places slot_count slots inside the file;
        // - aligned: slots_offset is 512 and SLOT_SIZE is 128, both multiples of
        //   64, on a 64-aligned base;
        // - Slot holds only atomics, valid for any bit pattern.
        Some(unsafe { &*(self.base.wrapping_add(offset) as *const Slot) })
    }

    #[inline]
    pub fn index_entry(&self, position: u32) -> Option<&IndexEntry> {
        if position >= self.geometry.index_len {
            return None;
        }
        let offset = self.geometry.index_offset + position as usize * INDEX_ENTRY_SIZE;
        // SAFETY: in bounds (position < index_len, region inside the file),
        // 8-aligned (index_offset and entry size are multiples of 8), and an
        // AtomicU64 is valid for any bit pattern.
        Some(unsafe { &*(self.base.wrapping_add(offset) as *const IndexEntry) })
    }

    pub fn client(&self, index: u32) -> Option<&ClientRecord> {
        if index >= self.geometry.client_count {
            return None;
        }
        let offset = self.geometry.clients_offset + index as usize * CLIENT_RECORD_SIZE;
        // SAFETY: in bounds (index < client_count, region inside the file),
        // 64-aligned (clients_offset and record size are multiples of 64), and
        // ClientRecord holds only atomics, valid for any bit pattern.
        Some(unsafe { &*(self.base.wrapping_add(offset) as *const ClientRecord) })
    }

    /// Look `key` up in the index: the slot whose key equals `key`, with the
    /// word's generation at which the key was read. Lock-free, bounded to
    /// [`INDEX_MAX_PROBE`] probes; `None` means "ask the broker".
    #[inline]
    pub fn lookup(&self, key: &[u8], hash: u64) -> Option<(u32, crate::lockword::Word)> {
        let mask = self.geometry.index_len - 1;
        let home = hash as u32 & mask;
        for probe in 0..INDEX_MAX_PROBE as u32 {
            let entry = self.index_entry((home + probe) & mask)?;
            let raw = entry.0.load(Ordering::Relaxed);
            if raw == 0 {
                return None;
            }
            if let Some(slot_index) = IndexEntry::matches(raw, hash) {
                let slot = self.slot(slot_index)?;
                // SYNC POINT: Acquire pairs with the broker's Release store of
                // the word that published this key (and its token base).
                let word = slot.word_acquire();
                if slot.key_equals(key) {
                    return Some((slot_index, word));
                }
            }
        }
        None
    }
}

impl Slot {
    /// Whether a grant its client just made itself (by CAS) may stand, by
    /// [`Slot::grant_until_ns`]: always for a local key (one load, no clock
    /// read); for a global key, while the lease's safe time has not passed.
    #[inline]
    pub fn may_grant_now(&self) -> bool {
        // SYNC POINT: Acquire pairs with the broker's Release store of a
        // lowered limit (it lowers it before it takes the slot over), and
        // is ordered after the caller's grant CAS.
        let until = self.grant_until_ns.load(Ordering::Acquire);
        until == 0 || crate::monotonic_ns() < until
    }

    #[inline]
    pub fn word_acquire(&self) -> crate::lockword::Word {
        crate::lockword::Word(self.word.load(Ordering::Acquire))
    }

    /// Compare the slot's key with `key`. The bytes may change under us (a
    /// re-key); the caller's CAS on the word's generation catches that.
    #[inline]
    pub fn key_equals(&self, key: &[u8]) -> bool {
        if key.len() > MAX_KEY_LEN || self.key_len.load(Ordering::Relaxed) as usize != key.len() {
            return false;
        }
        let mut chunks = key.chunks_exact(8);
        for (stored, chunk) in self.key.iter().zip(&mut chunks) {
            let expect = u64::from_ne_bytes(chunk.try_into().expect("chunks of 8"));
            if stored.load(Ordering::Relaxed) != expect {
                return false;
            }
        }
        let rest = chunks.remainder();
        if rest.is_empty() {
            return true;
        }
        // Stored keys are zero-padded to a whole word (see `store_key`).
        // Built byte by byte: a copy into a buffer is a call to memcpy.
        let last = rest
            .iter()
            .enumerate()
            .fold(0u64, |word, (i, &b)| word | u64::from(b) << (8 * i));
        self.key[key.len() / 8].load(Ordering::Relaxed) == u64::from_ne_bytes(last.to_le_bytes())
    }

    /// The key bytes as stored (length clamped to the maximum: the length is
    /// untrusted).
    pub fn key_bytes(&self) -> Vec<u8> {
        let len = (self.key_len.load(Ordering::Relaxed) as usize).min(MAX_KEY_LEN);
        let mut buf = [0u8; MAX_KEY_LEN];
        for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&self.key[i].load(Ordering::Relaxed).to_ne_bytes());
        }
        buf[..len].to_vec()
    }

    /// Store `key` (broker only, while the word is not prepared). Padding
    /// bytes are zeroed so comparisons see a canonical form.
    pub fn store_key(&self, key: &[u8], hash: u64, flags: u32) {
        debug_assert!(key.len() <= MAX_KEY_LEN);
        let mut buf = [0u8; MAX_KEY_LEN];
        buf[..key.len()].copy_from_slice(key);
        for (i, chunk) in buf.chunks_exact(8).enumerate() {
            self.key[i].store(
                u64::from_ne_bytes(chunk.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        self.key_len.store(key.len() as u32, Ordering::Relaxed);
        self.key_hash.store(hash, Ordering::Relaxed);
        self.key_flags.store(flags, Ordering::Relaxed);
    }
}

/// Check magic, then byte order, then version, then sizes, each with its own
/// error.
pub fn validate_header(header: &Header, file_len: u64) -> Result<Geometry, LayoutError> {
    if header.magic != TABLE_MAGIC {
        return Err(LayoutError::ForeignFile {
            what: "lock table",
            found: header.magic,
        });
    }
    if header.endian_check != ENDIAN_CHECK {
        return Err(LayoutError::WrongEndianness);
    }
    // SYNC POINT: pairs with the creator's Release store of `version`.
    let version = header.version.load(Ordering::Acquire);
    if version == 0 {
        return Err(LayoutError::NotReady);
    }
    if version != TABLE_VERSION {
        return Err(LayoutError::VersionMismatch {
            what: "lock table",
            found: version,
            supported: TABLE_VERSION,
        });
    }
    let geometry = Geometry::new(header.slot_count, header.client_count)?;
    if geometry.index_len != header.index_len
        || header.wait_cells as usize != WAIT_CELLS
        || header.broker_holds as usize != BROKER_HOLDS
    {
        return Err(LayoutError::Corrupted {
            what: "lock table header counts disagree with each other",
        });
    }
    if header.file_size != geometry.file_size as u64 {
        return Err(LayoutError::Corrupted {
            what: "lock table header's file size disagrees with its counts",
        });
    }
    if file_len < geometry.file_size as u64 {
        return Err(LayoutError::Truncated {
            found: file_len,
            needed: geometry.file_size as u64,
        });
    }
    Ok(geometry)
}

/// Initialise a freshly zeroed table (the broker, at creation). Publishes the
/// version last, with Release, so readers see a complete header or version 0.
pub fn init_header(header: &mut Header, geometry: &Geometry) {
    header.magic = TABLE_MAGIC;
    header.endian_check = ENDIAN_CHECK;
    header.file_size = geometry.file_size as u64;
    header.slot_count = geometry.slot_count;
    header.index_len = geometry.index_len;
    header.client_count = geometry.client_count;
    header.wait_cells = WAIT_CELLS as u32;
    header.broker_holds = BROKER_HOLDS as u32;
    header.token_floor.store(1, Ordering::Relaxed);
    // SYNC POINT: pairs with the Acquire load in `validate_header`.
    header.version.store(TABLE_VERSION, Ordering::Release);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_drawing_in_the_module_docs_matches_the_geometry() {
        let g = Geometry::new(1000, 10).unwrap();
        assert_eq!(g.slots_offset, 512);
        assert_eq!(g.index_offset, 512 + 1000 * 128);
        assert_eq!(g.index_len, 2048);
        assert_eq!(g.clients_offset, g.index_offset + 2048 * 8);
        assert_eq!(g.file_size, g.clients_offset + 10 * 1344);
        assert_eq!(CLIENT_RECORD_SIZE, 1344);
    }

    #[test]
    fn index_entries_match_only_their_own_hash_tag() {
        let raw = IndexEntry::pack(0xAAAA_BBBB_0000_0001, 41);
        assert_eq!(IndexEntry::matches(raw, 0xAAAA_BBBB_1234_5678), Some(41));
        assert_eq!(IndexEntry::matches(raw, 0xAAAA_BBBC_0000_0001), None);
        assert_eq!(IndexEntry::matches(0, 0), None);
    }

    /// Every key length, so every remainder of the last 8-byte word: the
    /// stored key equals itself and nothing one byte off.
    #[test]
    fn a_stored_key_equals_itself_and_no_key_one_byte_off() {
        // SAFETY: a Slot holds only integers and atomics, valid all-zero.
        let slot: Slot = unsafe { std::mem::zeroed() };
        for len in 1..=MAX_KEY_LEN {
            let key: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            slot.store_key(&key, 0, 0);
            assert!(slot.key_equals(&key), "length {len}");
            let mut other = key.clone();
            *other.last_mut().unwrap() = b'#';
            assert!(!slot.key_equals(&other), "last byte changed, length {len}");
            assert!(!slot.key_equals(&key[..len - 1]), "a prefix, length {len}");
            let mut longer = key.clone();
            longer.push(0);
            assert!(!slot.key_equals(&longer), "one NUL more, length {len}");
        }
    }

    #[test]
    fn geometry_refuses_zero_and_oversized_counts() {
        assert!(Geometry::new(0, 1).is_err());
        assert!(Geometry::new(1, 0).is_err());
        assert!(Geometry::new(MAX_SLOTS + 1, 1).is_err());
        assert!(Geometry::new(1, MAX_CLIENTS + 1).is_err());
    }
}
