//! The access-event file: `<runtime dir>/events`, created by the broker.
//!
//! ```text
//! offset                       size                           region
//! 0                            EVENTS_HEADER_SIZE (128)       EventsHeader
//! 128 + r * RING_SIZE          RING_SIZE (64 + cap * 32)      Ring r, r in 0..=client_count
//! ```
//!
//! One ring per client record (ring `r` belongs to client record `r`) and one
//! for the broker (ring `client_count`). A producer never waits: it claims an
//! entry with a `fetch_add` on its ring's head (or, as its ring's only
//! writer, a plain load and store) and overwrites whatever was there, so a
//! slow reader loses the oldest events, never blocks a lock. Each
//! entry is a seqlock (odd `seq` while written), so the reader drops torn
//! entries instead of reading half of one.
//!
//! Events carry the key's hash, not its text; the predictor scores hashes and
//! the broker maps them back to keys it has seen. Fast-path events carry no
//! time (a clock read would cost as much as the lock): the reader stamps them
//! when it drains the ring, every few milliseconds.
//!
//! Advisory only: nobody trusts this file for anything.

use crate::LayoutError;
use crate::sync::shm::{AtomicU32, AtomicU64, Ordering, fence};
use core::mem::{offset_of, size_of};

pub const EVENTS_MAGIC: [u8; 8] = *b"FRLKEVT1";
pub const EVENTS_VERSION: u32 = 1;
pub const EVENTS_HEADER_SIZE: usize = 128;
pub const RING_HEADER_SIZE: usize = 64;
pub const EVENT_SIZE: usize = 32;

/// What happened to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    /// Granted by the client's own CAS on a prepared slot.
    FastHit = 1,
    /// Went through the broker because the key was not prepared.
    SlowPath = 2,
    /// Found the key held and queued.
    Contended = 3,
    /// Released through the broker.
    Released = 4,
    /// A preparation was reclaimed unused (written by the broker).
    Reclaimed = 5,
    /// A slot was prepared ahead of a request (written by the broker).
    Prepared = 6,
}

impl Outcome {
    pub fn from_u8(v: u8) -> Option<Outcome> {
        Some(match v {
            1 => Outcome::FastHit,
            2 => Outcome::SlowPath,
            3 => Outcome::Contended,
            4 => Outcome::Released,
            5 => Outcome::Reclaimed,
            6 => Outcome::Prepared,
            _ => return None,
        })
    }
}

#[repr(C, align(64))]
pub struct EventsHeader {
    pub magic: [u8; 8],
    pub endian_check: u32,
    /// Published last with Release; 0 = not ready.
    pub version: AtomicU32,
    pub file_size: u64,
    /// Number of rings (client records + 1 for the broker).
    pub ring_count: u32,
    /// Entries per ring, a power of two.
    pub ring_capacity: u32,
    pub _reserved: [u8; EVENTS_HEADER_SIZE - 32],
}

#[repr(C, align(64))]
pub struct RingHeader {
    /// Next sequence number to claim (total events ever claimed on this ring).
    pub head: AtomicU64,
    pub _reserved: [u64; 7],
}

/// `seq` while event number `n` is being written: `2n + 1`, wrapping. The
/// head is client-writable, so any `n` may come up; wrapping keeps the
/// arithmetic total (a scribbled head costs the ring's events, never a
/// panic: `fuzz/regressions/table_open/events-push-head-overflow`).
const fn seq_writing(n: u64) -> u64 {
    n.wrapping_mul(2).wrapping_add(1)
}

/// `seq` once event number `n` is complete: `2n + 2`, wrapping.
const fn seq_written(n: u64) -> u64 {
    n.wrapping_mul(2).wrapping_add(2)
}

/// One event. `seq = 2 * n + 1` while event number `n` is written, `2 * n + 2`
/// once complete.
#[repr(C)]
pub struct Event {
    pub seq: AtomicU64,
    pub key_hash: AtomicU64,
    /// CLOCK_MONOTONIC ns, or 0 when the producer did not read a clock.
    pub time_ns: AtomicU64,
    /// `outcome | mode << 8 | client << 16`.
    pub info: AtomicU64,
}

const _: () = {
    assert!(size_of::<EventsHeader>() == EVENTS_HEADER_SIZE);
    assert!(offset_of!(EventsHeader, version) == 12);
    assert!(offset_of!(EventsHeader, ring_capacity) == 28);
    assert!(size_of::<RingHeader>() == RING_HEADER_SIZE);
    assert!(size_of::<Event>() == EVENT_SIZE);
};

pub const fn ring_size(capacity: u32) -> usize {
    RING_HEADER_SIZE + capacity as usize * EVENT_SIZE
}

pub const fn events_file_size(ring_count: u32, capacity: u32) -> usize {
    EVENTS_HEADER_SIZE + ring_count as usize * ring_size(capacity)
}

/// A decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub key_hash: u64,
    pub time_ns: u64,
    pub outcome: Outcome,
    /// 0 = exclusive, 1 = shared.
    pub shared: bool,
    /// As written by the producer: a client's ring may say anything here.
    pub client: u32,
    /// Read from the broker's own ring (the last one), which no client
    /// writes: the only events a client cannot forge, e.g. `Contended`.
    pub from_broker: bool,
}

/// A validated view of the events file.
pub struct EventsView {
    base: *const u8,
    ring_count: u32,
    capacity: u32,
}

// SAFETY: every field reached through the view is atomic; see TableView.
unsafe impl Send for EventsView {}
// SAFETY: as above.
unsafe impl Sync for EventsView {}

impl EventsView {
    /// # Safety
    /// `base` points to a 64-aligned mapping of at least `len` bytes that stays
    /// mapped while the view lives, written by others only through atomics.
    pub unsafe fn new(base: *const u8, len: usize) -> Result<EventsView, LayoutError> {
        if len < EVENTS_HEADER_SIZE {
            return Err(LayoutError::Truncated {
                found: len as u64,
                needed: EVENTS_HEADER_SIZE as u64,
            });
        }
        // SAFETY: in bounds (checked), 64-aligned (contract), integers and
        // atomics only.
        let header = unsafe { &*(base as *const EventsHeader) };
        if header.magic != EVENTS_MAGIC {
            return Err(LayoutError::ForeignFile {
                what: "access-event",
                found: header.magic,
            });
        }
        if header.endian_check != crate::table::ENDIAN_CHECK {
            return Err(LayoutError::WrongEndianness);
        }
        // SYNC POINT: pairs with the Release store in `init_events`.
        match header.version.load(Ordering::Acquire) {
            0 => return Err(LayoutError::NotReady),
            EVENTS_VERSION => {}
            found => {
                return Err(LayoutError::VersionMismatch {
                    what: "access-event",
                    found,
                    supported: EVENTS_VERSION,
                });
            }
        }
        let (rings, capacity) = (header.ring_count, header.ring_capacity);
        if rings == 0
            || rings > crate::table::MAX_CLIENTS + 1
            || !capacity.is_power_of_two()
            || !(2..=1 << 20).contains(&capacity)
        {
            return Err(LayoutError::Corrupted {
                what: "access-event header has impossible ring counts",
            });
        }
        let needed = events_file_size(rings, capacity) as u64;
        if header.file_size != needed || (len as u64) < needed {
            return Err(LayoutError::Truncated {
                found: len as u64,
                needed,
            });
        }
        Ok(EventsView {
            base,
            ring_count: rings,
            capacity,
        })
    }

    pub fn ring_count(&self) -> u32 {
        self.ring_count
    }
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn ring_header(&self, ring: u32) -> Option<&RingHeader> {
        if ring >= self.ring_count {
            return None;
        }
        let offset = EVENTS_HEADER_SIZE + ring as usize * ring_size(self.capacity);
        // SAFETY:
        // - in bounds: ring < ring_count, and the file holds ring_count rings
        //   (validated in `new`);
        // - aligned: 128 + r * (64 + capacity * 32) is a multiple of 64 because
        //   capacity is a power of two >= 2 (validated), on a 64-aligned base;
        // - RingHeader holds only atomics, valid for any bit pattern.
        Some(unsafe { &*(self.base.wrapping_add(offset) as *const RingHeader) })
    }

    fn event(&self, ring: u32, n: u64) -> Option<&Event> {
        if ring >= self.ring_count {
            return None;
        }
        let index = (n & (self.capacity as u64 - 1)) as usize;
        let offset = EVENTS_HEADER_SIZE
            + ring as usize * ring_size(self.capacity)
            + RING_HEADER_SIZE
            + index * EVENT_SIZE;
        // SAFETY: ring < ring_count and index < capacity, so the entry lies in
        // the validated file; 8-aligned; atomics only.
        Some(unsafe { &*(self.base.wrapping_add(offset) as *const Event) })
    }

    /// Append an event to `ring`; never blocks, may overwrite the oldest.
    /// For a ring that several threads may push to at once: the entry is
    /// claimed with a `fetch_add` on the head.
    #[inline]
    pub fn push(
        &self,
        ring: u32,
        key_hash: u64,
        time_ns: u64,
        outcome: Outcome,
        shared: bool,
        client: u32,
    ) {
        let Some(header) = self.ring_header(ring) else {
            return;
        };
        let n = header.head.fetch_add(1, Ordering::Relaxed);
        self.write(ring, n, key_hash, time_ns, outcome, shared, client);
    }

    /// [`EventsView::push`] for the ring's only writer: the entry is claimed
    /// with a plain load and store of the head, no locked instruction (a
    /// `fetch_add` is a fifth of a fast-path grant's cost).
    ///
    /// If another thread pushes to the ring at the same time (the caller's
    /// promise broken, or the moment a client starts being shared between
    /// threads), no memory is unsafe and nothing but hints is lost: both
    /// may claim the same entry (one event lost, or a torn one, which the
    /// seqlock mostly catches and which is at worst a wrong hint), and a
    /// head stored late goes backwards, which the reader takes as a restart
    /// ([`EventCursor::drain`]). Events are advisory (module doc).
    #[inline]
    pub fn push_as_only_writer(
        &self,
        ring: u32,
        key_hash: u64,
        time_ns: u64,
        outcome: Outcome,
        shared: bool,
        client: u32,
    ) {
        let Some(header) = self.ring_header(ring) else {
            return;
        };
        let n = header.head.load(Ordering::Relaxed);
        header.head.store(n.wrapping_add(1), Ordering::Relaxed);
        self.write(ring, n, key_hash, time_ns, outcome, shared, client);
    }

    /// Write event number `n` of `ring`, claimed by the caller.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ring: u32,
        n: u64,
        key_hash: u64,
        time_ns: u64,
        outcome: Outcome,
        shared: bool,
        client: u32,
    ) {
        let Some(e) = self.event(ring, n) else { return };
        e.seq.store(seq_writing(n), Ordering::Relaxed);
        // SYNC POINT: this Release fence orders the odd `seq` before the field
        // stores; pairs with the reader's Acquire fence before its second `seq`
        // load, so a reader that saw any new field also sees `seq` changed.
        fence(Ordering::Release);
        e.key_hash.store(key_hash, Ordering::Relaxed);
        e.time_ns.store(time_ns, Ordering::Relaxed);
        e.info.store(
            outcome as u64 | (shared as u64) << 8 | (client as u64) << 16,
            Ordering::Relaxed,
        );
        // SYNC POINT: pairs with the reader's Acquire load of `seq`.
        e.seq.store(seq_written(n), Ordering::Release);
    }

    /// The ring's head (events ever claimed).
    pub fn head(&self, ring: u32) -> u64 {
        self.ring_header(ring)
            .map_or(0, |h| h.head.load(Ordering::Acquire))
    }

    /// Read event number `n` of `ring`, if it is complete and not overwritten.
    pub fn read(&self, ring: u32, n: u64) -> Option<EventRecord> {
        let e = self.event(ring, n)?;
        // SYNC POINT: pairs with the producer's final Release store of `seq`.
        let s1 = e.seq.load(Ordering::Acquire);
        if s1 != seq_written(n) {
            return None;
        }
        let key_hash = e.key_hash.load(Ordering::Relaxed);
        let time_ns = e.time_ns.load(Ordering::Relaxed);
        let info = e.info.load(Ordering::Relaxed);
        // SYNC POINT: pairs with the producer's Release fence after its odd store.
        fence(Ordering::Acquire);
        if e.seq.load(Ordering::Relaxed) != s1 {
            return None;
        }
        Some(EventRecord {
            key_hash,
            time_ns,
            outcome: Outcome::from_u8(info as u8)?,
            shared: (info >> 8) & 1 == 1,
            client: (info >> 16) as u32,
            from_broker: ring + 1 == self.ring_count,
        })
    }
}

/// Initialise a zeroed events file; publishes the version last.
pub fn init_events(header: &mut EventsHeader, ring_count: u32, capacity: u32) {
    assert!(
        capacity.is_power_of_two() && capacity >= 2,
        "ring capacity must be a power of two >= 2"
    );
    header.magic = EVENTS_MAGIC;
    header.endian_check = crate::table::ENDIAN_CHECK;
    header.file_size = events_file_size(ring_count, capacity) as u64;
    header.ring_count = ring_count;
    header.ring_capacity = capacity;
    // SYNC POINT: pairs with the Acquire load in `EventsView::new`.
    header.version.store(EVENTS_VERSION, Ordering::Release);
}

/// A reader's cursor over every ring: drains what is new, counts what was lost.
pub struct EventCursor {
    next: Vec<u64>,
    /// Events overwritten before we read them, or torn.
    pub lost: u64,
}

impl EventCursor {
    /// Start at the current heads (old events are history we did not see).
    pub fn new(view: &EventsView) -> EventCursor {
        EventCursor {
            next: (0..view.ring_count()).map(|r| view.head(r)).collect(),
            lost: 0,
        }
    }

    /// Call `f` on every event published since the last drain, ring by ring,
    /// at most `capacity` per ring (bounded).
    pub fn drain(&mut self, view: &EventsView, mut f: impl FnMut(EventRecord)) {
        let cap = view.capacity() as u64;
        for (ring, next) in self.next.iter_mut().enumerate() {
            let head = view.head(ring as u32);
            if head < *next {
                // The producer's head went backwards: a new broker re-created
                // the file or someone scribbled. Start over from here.
                *next = head;
                continue;
            }
            if head - *next > cap {
                self.lost += head - *next - cap;
                *next = head - cap;
            }
            while *next < head {
                match view.read(ring as u32, *next) {
                    Some(e) => f(e),
                    None => self.lost += 1,
                }
                *next += 1;
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[repr(C, align(64))]
    struct Aligned([u8; 128 + 3 * (64 + 8 * 32)]);

    #[test]
    fn events_round_trip_and_overwritten_ones_are_counted_lost() {
        let mut buf = Box::new(Aligned([0; 128 + 3 * (64 + 8 * 32)]));
        // SAFETY: the buffer is 64-aligned, large enough, and exclusively ours.
        let header = unsafe { &mut *(buf.0.as_mut_ptr() as *mut EventsHeader) };
        init_events(header, 3, 8);
        // SAFETY: as above; the view lives shorter than the buffer.
        let view = unsafe { EventsView::new(buf.0.as_ptr(), buf.0.len()) }.unwrap();
        let mut cursor = EventCursor::new(&view);
        for i in 0..10 {
            view.push(1, i, 0, Outcome::FastHit, false, 1);
        }
        view.push(2, 99, 5, Outcome::SlowPath, true, 7);
        let mut seen = vec![];
        cursor.drain(&view, |e| seen.push(e));
        assert_eq!(seen.len(), 9, "8 from the lapped ring, 1 from the other");
        assert_eq!(cursor.lost, 2);
        assert_eq!(seen[0].key_hash, 2);
        assert!(!seen[0].from_broker, "ring 0 is a client's");
        assert_eq!(
            seen[8],
            EventRecord {
                key_hash: 99,
                time_ns: 5,
                outcome: Outcome::SlowPath,
                shared: true,
                client: 7,
                from_broker: true,
            }
        );
    }

    #[test]
    fn ring_alignment_holds_for_every_ring() {
        for cap in [2u32, 8, 1024] {
            for r in 0..5 {
                assert_eq!((EVENTS_HEADER_SIZE + r * ring_size(cap)) % 64, 0);
            }
        }
    }
}
