//! The ledger: the broker's own truth, persisted where no client can write it.
//!
//! The lock table is shared with every client of the access group, so the
//! broker never trusts it for what decides a grant: which key a slot holds,
//! the token base of a slot, the token floor, which client records are live
//! and with which process, and which locks each client holds through the
//! broker (including fast-path holds the broker took over). Those live here,
//! in `<runtime dir>/ledger`: a file of mode 0600 owned by the broker's uid,
//! mapped shared by the broker alone. A store to it is a plain memory store
//! (no syscall on the grant path), and it survives a SIGKILL of the broker
//! the way the table does (tmpfs pages outlive the process), so a restarted
//! broker rebuilds its state from the ledger and reads from the table only
//! what clients legitimately write there: the lock words of prepared slots.
//!
//! ```text
//! word offset                      words                     region
//! 0                                HEADER_WORDS (8)          header
//! 8                                slot_count * SLOT_WORDS   one entry per table slot
//! 8 + slot_count * SLOT_WORDS      client_count * CLIENT_WORDS  one entry per client record
//! ```
//!
//! Write order, so that a SIGKILL between any two stores leaves a ledger a
//! restarted broker can trust:
//! - a hold is recorded before its grant is answered, and erased after the
//!   word or queue that released it changed: a crash in between leaves a
//!   hold recorded that its client no longer has, which that client's
//!   re-sent Release (or its death) clears; never the reverse;
//! - a hold that lives in a prepared lock word (a fast-path hold the broker
//!   granted, or one a take-over is about to freeze) is recorded flagged
//!   `on_fast_path` before the word says it (grant) or is frozen
//!   (take-over), and believed only while the word names it: its holder
//!   may release it with a CAS the broker never sees, so a crash leaves a
//!   record that adoption checks against the word;
//! - the floor is raised before a slot's counter is reset (re-key), and a
//!   slot's base is written before the table's copy;
//! - a client entry is written before its Welcome, and erased after its holds.
//!
//! Nothing here is shared with clients, so the file's format is private to
//! the broker and versioned by [`LEDGER_VERSION`]: a ledger of another
//! version or geometry is set aside, and the broker starts a new table.

use shm_layout::MAX_KEY_LEN;
use shm_layout::sync::shm::{AtomicU64, Ordering};
use shm_layout::table::BROKER_HOLDS;

/// `b"FRLKLDG1"` as a little-endian u64.
const LEDGER_MAGIC: u64 = u64::from_le_bytes(*b"FRLKLDG1");
/// 2: holds carry the `on_fast_path` flag (issue 12: one round trip for an
/// unprepared key).
pub const LEDGER_VERSION: u64 = 2;
const HEADER_WORDS: usize = 8;
const KEY_WORDS: usize = MAX_KEY_LEN / 8;
/// `[key_len + 1 (0 = no key), base, key words...]`.
const SLOT_WORDS: usize = 2 + KEY_WORDS;
/// Holds one client may have on record: its [`BROKER_HOLDS`] broker-granted
/// locks and as many fast-path holds the broker took over.
pub const LEDGER_HOLDS: usize = 2 * BROKER_HOLDS;
/// `[pid + 1 (0 = free), start time, uid, reserved, holds...]`, each hold
/// three words `[packed, token, request]`.
const CLIENT_WORDS: usize = 4 + LEDGER_HOLDS * 3;

const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_SLOTS: usize = 2;
const H_CLIENTS: usize = 3;
const H_EPOCH: usize = 4;
const H_FLOOR: usize = 5;

/// A hold as the ledger records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    pub slot: u32,
    pub shared: bool,
    /// The grant's token (for a taken-over fast hold: the token the word
    /// stood for).
    pub token: u64,
    /// The client's request id that produced the grant; [`FAST_REQUEST`] for
    /// a fast-path hold the broker took over.
    pub request: u64,
    /// The grant told its holder that the previous owner died.
    pub owner_died: bool,
    /// Granted by the broker as a fast-path hold (`lockword::prepare_held_for`):
    /// its holder releases it with a CAS the broker never sees, so this
    /// record is only true while the slot's word still names this client
    /// with this token. Whoever reads the record checks that first (the
    /// engine's `settle_fast_grant`, adoption); a take-over turns it into
    /// an ordinary hold (flag cleared).
    pub on_fast_path: bool,
}

/// The request id of a hold the client granted itself on the fast path.
pub const FAST_REQUEST: u64 = 0;

const HOLD_SHARED: u64 = 1 << 32;
const HOLD_OWNER_DIED: u64 = 1 << 33;
const HOLD_ON_FAST_PATH: u64 = 1 << 34;

impl Hold {
    fn pack(&self) -> u64 {
        (self.slot as u64 + 1)
            | if self.shared { HOLD_SHARED } else { 0 }
            | if self.owner_died { HOLD_OWNER_DIED } else { 0 }
            | if self.on_fast_path {
                HOLD_ON_FAST_PATH
            } else {
                0
            }
    }
    fn unpack(packed: u64, token: u64, request: u64) -> Option<Hold> {
        let slot = (packed & 0xFFFF_FFFF).checked_sub(1)? as u32;
        Some(Hold {
            slot,
            shared: packed & HOLD_SHARED != 0,
            token,
            request,
            owner_died: packed & HOLD_OWNER_DIED != 0,
            on_fast_path: packed & HOLD_ON_FAST_PATH != 0,
        })
    }
}

/// A client entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientEntry {
    pub pid: u32,
    pub start_time: u64,
    pub uid: u32,
}

/// The memory a ledger lives in: the mapped file, or the heap (tests and the
/// explorer, which clone it).
enum Backing {
    File(memmap2::MmapMut),
    Heap(Box<[AtomicU64]>),
}

pub struct Ledger {
    backing: Backing,
    slots: u32,
    clients: u32,
}

/// Why a ledger could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the ledger is {found} bytes, expected {expected}")]
    Size { found: usize, expected: usize },
    #[error("not a forelock ledger, or of another version (magic/version mismatch)")]
    Foreign,
    #[error("the ledger describes {slots} slots and {clients} clients, the table another geometry")]
    Geometry { slots: u64, clients: u64 },
}

pub fn file_size(slots: u32, clients: u32) -> usize {
    8 * (HEADER_WORDS + slots as usize * SLOT_WORDS + clients as usize * CLIENT_WORDS)
}

impl Ledger {
    /// A new, empty ledger on the heap.
    pub fn on_heap(slots: u32, clients: u32) -> Ledger {
        let words = file_size(slots, clients) / 8;
        let l = Ledger {
            backing: Backing::Heap((0..words).map(|_| AtomicU64::new(0)).collect()),
            slots,
            clients,
        };
        l.init(1, 0);
        l
    }

    /// Format a zeroed, exclusively owned mapping as a new ledger.
    pub fn create(
        map: memmap2::MmapMut,
        slots: u32,
        clients: u32,
        floor: u64,
        epoch: u64,
    ) -> Ledger {
        assert_eq!(map.len(), file_size(slots, clients));
        let l = Ledger {
            backing: Backing::File(map),
            slots,
            clients,
        };
        l.init(floor, epoch);
        l
    }

    fn init(&self, floor: u64, epoch: u64) {
        for (i, v) in [
            (H_VERSION, LEDGER_VERSION),
            (H_SLOTS, self.slots as u64),
            (H_CLIENTS, self.clients as u64),
            (H_EPOCH, epoch),
            (H_FLOOR, floor.max(1)),
        ] {
            self.word(i).store(v, Ordering::Relaxed);
        }
        // Magic last: a ledger without it is not adopted.
        self.word(H_MAGIC).store(LEDGER_MAGIC, Ordering::Release);
    }

    /// Adopt a mapped ledger, checking that it is one and matches the
    /// table's geometry.
    pub fn adopt(
        map: memmap2::MmapMut,
        slots: u32,
        clients: u32,
    ) -> Result<Ledger, (LedgerError, memmap2::MmapMut)> {
        let expected = file_size(slots, clients);
        if map.len() < 8 * HEADER_WORDS {
            return Err((
                LedgerError::Size {
                    found: map.len(),
                    expected,
                },
                map,
            ));
        }
        let l = Ledger {
            backing: Backing::File(map),
            slots,
            clients,
        };
        let into_map = |l: Ledger| match l.backing {
            Backing::File(m) => m,
            Backing::Heap(_) => unreachable!("adopted from a file"),
        };
        if l.word(H_MAGIC).load(Ordering::Acquire) != LEDGER_MAGIC
            || l.word(H_VERSION).load(Ordering::Relaxed) != LEDGER_VERSION
        {
            return Err((LedgerError::Foreign, into_map(l)));
        }
        let (s, c) = (
            l.word(H_SLOTS).load(Ordering::Relaxed),
            l.word(H_CLIENTS).load(Ordering::Relaxed),
        );
        if s != slots as u64 || c != clients as u64 {
            return Err((
                LedgerError::Geometry {
                    slots: s,
                    clients: c,
                },
                into_map(l),
            ));
        }
        let found = match &l.backing {
            Backing::File(m) => m.len(),
            Backing::Heap(_) => expected,
        };
        if found != expected {
            return Err((LedgerError::Size { found, expected }, into_map(l)));
        }
        Ok(l)
    }

    /// A copy on the heap (the explorer's branch points).
    pub fn clone_to_heap(&self) -> Ledger {
        let words = file_size(self.slots, self.clients) / 8;
        Ledger {
            backing: Backing::Heap(
                (0..words)
                    .map(|i| AtomicU64::new(self.word(i).load(Ordering::Relaxed)))
                    .collect(),
            ),
            slots: self.slots,
            clients: self.clients,
        }
    }

    /// The raw words, for hashing explored states.
    pub fn snapshot(&self) -> Vec<u64> {
        (0..file_size(self.slots, self.clients) / 8)
            .map(|i| self.word(i).load(Ordering::Relaxed))
            .collect()
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        match &self.backing {
            Backing::Heap(words) => &words[i],
            Backing::File(map) => {
                assert!(i < map.len() / 8, "ledger word {i} out of range");
                let ptr = map.as_ptr().wrapping_add(i * 8) as *const AtomicU64;
                // SAFETY: `i * 8 + 8 <= map.len()` (asserted), the mapping is
                // page-aligned so every 8-byte offset is aligned for an
                // AtomicU64, it lives as long as `self`, and only this
                // process maps the file (mode 0600, broker's uid), which
                // reaches it only through atomics.
                unsafe { &*ptr }
            }
        }
    }

    fn slot_word(&self, s: u32, i: usize) -> &AtomicU64 {
        assert!(s < self.slots);
        self.word(HEADER_WORDS + s as usize * SLOT_WORDS + i)
    }

    fn client_word(&self, c: u32, i: usize) -> &AtomicU64 {
        assert!(c < self.clients);
        self.word(HEADER_WORDS + self.slots as usize * SLOT_WORDS + c as usize * CLIENT_WORDS + i)
    }

    // ---- header ---------------------------------------------------------------------

    pub fn epoch(&self) -> u64 {
        self.word(H_EPOCH).load(Ordering::Relaxed)
    }
    pub fn set_epoch(&self, epoch: u64) {
        self.word(H_EPOCH).store(epoch, Ordering::Relaxed);
    }
    /// Every token issued so far is below this.
    pub fn floor(&self) -> u64 {
        self.word(H_FLOOR).load(Ordering::Relaxed)
    }
    /// Raise the floor to at least `at_least` (never lowers it).
    pub fn raise_floor(&self, at_least: u64) -> u64 {
        self.word(H_FLOOR)
            .fetch_max(at_least, Ordering::Relaxed)
            .max(at_least)
    }

    // ---- slots ----------------------------------------------------------------------

    /// The key slot `s` holds, and its token base.
    pub fn slot(&self, s: u32) -> Option<(Vec<u8>, u64)> {
        let len = (self.slot_word(s, 0).load(Ordering::Relaxed) as usize).checked_sub(1)?;
        if len > MAX_KEY_LEN {
            return None;
        }
        let mut buf = [0u8; MAX_KEY_LEN];
        for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(
                &self
                    .slot_word(s, 2 + i)
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            );
        }
        Some((
            buf[..len].to_vec(),
            self.slot_word(s, 1).load(Ordering::Relaxed),
        ))
    }

    /// Record that slot `s` holds `key` with token base `base`.
    pub fn set_slot(&self, s: u32, key: &[u8], base: u64) {
        debug_assert!(key.len() <= MAX_KEY_LEN);
        let mut buf = [0u8; MAX_KEY_LEN];
        buf[..key.len()].copy_from_slice(key);
        self.slot_word(s, 0).store(0, Ordering::Relaxed);
        for (i, chunk) in buf.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.slot_word(s, 2 + i).store(v, Ordering::Relaxed);
        }
        self.slot_word(s, 1).store(base, Ordering::Relaxed);
        self.slot_word(s, 0)
            .store(key.len() as u64 + 1, Ordering::Relaxed);
    }

    pub fn set_base(&self, s: u32, base: u64) {
        self.slot_word(s, 1).store(base, Ordering::Relaxed);
    }

    pub fn clear_slot(&self, s: u32) {
        self.slot_word(s, 0).store(0, Ordering::Relaxed);
    }

    // ---- clients --------------------------------------------------------------------

    pub fn client(&self, c: u32) -> Option<ClientEntry> {
        let pid = (self.client_word(c, 0).load(Ordering::Relaxed)).checked_sub(1)? as u32;
        Some(ClientEntry {
            pid,
            start_time: self.client_word(c, 1).load(Ordering::Relaxed),
            uid: self.client_word(c, 2).load(Ordering::Relaxed) as u32,
        })
    }

    /// Record a new client in entry `c`, with no holds.
    pub fn set_client(&self, c: u32, e: ClientEntry) {
        self.client_word(c, 0).store(0, Ordering::Relaxed);
        for h in 0..LEDGER_HOLDS {
            self.client_word(c, 4 + 3 * h).store(0, Ordering::Relaxed);
        }
        self.client_word(c, 1)
            .store(e.start_time, Ordering::Relaxed);
        self.client_word(c, 2)
            .store(e.uid as u64, Ordering::Relaxed);
        self.client_word(c, 0)
            .store(e.pid as u64 + 1, Ordering::Relaxed);
    }

    /// Erase client `c` (its holds must be erased first).
    pub fn clear_client(&self, c: u32) {
        self.client_word(c, 0).store(0, Ordering::Relaxed);
    }

    /// Client `c`'s holds.
    pub fn holds(&self, c: u32) -> impl Iterator<Item = (usize, Hold)> + '_ {
        (0..LEDGER_HOLDS).filter_map(move |h| {
            let packed = self.client_word(c, 4 + 3 * h).load(Ordering::Relaxed);
            let token = self.client_word(c, 5 + 3 * h).load(Ordering::Relaxed);
            let request = self.client_word(c, 6 + 3 * h).load(Ordering::Relaxed);
            Hold::unpack(packed, token, request).map(|hold| (h, hold))
        })
    }

    /// Record a hold of client `c`; `false` if its list is full.
    pub fn add_hold(&self, c: u32, hold: Hold) -> bool {
        let Some(h) = (0..LEDGER_HOLDS)
            .find(|&h| self.client_word(c, 4 + 3 * h).load(Ordering::Relaxed) == 0)
        else {
            return false;
        };
        self.client_word(c, 5 + 3 * h)
            .store(hold.token, Ordering::Relaxed);
        self.client_word(c, 6 + 3 * h)
            .store(hold.request, Ordering::Relaxed);
        self.client_word(c, 4 + 3 * h)
            .store(hold.pack(), Ordering::Relaxed);
        true
    }

    /// Whether client `c` has room for one more hold.
    pub fn has_room(&self, c: u32) -> bool {
        (0..LEDGER_HOLDS).any(|h| self.client_word(c, 4 + 3 * h).load(Ordering::Relaxed) == 0)
    }

    /// Client `c`'s fast-path hold on `slot` with `token` became an
    /// ordinary one (the broker took its slot over while the word still
    /// named it): clear its `on_fast_path` flag. One store, so a broker
    /// killed around it leaves either record, and both are right for the
    /// word it left (see `LockManager::take_over`).
    pub fn confirm_hold(&self, c: u32, slot: u32, token: u64) -> bool {
        let Some((h, hold)) = self
            .holds(c)
            .find(|(_, hold)| hold.slot == slot && hold.token == token)
        else {
            return false;
        };
        let confirmed = Hold {
            on_fast_path: false,
            ..hold
        };
        self.client_word(c, 4 + 3 * h)
            .store(confirmed.pack(), Ordering::Relaxed);
        true
    }

    /// Erase client `c`'s hold on `slot` (the one with `token`, or any if
    /// `token` is `None`). Returns the erased hold.
    pub fn remove_hold(&self, c: u32, slot: u32, token: Option<u64>) -> Option<Hold> {
        let (h, hold) = self
            .holds(c)
            .find(|(_, hold)| hold.slot == slot && token.is_none_or(|t| t == hold.token))?;
        self.client_word(c, 4 + 3 * h).store(0, Ordering::Relaxed);
        Some(hold)
    }
}

/// The ledger's file name in the runtime dir.
pub const LEDGER_FILE: &str = "ledger";

/// Open `<dir>/ledger` for a table of this geometry: adopt it if it is
/// valid (returns `true`), else set it aside and create a new one whose
/// floor and epoch continue the old one's when those can still be read, so
/// tokens keep rising even then. The file is 0600 and never followed through
/// a symlink.
pub fn open(dir: &std::path::Path, slots: u32, clients: u32) -> anyhow::Result<(Ledger, bool)> {
    use anyhow::Context;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LEDGER_FILE);
    let mut carried = (1u64, 0u64);
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(file) => {
            // SAFETY: a regular file only this broker maps (0600, our uid);
            // every access goes through `Ledger::word`'s atomics.
            let map = unsafe { memmap2::MmapMut::map_mut(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            match Ledger::adopt(map, slots, clients) {
                Ok(l) => return Ok((l, true)),
                Err((why, map)) => {
                    if map.len() >= 8 * HEADER_WORDS
                        && u64::from_ne_bytes(map[..8].try_into().expect("8 bytes")) == LEDGER_MAGIC
                    {
                        let word = |i: usize| {
                            u64::from_ne_bytes(map[8 * i..8 * i + 8].try_into().expect("8 bytes"))
                        };
                        carried = (word(H_FLOOR).max(1), word(H_EPOCH));
                    }
                    tracing::warn!(error = %why, "the ledger does not match the table: starting a new one (held locks are not adopted)");
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot open {} (a symlink is refused)", path.display()));
        }
    }
    let tmp = dir.join(format!("{LEDGER_FILE}.new"));
    let _ = std::fs::remove_file(&tmp);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.set_len(file_size(slots, clients) as u64)
        .with_context(|| format!("cannot size {} (is the runtime dir full?)", tmp.display()))?;
    // SAFETY: a fresh file only this process has open; accessed through atomics.
    let map = unsafe { memmap2::MmapMut::map_mut(&file) }
        .with_context(|| format!("cannot map {}", tmp.display()))?;
    let ledger = Ledger::create(map, slots, clients, carried.0, carried.1);
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    Ok((ledger, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_holds_and_clients_round_trip() {
        let l = Ledger::on_heap(4, 3);
        assert_eq!(l.slot(2), None);
        l.set_slot(2, b"orders:42", 77);
        assert_eq!(l.slot(2), Some((b"orders:42".to_vec(), 77)));
        let long = [b'x'; MAX_KEY_LEN];
        l.set_slot(3, &long, 1);
        assert_eq!(l.slot(3).unwrap().0, long.to_vec());
        l.set_client(
            1,
            ClientEntry {
                pid: 9,
                start_time: 5,
                uid: 1000,
            },
        );
        let hold = Hold {
            slot: 2,
            shared: true,
            token: u64::MAX,
            request: 4,
            owner_died: true,
            on_fast_path: true,
        };
        assert!(l.add_hold(1, hold));
        assert_eq!(l.holds(1).map(|(_, h)| h).collect::<Vec<_>>(), vec![hold]);
        assert!(!l.confirm_hold(1, 2, 3));
        assert!(l.confirm_hold(1, 2, u64::MAX));
        let hold = Hold {
            on_fast_path: false,
            ..hold
        };
        assert_eq!(l.holds(1).map(|(_, h)| h).collect::<Vec<_>>(), vec![hold]);
        assert_eq!(l.remove_hold(1, 2, Some(3)), None);
        assert_eq!(l.remove_hold(1, 2, Some(u64::MAX)), Some(hold));
        assert_eq!(l.holds(1).count(), 0);
        assert_eq!(l.raise_floor(10), 10);
        assert_eq!(l.raise_floor(5), 10);
    }

    #[test]
    fn a_full_hold_list_refuses_the_next_hold() {
        let l = Ledger::on_heap(1, 1);
        l.set_client(
            0,
            ClientEntry {
                pid: 1,
                start_time: 1,
                uid: 0,
            },
        );
        let hold = Hold {
            slot: 0,
            shared: true,
            token: 1,
            request: 1,
            owner_died: false,
            on_fast_path: false,
        };
        for _ in 0..LEDGER_HOLDS {
            assert!(l.add_hold(0, hold));
        }
        assert!(!l.has_room(0));
        assert!(!l.add_hold(0, hold));
    }
}
