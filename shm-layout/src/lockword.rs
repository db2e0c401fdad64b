//! The lock word: one `u64` per slot, the only word a client ever writes in a
//! slot, and the state machine of the fast path.
//!
//! ```text
//!  63        48 47   43  42  41  40 39            24 23             0
//! +------------+-------+---+---+---+----------------+----------------+
//! | generation | rsvd  | D | P | X |    holders     |    counter     |
//! +------------+-------+---+---+---+----------------+----------------+
//!    16 bits     5 bits  1   1   1      16 bits          24 bits
//! ```
//!
//! - `counter`: grants since the slot's token base was set. The fencing token of
//!   a grant is `slot.token_base + counter` after the grant: every grant (fast or
//!   broker) increments it, so tokens of one key never go backwards.
//! - `holders`: with `X`, the holding client record's index + 1; without `X`,
//!   the number of shared holders (broker-managed slots only).
//! - `X` (EXCLUSIVE), `P` (PREPARED), `D` (OWNER_DIED: the previous holder died
//!   holding the lock; the next grant reports it and clears the bit).
//! - `rsvd`: always 0. A word with a reserved bit set was not written by forelock.
//! - `generation`: bumped by the broker every time the slot's key changes, so a
//!   client that looked the key up before the change fails its CAS (the word is
//!   the seqlock of the key bytes).
//!
//! # Truth table
//!
//! | P | X | holders | meaning | who may write the word |
//! |---|---|---------|---------|------------------------|
//! | 1 | 0 | 0       | prepared and free | any client: CAS to `P X owner+1 counter+1` |
//! | 1 | 1 | o + 1   | held exclusive by client record `o`, granted on the fast path | holder: CAS back to free; broker: take over (clear `P`) |
//! | 1 | 0 | n > 0   | invalid (shared grants never use the fast path) | broker only: repairs it |
//! | 1 | 1 | 0       | invalid | broker only: repairs it |
//! | 0 | any | any   | broker-managed: unprepared, contended (queue in the broker), or held through the broker; `X`/`holders` mirror the broker's state for observers and recovery | broker only |
//!
//! A client CASes only a word with `P` set, reserved bits clear, and the shape of
//! the first two rows; anything else sends it to the broker. So a client never
//! has to understand a word it did not expect: the broker owns every other state.
//!
//! Shared (read) locks are always granted by the broker: the word cannot say
//! *who* the shared holders are, and the broker must know that to release the
//! locks of a client that dies.

use crate::sync::{AtomicU64, Ordering};

/// Bits 0..24: grants since the slot's token base.
pub const COUNTER_MASK: u64 = (1 << 24) - 1;
/// Bits 24..40: exclusive owner index + 1, or shared holder count.
pub const HOLDERS_SHIFT: u32 = 24;
pub const HOLDERS_MASK: u64 = 0xFFFF << HOLDERS_SHIFT;
/// Bit 40: held exclusive.
pub const EXCLUSIVE: u64 = 1 << 40;
/// Bit 41: prepared: clients may take the lock with one CAS.
pub const PREPARED: u64 = 1 << 41;
/// Bit 42: the previous holder died holding the lock.
pub const OWNER_DIED: u64 = 1 << 42;
/// Bits 43..48: reserved, always zero.
pub const RESERVED_MASK: u64 = 0x1F << 43;
/// Bits 48..64: key generation.
pub const GENERATION_SHIFT: u32 = 48;
pub const GENERATION_MASK: u64 = 0xFFFF << GENERATION_SHIFT;

const _: () = assert!(
    COUNTER_MASK & HOLDERS_MASK == 0
        && HOLDERS_MASK & (EXCLUSIVE | PREPARED | OWNER_DIED | RESERVED_MASK | GENERATION_MASK)
            == 0
        && (COUNTER_MASK
            | HOLDERS_MASK
            | EXCLUSIVE
            | PREPARED
            | OWNER_DIED
            | RESERVED_MASK
            | GENERATION_MASK)
            == u64::MAX,
    "the lock word's fields must tile its 64 bits exactly"
);

/// Largest client record index that fits the holders field (index + 1 <= 0xFFFF).
pub const MAX_OWNER_INDEX: u32 = 0xFFFE;

/// A lock word value, with named accessors. Plain data: no atomics here.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Word(pub u64);

impl Word {
    pub const fn counter(self) -> u32 {
        (self.0 & COUNTER_MASK) as u32
    }
    pub const fn holders(self) -> u32 {
        ((self.0 & HOLDERS_MASK) >> HOLDERS_SHIFT) as u32
    }
    pub const fn generation(self) -> u16 {
        (self.0 >> GENERATION_SHIFT) as u16
    }
    pub const fn is_exclusive(self) -> bool {
        self.0 & EXCLUSIVE != 0
    }
    pub const fn is_prepared(self) -> bool {
        self.0 & PREPARED != 0
    }
    pub const fn owner_died(self) -> bool {
        self.0 & OWNER_DIED != 0
    }
    /// The exclusive owner's client record index, if the word says it is held
    /// exclusive by one.
    pub const fn exclusive_owner(self) -> Option<u32> {
        if self.is_exclusive() && self.holders() > 0 {
            Some(self.holders() - 1)
        } else {
            None
        }
    }
    /// Shared holders, if the word says it is held shared.
    pub const fn shared_holders(self) -> u32 {
        if self.is_exclusive() {
            0
        } else {
            self.holders()
        }
    }
    pub const fn is_free(self) -> bool {
        self.holders() == 0 && !self.is_exclusive()
    }
    /// Build a word from its fields. `holders` is truncated to 16 bits and
    /// `counter` to 24: callers check their ranges first.
    pub const fn new(generation: u16, flags: u64, holders: u32, counter: u32) -> Word {
        Word(
            ((generation as u64) << GENERATION_SHIFT)
                | (flags & (EXCLUSIVE | PREPARED | OWNER_DIED))
                | (((holders as u64) << HOLDERS_SHIFT) & HOLDERS_MASK)
                | (counter as u64 & COUNTER_MASK),
        )
    }
    pub const fn with_holders(self, exclusive: bool, holders: u32) -> Word {
        let flags = self.0 & (PREPARED | OWNER_DIED) | if exclusive { EXCLUSIVE } else { 0 };
        Word::new(self.generation(), flags, holders, self.counter())
    }
}

impl core::fmt::Debug for Word {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Word(gen={} {}{}{} holders={} counter={}{})",
            self.generation(),
            if self.is_prepared() { "P" } else { "-" },
            if self.is_exclusive() { "X" } else { "-" },
            if self.owner_died() { "D" } else { "-" },
            self.holders(),
            self.counter(),
            if self.0 & RESERVED_MASK != 0 {
                " RESERVED-BITS-SET"
            } else {
                ""
            }
        )
    }
}

/// Why the fast path declined; every reason means "ask the broker".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decline {
    /// The slot is not prepared (broker-managed).
    NotPrepared,
    /// Someone holds it: the broker queues us.
    Held,
    /// The counter is exhausted: the broker rebases the token.
    CounterExhausted,
    /// The word has a shape forelock never writes (scribbled memory).
    Malformed,
    /// The slot was re-keyed since we looked the key up.
    GenerationChanged,
}

/// What a successful fast-path acquire returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastGrant {
    /// The word as we wrote it: the release CAS expects exactly this value.
    pub held: Word,
    /// The previous holder died holding the lock (bit cleared by this grant).
    pub owner_died: bool,
}

/// The pure part of a fast-path acquire: from a prepared, free word, the held
/// word for `owner`. Checked before every CAS.
pub fn acquire_exclusive_transition(
    current: Word,
    expected_generation: u16,
    owner: u32,
) -> Result<FastGrant, Decline> {
    if current.0 & RESERVED_MASK != 0 {
        return Err(Decline::Malformed);
    }
    if current.generation() != expected_generation {
        return Err(Decline::GenerationChanged);
    }
    if !current.is_prepared() {
        return Err(Decline::NotPrepared);
    }
    if !current.is_free() {
        return if current.exclusive_owner().is_some() {
            Err(Decline::Held)
        } else {
            Err(Decline::Malformed)
        };
    }
    if current.counter() as u64 == COUNTER_MASK {
        return Err(Decline::CounterExhausted);
    }
    debug_assert!(owner <= MAX_OWNER_INDEX);
    let held = Word::new(
        current.generation(),
        PREPARED | EXCLUSIVE,
        owner + 1,
        current.counter() + 1,
    );
    Ok(FastGrant {
        held,
        owner_died: current.owner_died(),
    })
}

/// The word a fast-path holder writes back on release: free, prepared, same
/// counter and generation, no OWNER_DIED (the grant consumed it).
pub const fn released(held: Word) -> Word {
    Word::new(held.generation(), PREPARED, 0, held.counter())
}

// ---- the broker's transitions -------------------------------------------------
//
// | transition | from | to | how |
// |---|---|---|---|
// | [`take_over`] | any keyed word | same, `P` cleared | `fetch_and`: a fast-path holder's release CAS fails from then on |
// | [`managed`] | `P=0` | `P=0`, holders/`X` mirror the broker's holder, counter as given | store (clients never write a `P=0` word) |
// | [`prepare`] | `P=0`, free | `P=1`, free, same counter, `D` kept | store: the Release publishes the slot to the next fast acquirer |
// | [`release_for_dead_owner`] | `P=1`, held by a dead client | `P=1`, free, `D` set | CAS from the exact held word (a racing scribbler makes it fail: retried, bounded) |
// | [`rekey`] | `P=0`, or `P=1` free | next generation, `P=0`, free, counter 0 | CAS for a prepared word (a client may take it meanwhile: then the slot is kept), store for a managed one |
// | [`prepare_held_for`] | `P=0`, free | `P=1`, `X`, owner + 1, counter + 1, `D` cleared (reported) | store: the word a client's own fast-path grant writes, so the holder releases with [`try_release_exclusive`] (issue 12: one round trip for an unprepared key) |
//
// The client's two transitions ([`try_acquire_exclusive`], [`try_release_exclusive`])
// require `P=1`, so after [`take_over`] the word is the broker's alone, and
// the only transitions that race with a client are `take_over`,
// `release_for_dead_owner` and `rekey` of a prepared word: all three are one
// atomic read-modify-write, checked against the client's under loom below.

/// The word after the broker takes a slot over: `P` cleared, all else kept.
pub const fn take_over(w: Word) -> Word {
    Word(w.0 & !PREPARED)
}

/// A broker-managed word (`P=0`) that mirrors the broker's holder for
/// observers: `exclusive` with `holders` = owner + 1, or `holders` shared
/// holders, or free. Keeps the generation and the owner-died bit.
pub const fn managed(w: Word, exclusive: bool, holders: u32, counter: u32) -> Word {
    let flags = (w.0 & OWNER_DIED) | if exclusive { EXCLUSIVE } else { 0 };
    Word::new(w.generation(), flags, holders, counter)
}

/// A managed, free word given back to the fast path: prepared, free, same
/// counter and generation, owner-died kept for the next acquirer.
pub const fn prepare(w: Word) -> Word {
    Word::new(
        w.generation(),
        PREPARED | (w.0 & OWNER_DIED),
        0,
        w.counter(),
    )
}

/// A prepared word held by a client that died, released: free, prepared,
/// owner-died set so the next holder is told.
pub const fn release_for_dead_owner(held: Word) -> Word {
    Word(released(held).0 | OWNER_DIED)
}

/// A slot's word when its key is removed or changed: the next generation
/// (so a client that looked the old key up fails its CAS), managed, free,
/// counter 0 (the token base moves to the floor with the new key).
pub const fn rekey(w: Word) -> Word {
    Word::new(w.generation().wrapping_add(1), 0, 0, 0)
}

/// The broker grants an unprepared, uncontended key so that its holder can
/// release it on the fast path: from a managed (`P=0`), free, well-formed
/// word, the word a client's own fast-path grant would have written for
/// `owner` (`P`, `X`, `owner + 1`, counter + 1, `D` cleared and reported).
/// The broker stores it (clients never write a `P=0` word, so nothing races
/// with the store) and answers the client with it; the client's release is
/// then [`try_release_exclusive`] from exactly this word. A waiter that
/// arrives meanwhile makes the broker [`take_over`] the slot, which fails the
/// holder's CAS and sends its release through the broker.
///
/// Declines (the broker then grants the ordinary managed way): `Malformed`
/// for reserved bits, `NotPrepared` is never returned, `Held` for a word with
/// holders, `CounterExhausted` when counter + 1 would not fit.
pub fn prepare_held_for(current: Word, owner: u32) -> Result<FastGrant, Decline> {
    if current.0 & RESERVED_MASK != 0 {
        return Err(Decline::Malformed);
    }
    if current.is_prepared() || !current.is_free() {
        return Err(Decline::Held);
    }
    if current.counter() as u64 == COUNTER_MASK {
        return Err(Decline::CounterExhausted);
    }
    debug_assert!(owner <= MAX_OWNER_INDEX);
    let held = Word::new(
        current.generation(),
        PREPARED | EXCLUSIVE,
        owner + 1,
        current.counter() + 1,
    );
    Ok(FastGrant {
        held,
        owner_died: current.owner_died(),
    })
}

/// A 64-bit atomic cell the transitions can run on: the real `AtomicU64` in a
/// shared mapping, or loom's on the heap.
pub trait WordCell {
    fn load_word(&self, order: Ordering) -> Word;
    fn compare_exchange_word(
        &self,
        current: Word,
        new: Word,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Word, Word>;
}

impl WordCell for AtomicU64 {
    #[inline]
    fn load_word(&self, order: Ordering) -> Word {
        Word(self.load(order))
    }
    #[inline]
    fn compare_exchange_word(
        &self,
        current: Word,
        new: Word,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Word, Word> {
        self.compare_exchange(current.0, new.0, success, failure)
            .map(Word)
            .map_err(Word)
    }
}

/// Fast-path acquire: one load and one CAS.
///
/// SYNC POINT: the CAS's Acquire pairs with the Release of the previous holder's
/// [`try_release_exclusive`] (so the previous critical section happens-before
/// ours) and with the broker's Release store that published the prepared word
/// (so the slot's key and token base are visible). The failure ordering is
/// Relaxed: on failure we read nothing that the word guards.
#[inline]
pub fn try_acquire_exclusive<C: WordCell + ?Sized>(
    cell: &C,
    expected_generation: u16,
    owner: u32,
) -> Result<FastGrant, Decline> {
    let current = cell.load_word(Ordering::Relaxed);
    let grant = acquire_exclusive_transition(current, expected_generation, owner)?;
    match cell.compare_exchange_word(current, grant.held, Ordering::Acquire, Ordering::Relaxed) {
        Ok(_) => Ok(grant),
        // Someone else moved the word between our load and CAS: report why
        // from the value we lost to, without retrying (bounded: one CAS).
        Err(now) => Err(
            acquire_exclusive_transition(now, expected_generation, owner)
                .err()
                .unwrap_or(Decline::Held),
        ),
    }
}

/// Fast-path release: one CAS from exactly the word we wrote at acquire.
/// Returns false when the broker took the slot over meanwhile (the release
/// must then go through the broker, which holds the queue).
///
/// SYNC POINT: Release pairs with the Acquire of the next fast-path
/// [`try_acquire_exclusive`] and of the broker's takeover CAS. Failure is
/// Relaxed: the caller then talks to the broker, which re-reads the word.
#[inline]
pub fn try_release_exclusive<C: WordCell + ?Sized>(cell: &C, held: Word) -> bool {
    cell.compare_exchange_word(held, released(held), Ordering::Release, Ordering::Relaxed)
        .is_ok()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn prepared(counter: u32) -> Word {
        Word::new(7, PREPARED, 0, counter)
    }

    #[test]
    fn a_prepared_free_word_is_granted_with_the_counter_bumped() {
        let g = acquire_exclusive_transition(prepared(5), 7, 3).unwrap();
        assert_eq!(g.held.exclusive_owner(), Some(3));
        assert_eq!(g.held.counter(), 6);
        assert!(g.held.is_prepared());
        assert!(!g.owner_died);
    }

    #[test]
    fn each_row_of_the_truth_table_declines_as_documented() {
        let held = Word::new(7, PREPARED | EXCLUSIVE, 2, 1);
        assert_eq!(acquire_exclusive_transition(held, 7, 3), Err(Decline::Held));
        let shared_on_fast_path = Word::new(7, PREPARED, 2, 1);
        assert_eq!(
            acquire_exclusive_transition(shared_on_fast_path, 7, 3),
            Err(Decline::Malformed)
        );
        let exclusive_nobody = Word::new(7, PREPARED | EXCLUSIVE, 0, 1);
        assert_eq!(
            acquire_exclusive_transition(exclusive_nobody, 7, 3),
            Err(Decline::Malformed)
        );
        let managed = Word::new(7, 0, 0, 1);
        assert_eq!(
            acquire_exclusive_transition(managed, 7, 3),
            Err(Decline::NotPrepared)
        );
        assert_eq!(
            acquire_exclusive_transition(prepared(1), 8, 3),
            Err(Decline::GenerationChanged)
        );
        let reserved = Word(prepared(1).0 | (1 << 44));
        assert_eq!(
            acquire_exclusive_transition(reserved, 7, 3),
            Err(Decline::Malformed)
        );
        assert_eq!(
            acquire_exclusive_transition(prepared(COUNTER_MASK as u32), 7, 3),
            Err(Decline::CounterExhausted)
        );
    }

    #[test]
    fn owner_died_is_reported_once_and_cleared_by_the_grant() {
        let w = Word::new(1, PREPARED | OWNER_DIED, 0, 9);
        let g = acquire_exclusive_transition(w, 1, 0).unwrap();
        assert!(g.owner_died);
        assert!(!g.held.owner_died());
        assert!(!released(g.held).owner_died());
    }

    #[test]
    fn release_restores_a_free_prepared_word_with_the_same_counter() {
        let cell = AtomicU64::new(prepared(41).0);
        let g = try_acquire_exclusive(&cell, 7, 0).unwrap();
        assert!(try_release_exclusive(&cell, g.held));
        assert_eq!(Word(cell.load(Ordering::Relaxed)), prepared(42));
    }

    #[test]
    fn a_broker_grant_for_fast_release_writes_what_a_client_grant_would() {
        // From a managed free word with the owner-died bit: the word a
        // client's own CAS writes on the prepared word, D reported once.
        let managed_free = Word::new(7, OWNER_DIED, 0, 41);
        let by_broker = prepare_held_for(managed_free, 3).unwrap();
        let by_client = acquire_exclusive_transition(prepare(managed_free), 7, 3).unwrap();
        assert_eq!(by_broker, by_client);
        assert_eq!(by_broker.held, Word::new(7, PREPARED | EXCLUSIVE, 4, 42));
        assert!(by_broker.owner_died);
        // The holder's release is the ordinary fast-path release.
        let cell = AtomicU64::new(by_broker.held.0);
        assert!(try_release_exclusive(&cell, by_broker.held));
        assert_eq!(
            Word(cell.load(Ordering::Relaxed)),
            Word::new(7, PREPARED, 0, 42)
        );
    }

    #[test]
    fn a_broker_grant_for_fast_release_declines_every_word_that_is_not_managed_and_free() {
        assert_eq!(
            prepare_held_for(Word::new(7, PREPARED, 0, 1), 3),
            Err(Decline::Held)
        );
        assert_eq!(
            prepare_held_for(Word::new(7, EXCLUSIVE, 2, 1), 3),
            Err(Decline::Held)
        );
        assert_eq!(
            prepare_held_for(Word::new(7, 0, 2, 1), 3),
            Err(Decline::Held)
        );
        assert_eq!(
            prepare_held_for(Word(Word::new(7, 0, 0, 1).0 | (1 << 44)), 3),
            Err(Decline::Malformed)
        );
        assert_eq!(
            prepare_held_for(Word::new(7, 0, 0, COUNTER_MASK as u32), 3),
            Err(Decline::CounterExhausted)
        );
    }

    #[test]
    fn release_fails_once_the_broker_took_the_slot_over() {
        let cell = AtomicU64::new(prepared(0).0);
        let g = try_acquire_exclusive(&cell, 7, 0).unwrap();
        cell.store(g.held.0 & !PREPARED, Ordering::Relaxed);
        assert!(!try_release_exclusive(&cell, g.held));
    }

    proptest::proptest! {
        #[test]
        fn no_word_yields_a_grant_unless_it_is_prepared_and_free(raw in proptest::num::u64::ANY, owner in 0u32..=MAX_OWNER_INDEX) {
            let w = Word(raw);
            if let Ok(g) = acquire_exclusive_transition(w, w.generation(), owner) {
                proptest::prop_assert!(w.is_prepared());
                proptest::prop_assert!(w.is_free());
                proptest::prop_assert_eq!(w.0 & RESERVED_MASK, 0);
                proptest::prop_assert_eq!(g.held.exclusive_owner(), Some(owner));
                proptest::prop_assert_eq!(g.held.counter(), w.counter() + 1);
            }
        }
    }
}

/// Model check of the fast path: `RUSTFLAGS="--cfg loom" cargo test -p
/// forelock-shm-layout --release lockword::loom_tests`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicUsize;

    #[test]
    fn two_clients_never_hold_the_lock_at_once_and_counters_add_up() {
        loom::model(|| {
            let word = Arc::new(AtomicU64::new(Word::new(0, PREPARED, 0, 0).0));
            let inside = Arc::new(AtomicUsize::new(0));
            let handles: Vec<_> = (0..2u32)
                .map(|owner| {
                    let word = word.clone();
                    let inside = inside.clone();
                    loom::thread::spawn(move || {
                        if let Ok(g) = try_acquire_exclusive(&*word, 0, owner) {
                            assert_eq!(inside.fetch_add(1, Ordering::Relaxed), 0);
                            inside.fetch_sub(1, Ordering::Relaxed);
                            assert!(try_release_exclusive(&*word, g.held));
                            1
                        } else {
                            0
                        }
                    })
                })
                .collect();
            let grants: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
            let end = Word(word.load(Ordering::Relaxed));
            assert!(end.is_free());
            assert_eq!(end.counter(), grants);
        });
    }

    #[test]
    fn a_dead_owner_release_from_a_stale_snapshot_never_frees_a_newer_hold() {
        // The client takes, releases and takes again; the broker, believing
        // the owner dead, releases from whatever held word it read. Each hold
        // is freed exactly once: by its holder or by the broker, never both.
        loom::model(|| {
            let word = Arc::new(AtomicU64::new(Word::new(0, PREPARED, 0, 0).0));
            let w2 = word.clone();
            let client = loom::thread::spawn(move || {
                let mut frees = 0;
                let mut holds = 0;
                for _ in 0..2 {
                    if let Ok(g) = try_acquire_exclusive(&*w2, 0, 1) {
                        holds += 1;
                        frees += try_release_exclusive(&*w2, g.held) as u32;
                    }
                }
                (holds, frees)
            });
            let cur = word.load_word(Ordering::Acquire);
            let broker_freed = cur.exclusive_owner() == Some(1)
                && word
                    .compare_exchange_word(
                        cur,
                        release_for_dead_owner(cur),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok();
            let (holds, frees) = client.join().unwrap();
            assert_eq!(holds, frees + broker_freed as u32);
            assert!(Word(word.load(Ordering::Relaxed)).is_free());
        });
    }

    #[test]
    fn a_rekey_never_succeeds_while_a_client_is_inside() {
        loom::model(|| {
            let word = Arc::new(AtomicU64::new(Word::new(0, PREPARED, 0, 0).0));
            let inside = Arc::new(AtomicUsize::new(0));
            let (w2, in2) = (word.clone(), inside.clone());
            let client = loom::thread::spawn(move || {
                if let Ok(g) = try_acquire_exclusive(&*w2, 0, 1) {
                    in2.fetch_add(1, Ordering::SeqCst);
                    in2.fetch_sub(1, Ordering::SeqCst);
                    assert!(try_release_exclusive(&*w2, g.held));
                }
            });
            let cur = word.load_word(Ordering::Acquire);
            if cur.is_free()
                && word
                    .compare_exchange_word(cur, rekey(cur), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                // Re-keyed: nobody is inside, and nobody gets in later (the
                // client's CAS expects the old generation).
                assert_eq!(inside.load(Ordering::SeqCst), 0);
            }
            client.join().unwrap();
        });
    }

    #[test]
    fn a_broker_grant_for_fast_release_excludes_fast_acquirers_and_a_takeover_fails_its_release() {
        // The broker grants client 1 an unprepared key by storing the held
        // prepared word, answers it (the message: `answered`), then takes the
        // slot over for a waiter. Client 1, once answered, releases with its
        // CAS; client 2 tries the fast path. Never two inside; the hold ends
        // exactly once: by client 1's CAS or in the broker's takeover.
        loom::model(|| {
            let word = Arc::new(AtomicU64::new(Word::new(0, 0, 0, 5).0));
            let answered = Arc::new(AtomicUsize::new(0));
            let inside = Arc::new(AtomicUsize::new(0));
            let holder = {
                let (word, answered, inside) = (word.clone(), answered.clone(), inside.clone());
                loom::thread::spawn(move || {
                    // SYNC POINT: Acquire pairs with the broker's Release of
                    // the answer, which follows its Release store of the word.
                    let held = answered.load(Ordering::Acquire);
                    if held == 0 {
                        return None; // not answered yet in this interleaving
                    }
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    Some(try_release_exclusive(&*word, Word(held as u64)))
                })
            };
            let other = {
                let (word, inside) = (word.clone(), inside.clone());
                loom::thread::spawn(move || {
                    if let Ok(g) = try_acquire_exclusive(&*word, 0, 2) {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                        try_release_exclusive(&*word, g.held);
                        true
                    } else {
                        false
                    }
                })
            };
            // The broker: grant, answer, take over.
            let g = prepare_held_for(word.load_word(Ordering::Relaxed), 1).unwrap();
            // SYNC POINT: Release publishes the grant to fast acquirers
            // (pairs with their CAS's Acquire) and precedes the answer.
            word.store(g.held.0, Ordering::Release);
            answered.store(g.held.0 as usize, Ordering::Release);
            let mut cur = word.load_word(Ordering::Acquire);
            loop {
                match word.compare_exchange_word(
                    cur,
                    take_over(cur),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(now) => cur = now,
                }
            }
            let taken_from_holder = cur == g.held;
            let released_by_cas = holder.join().unwrap() == Some(true);
            let other_got_it = other.join().unwrap();
            // Client 2 can only have got the key after client 1's CAS freed it.
            assert!(!other_got_it || released_by_cas);
            // The hold ends once: client 1's CAS, or the takeover found it held.
            assert!(!(taken_from_holder && released_by_cas));
            assert!(taken_from_holder || released_by_cas);
        });
    }

    #[test]
    fn a_broker_takeover_during_a_hold_forces_the_release_through_the_broker() {
        loom::model(|| {
            let word = Arc::new(AtomicU64::new(Word::new(0, PREPARED, 0, 0).0));
            let w2 = word.clone();
            let client = loom::thread::spawn(move || {
                try_acquire_exclusive(&*w2, 0, 1).map(|g| try_release_exclusive(&*w2, g.held))
            });
            // The broker's takeover: clear PREPARED with a CAS, keeping holders.
            let mut cur = Word(word.load(Ordering::Acquire));
            loop {
                match word.compare_exchange_word(
                    cur,
                    take_over(cur),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(now) => cur = now,
                }
            }
            match client.join().unwrap() {
                // Granted and released before the takeover, or granted and then
                // told to release through the broker: both leave no prepared word.
                Ok(_) | Err(_) => assert!(!Word(word.load(Ordering::Relaxed)).is_prepared()),
            }
        });
    }
}
