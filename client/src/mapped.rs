//! The runtime files mapped into this process, and the fast path over them.
//!
//! The fast path is a plain function over a [`TableView`] ([`fast_acquire`],
//! [`fast_release`]) so it can be tested on a table built in a temp file,
//! without a broker.

use crate::conn::futex_wait;
use crate::error::Error;
use memmap2::MmapRaw;
use shm_layout::events::{EventsView, Outcome};
use shm_layout::lockword::{self, ContendedEnd, Parker, Queue, Unparker, Word};
use shm_layout::sync::shm::{AtomicU32, Ordering};
use shm_layout::table::{Slot, TableView};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Check what was opened at `path` before mapping it: a regular file, owned
/// by the owner of its directory (the broker), not writable by other users,
/// in a directory not writable by other users. Whoever could change the file
/// could make this process take locks that are not its own, or crash it.
fn check_trusted(path: &Path, meta: &std::fs::Metadata) -> Result<(), Error> {
    let untrusted = |problem: String| Error::RuntimeFileUntrusted {
        path: path.to_owned(),
        problem,
    };
    if !meta.file_type().is_file() {
        return Err(untrusted(format!(
            "it is not a regular file ({:?})",
            meta.file_type()
        )));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dir_meta = std::fs::metadata(dir).map_err(|cause| Error::TableUnreadable {
        path: dir.to_owned(),
        cause,
    })?;
    if dir_meta.mode() & 0o002 != 0 {
        return Err(untrusted(format!(
            "its directory {} is writable by other users (mode {:04o}), so anyone could have \
             replaced it",
            dir.display(),
            dir_meta.mode() & 0o7777
        )));
    }
    if meta.uid() != dir_meta.uid() {
        return Err(untrusted(format!(
            "it is owned by uid {}, but its runtime directory by uid {} (the broker)",
            meta.uid(),
            dir_meta.uid()
        )));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(untrusted(format!(
            "it is writable by other users (mode {:04o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Map `path` read-write and shared, after [`check_trusted`]. Returns the
/// file's identity `(dev, ino)` with the mapping.
fn map_file(path: &Path) -> Result<(MmapRaw, (u64, u64)), Error> {
    let unreadable = |cause| Error::TableUnreadable {
        path: path.to_owned(),
        cause,
    };
    // O_NOFOLLOW: a symlink at the file's name is refused, never followed.
    let file: File = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::RuntimeFileUntrusted {
                path: path.to_owned(),
                problem: "it is a symbolic link (forelock never follows one there)".into(),
            });
        }
        Err(e) => return Err(unreadable(e)),
    };
    let meta = file.metadata().map_err(unreadable)?;
    check_trusted(path, &meta)?;
    if meta.len() == 0 {
        return Err(Error::from_layout(
            path.to_owned(),
            shm_layout::LayoutError::Truncated {
                found: 0,
                needed: shm_layout::table::HEADER_SIZE as u64,
            },
        ));
    }
    // MmapRaw, not MmapMut: other processes write this memory concurrently, so
    // no `&[u8]`/`&mut [u8]` over it may ever exist; we only reach it through
    // the raw pointer and the atomics of the shm-layout views.
    let map = MmapRaw::map_raw(&file).map_err(unreadable)?;
    Ok((map, (meta.dev(), meta.ino())))
}

/// The lock table, mapped shared, with its validated view.
pub(crate) struct MappedTable {
    // Field order: the view is dropped before the mapping it points into.
    view: TableView,
    map: MmapRaw,
    pub(crate) path: PathBuf,
    /// `(st_dev, st_ino)` of the file we mapped: a broker that recreated the
    /// table made a new file.
    pub(crate) identity: (u64, u64),
}

impl MappedTable {
    pub(crate) fn open(path: &Path) -> Result<MappedTable, Error> {
        let (map, identity) = map_file(path)?;
        // SAFETY:
        // - `map.as_ptr()` points to a mapping of `map.len()` bytes, page
        //   aligned (so 64-aligned), shared and read-write;
        // - the mapping stays mapped as long as the view: both live in this
        //   struct, the view is declared first so it is dropped first, and
        //   neither is moved out or replaced;
        // - other forelock processes write the file only through atomics
        //   (table module contract); a scribbler produces arbitrary bits, which
        //   every field accepts. A file shrunk under us would SIGBUS, not
        //   corrupt memory: only the broker sizes it, once, at creation, and
        //   only its uid and group may write it (docs/security.md).
        let view = unsafe { TableView::new(map.as_ptr(), map.len()) }
            .map_err(|cause| Error::from_layout(path.to_owned(), cause))?;
        Ok(MappedTable {
            view,
            map,
            path: path.to_owned(),
            identity,
        })
    }

    #[inline]
    pub(crate) fn view(&self) -> &TableView {
        &self.view
    }

    /// Whether the file at our path is still the one we mapped and its header
    /// still validates (a restarted broker that re-adopted the table).
    pub(crate) fn still_current(&self) -> Result<(), String> {
        let meta = std::fs::metadata(&self.path)
            .map_err(|e| format!("{} is gone: {e}", self.path.display()))?;
        if (meta.dev(), meta.ino()) != self.identity {
            return Err(format!("{} was recreated (new file)", self.path.display()));
        }
        shm_layout::table::validate_header(self.view.header(), self.map.len() as u64)
            .map(|_| ())
            .map_err(|e| format!("{} no longer validates: {e}", self.path.display()))
    }
}

/// The access-event file, mapped shared, with its validated view.
pub(crate) struct MappedEvents {
    // Field order: the view is dropped before the mapping it points into.
    view: EventsView,
    /// The thread that owns our ring's head, or [`NO_OWNER`] / [`SHARED`].
    owner: std::sync::atomic::AtomicU64,
    _map: MmapRaw,
}

/// [`MappedEvents::owner`] before the first event.
const NO_OWNER: u64 = 0;
/// [`MappedEvents::owner`] once a second thread pushed: `fetch_add` for good.
const SHARED: u64 = u64::MAX;

/// This thread's token, for [`MappedEvents::owner`]: unique in the process
/// for its lifetime (a counter, never reused), never [`NO_OWNER`] or
/// [`SHARED`]. One thread-local load once assigned.
#[inline]
fn thread_token() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: std::cell::Cell<u64> = const { std::cell::Cell::new(NO_OWNER) };
    }
    let token = TOKEN.get();
    if token != NO_OWNER {
        return token;
    }
    let token = NEXT.fetch_add(1, Ordering::Relaxed);
    TOKEN.set(token);
    token
}

impl MappedEvents {
    pub(crate) fn open(path: &Path) -> Result<MappedEvents, Error> {
        let (map, _) = map_file(path)?;
        // SAFETY:
        // - `map.as_ptr()` points to a page-aligned (so 64-aligned) shared
        //   mapping of `map.len()` bytes;
        // - it stays mapped while the view lives: both are fields of this
        //   struct, the view first, so it is dropped first;
        // - others write the file only through atomics (events module
        //   contract); any bit pattern is accepted by its fields.
        let view = unsafe { EventsView::new(map.as_ptr(), map.len()) }
            .map_err(|cause| Error::from_layout(path.to_owned(), cause))?;
        Ok(MappedEvents {
            view,
            owner: std::sync::atomic::AtomicU64::new(NO_OWNER),
            _map: map,
        })
    }

    /// Record a request of ours (`ring` is our client index) on the key
    /// with hash `hash`. A client used by one thread owns its ring and
    /// pushes without a locked instruction ([`EventsView::push_as_only_writer`]);
    /// the first push from a second thread makes the ring shared, and every
    /// push after it claims its entry with `fetch_add`. The owner's push in
    /// flight at that moment may collide with the other thread's: a hint
    /// lost or torn, once per client (what `push_as_only_writer` says).
    #[inline]
    pub(crate) fn record(&self, ring: u32, hash: u64, outcome: Outcome) {
        use std::sync::atomic::Ordering;
        let me = thread_token();
        // Relaxed: the owner word orders nothing; it only picks the claim.
        let owner = self.owner.load(Ordering::Relaxed);
        if owner == me || (owner == NO_OWNER && self.claim(me)) {
            self.view
                .push_as_only_writer(ring, hash, 0, outcome, false, ring);
        } else {
            if owner != SHARED {
                self.owner.store(SHARED, Ordering::Relaxed);
            }
            self.view.push(ring, hash, 0, outcome, false, ring);
        }
    }

    /// The first event: `me` becomes the ring's owner, unless another
    /// thread got there first (then the ring is shared).
    #[cold]
    fn claim(&self, me: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.owner
            .compare_exchange(NO_OWNER, me, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    #[cfg(test)]
    pub(crate) fn view(&self) -> &EventsView {
        &self.view
    }
}

/// A lock the client granted itself with one CAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FastHold {
    pub(crate) slot: u32,
    /// The word as written by our CAS: the release CAS expects exactly it.
    pub(crate) held: Word,
    pub(crate) token: u64,
    pub(crate) owner_died: bool,
    /// Not the caller's to keep, and to be released through the broker at
    /// once: taken on a slot re-keyed since the lookup (see
    /// [`fast_acquire_seen`]), or on a global key past its lease's safe
    /// time ([`Slot::may_grant_now`]), and the broker took the slot over
    /// before the CAS could give it back.
    pub(crate) give_back: bool,
}

/// The fast path: look `key` up, CAS its prepared word to "held by `owner`".
/// `None` means "ask the broker" (not indexed, not prepared, held, malformed,
/// re-keyed). No syscall, no allocation. (The client finds the slot through
/// [`crate::key::Name::find`], which may use a [`crate::Key`]'s hint.)
#[cfg(test)]
pub(crate) fn fast_acquire(
    table: &TableView,
    key: &[u8],
    hash: u64,
    owner: u32,
) -> Option<FastHold> {
    let (slot_index, seen) = table.lookup(key, hash)?;
    fast_acquire_seen(table, key, slot_index, seen, owner)
}

/// The CAS half of [`fast_acquire`], on the slot and word a lookup found.
///
/// The word's 16-bit generation is the seqlock of the slot's key, and it can
/// wrap while a client stalls between its lookup and its CAS (65,536 re-keys
/// of the slot). So once the CAS made the word ours, the key is compared
/// again: the broker re-keys only a free word, so while we hold it the key
/// cannot change, and a mismatch means the generation wrapped. Then the hold
/// is given back at once (or, if the broker took the slot over in that
/// instant, handed to the caller flagged `give_back`, to release through the
/// broker).
#[inline]
pub(crate) fn fast_acquire_seen(
    table: &TableView,
    key: &[u8],
    slot_index: u32,
    seen: Word,
    owner: u32,
) -> Option<FastHold> {
    let slot = table.slot(slot_index)?;
    // The CAS inside is Acquire (see keep_or_give_back's SYNC POINT).
    let grant = lockword::try_acquire_exclusive(&slot.word, seen.generation(), owner).ok()?;
    keep_or_give_back(slot, slot_index, key, grant)
}

/// A grant the client just made itself on `slot` (by CAS or claim), as a
/// hold with its token, kept if it may stand: the slot still holds `key`,
/// and (a global key) the lease's safe time has not passed. Otherwise given
/// back by CAS (`None`: ask the broker), or, if the broker took the slot
/// over first, returned flagged `give_back`.
#[inline]
fn keep_or_give_back(
    slot: &Slot,
    slot_index: u32,
    key: &[u8],
    grant: lockword::FastGrant,
) -> Option<FastHold> {
    // SYNC POINT: the grant's CAS (Acquire) pairs with the broker's Release
    // store that published the prepared word, or with the previous holder's
    // release, so `token_base` is the one of this preparation; the broker
    // never changes it while the slot is held, which it now is, by us.
    let token = slot
        .token_base
        .load(Ordering::Relaxed)
        .saturating_add(grant.held.counter() as u64);
    let hold = FastHold {
        slot: slot_index,
        held: grant.held,
        token,
        owner_died: grant.owner_died,
        give_back: false,
    };
    if slot.key_equals(key) && slot.may_grant_now() {
        return Some(hold);
    }
    if lockword::release_contended(&slot.word, hold.held, &mut SlotUnparker { slot }) {
        return None;
    }
    Some(FastHold {
        give_back: true,
        ..hold
    })
}

/// A lock the broker granted with `token` on `slot`: is it a fast-path
/// hold, released with one CAS and no message (issue 12: the broker grants
/// an unprepared, uncontended key that way)? `Some(held)`: release with
/// [`fast_release`] from `held`; `None`: release through the broker. The
/// word is read after the answer (see [`lockword::granted_on_fast_path`]).
pub(crate) fn broker_granted_fast(
    table: &TableView,
    slot: u32,
    owner: u32,
    token: u64,
) -> Option<Word> {
    let slot = table.slot(slot)?;
    // SYNC POINT: Acquire pairs with the broker's Release store of the
    // held word (its grant_fast), so the token base read next is the one
    // it wrote before.
    let word = slot.word_acquire();
    let base = slot.token_base.load(Ordering::Relaxed);
    lockword::granted_on_fast_path(word, owner, base, token)
}

/// Release a fast-path hold: one CAS when nobody waits, else the wake (or
/// hand-off) the waiters asked for. `false`: the broker took the slot over
/// meanwhile, release through it.
#[inline]
pub(crate) fn fast_release(table: &TableView, hold: &FastHold) -> bool {
    match table.slot(hold.slot) {
        Some(slot) => {
            lockword::release_contended(&slot.word, hold.held, &mut SlotUnparker { slot })
        }
        None => false,
    }
}

/// Spins (CPU pause loops, then yields) before a contended waiter's first
/// sleep: a hold on a hot key is often shorter than a futex round trip.
const SPINS_PAUSE: u32 = 3;
const SPINS_YIELD: u32 = 3;
/// The shortest sleep a waiter asks for: below it a timed FUTEX_WAIT costs
/// more in timer set-up than it saves.
const SLEEP_MIN: Duration = Duration::from_micros(20);

/// A contended waiter's side of [`lockword::Parker`]: the slot's futex words
/// (shared futexes: the waker is another process), the fairness bound, the
/// caller's deadline.
pub(crate) struct SlotParker<'a> {
    slot: &'a Slot,
    start: Instant,
    fair_after: Duration,
    deadline: Option<Instant>,
    spins: u32,
    /// The `hungry` sequence and when we first saw that value (the
    /// hand-off rate limit, see `Parker::may_ask_handoff`).
    handoffs_seen: Option<(u32, Instant)>,
}

impl<'a> SlotParker<'a> {
    pub(crate) fn new(slot: &'a Slot, fair_after: Duration, deadline: Option<Instant>) -> Self {
        SlotParker {
            slot,
            start: Instant::now(),
            fair_after,
            deadline,
            spins: 0,
            handoffs_seen: None,
        }
    }
}

fn futex_of(slot: &Slot, queue: Queue) -> &AtomicU32 {
    match queue {
        Queue::Parked => &slot.park,
        Queue::Hungry => &slot.hungry,
    }
}

impl Parker for SlotParker<'_> {
    #[inline]
    fn sequence(&self, queue: Queue) -> u32 {
        // SYNC POINT: Acquire pairs with the Release bump in
        // `SlotUnparker::wake_one` (see `lockword::lock_contended`).
        futex_of(self.slot, queue).load(Ordering::Acquire)
    }

    fn sleep(&mut self, queue: Queue, expected: u32) {
        let now = Instant::now();
        // Within the bound, sleep until it; past it, one bound at a time
        // (a hungry waiter that may not ask for a hand-off yet, on `park`,
        // asks when it next wakes; one on `hungry` re-checks a hand-off
        // whose wake-up went to a waiter that died).
        let mut timeout = match (self.start + self.fair_after).checked_duration_since(now) {
            Some(left) if !left.is_zero() && queue == Queue::Parked => left,
            _ => self.fair_after,
        };
        if let Some(deadline) = self.deadline {
            timeout = timeout.min(deadline.saturating_duration_since(now));
        }
        futex_wait(futex_of(self.slot, queue), expected, timeout.max(SLEEP_MIN));
    }

    #[inline]
    fn hungry(&mut self) -> bool {
        self.start.elapsed() >= self.fair_after
    }

    fn may_ask_handoff(&mut self, hungry_sequence: u32) -> bool {
        let now = Instant::now();
        match self.handoffs_seen {
            Some((seen, since)) if seen == hungry_sequence => {
                now.duration_since(since) >= self.fair_after
            }
            Some(_) => {
                // A hand-off since we last looked: wait a bound from now.
                self.handoffs_seen = Some((hungry_sequence, now));
                false
            }
            None => {
                self.handoffs_seen = Some((hungry_sequence, now));
                true
            }
        }
    }

    #[inline]
    fn expired(&mut self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    #[inline]
    fn spin(&mut self) -> bool {
        if self.spins < SPINS_PAUSE {
            // Poll the word between pauses (test and test-and-set): a hold
            // on a hot key is a few dozen nanoseconds, and a waiter that
            // only looks after a whole pause loop misses the instant it is
            // free, so the releaser takes it back again and again (grants
            // 0.38 min/max between two processes).
            for _ in 0..(32u32 << self.spins) {
                std::hint::spin_loop();
                // Relaxed: only a hint to stop spinning; the grant CAS that
                // follows is the Acquire.
                let w = Word(self.slot.word.load(Ordering::Relaxed));
                if w.is_free() || w.is_handoff() {
                    break;
                }
            }
        } else if self.spins < SPINS_PAUSE + SPINS_YIELD {
            std::thread::yield_now();
        } else {
            return false;
        }
        self.spins += 1;
        true
    }
}

/// A releaser's side of [`lockword::Unparker`] on one slot.
pub(crate) struct SlotUnparker<'a> {
    pub(crate) slot: &'a Slot,
}

impl Unparker for SlotUnparker<'_> {
    fn wake_one(&mut self, queue: Queue) -> u32 {
        let word = futex_of(self.slot, queue);
        // SYNC POINT: Release pairs with the Acquire of `SlotParker::sequence`:
        // a waiter that reads this bump also sees our release CAS.
        word.fetch_add(1, Ordering::Release);
        futex_wake_one(word)
    }
}

/// FUTEX_WAKE one sleeper on `word` (shared futex: the sleeper is another
/// process). Returns how many woke.
fn futex_wake_one(word: &AtomicU32) -> u32 {
    // SAFETY:
    // - `word` is a valid, 4-aligned u32 (an AtomicU32) in the table mapping,
    //   alive for the call (the caller borrows the slot from the mapping);
    // - FUTEX_WAKE reads no other pointer argument (timeout, uaddr2 ignored).
    let woken = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            1i32,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    woken.max(0) as u32
}

/// How a contended acquire on a prepared slot ended.
pub(crate) enum Contended {
    Held(FastHold),
    /// Not a prepared slot any more, or its counter ran out: ask the broker.
    Broker,
    TimedOut,
}

/// The contended path: the key's slot was found held on the fast path.
/// Sleep on the slot's futexes until granted, handed off, declined or
/// timed out. No broker, no socket.
#[cold]
#[inline(never)]
pub(crate) fn contended_acquire(
    table: &TableView,
    key: &[u8],
    hash: u64,
    owner: u32,
    fair_after: Duration,
    deadline: Option<Instant>,
) -> Contended {
    let Some((slot_index, seen)) = table.lookup(key, hash) else {
        return Contended::Broker;
    };
    let Some(slot) = table.slot(slot_index) else {
        return Contended::Broker;
    };
    let mut parker = SlotParker::new(slot, fair_after, deadline);
    match lockword::lock_contended(&slot.word, seen.generation(), owner, &mut parker) {
        Ok(grant) => {
            // The generation may have wrapped while we slept, or a global
            // key's lease passed its safe time (see keep_or_give_back).
            match keep_or_give_back(slot, slot_index, key, grant) {
                Some(hold) => Contended::Held(hold),
                None => Contended::Broker,
            }
        }
        Err(ContendedEnd::Expired) => Contended::TimedOut,
        Err(ContendedEnd::Declined(_)) => Contended::Broker,
    }
}
