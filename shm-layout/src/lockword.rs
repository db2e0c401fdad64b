//! The lock word: one `u64` per slot, the only word a client ever writes in a
//! slot, and the state machine of the fast path.
//!
//! ```text
//!  63        48 47 46  45  44  43  42  41  40 39          24 23           0
//! +------------+-----+---+---+---+---+---+---+--------------+--------------+
//! | generation | rsv | H | U | K | D | P | X |   holders    |   counter    |
//! +------------+-----+---+---+---+---+---+---+--------------+--------------+
//!    16 bits    2 bits 1   1   1   1   1   1     16 bits        24 bits
//! ```
//!
//! - `counter`: grants since the slot's token base was set. The fencing token of
//!   a grant is `slot.token_base + counter` after the grant: every grant (fast or
//!   broker) increments it, so tokens of one key never go backwards.
//! - `holders`: with `X`, the holding client record's index + 1; without `X`,
//!   the number of shared holders (broker-managed slots only).
//! - `X` (EXCLUSIVE), `P` (PREPARED), `D` (OWNER_DIED: the previous holder died
//!   holding the lock; the next grant reports it and clears the bit).
//! - `K` (PARKED): a client may be asleep on the slot's `park` futex: the
//!   release must wake one. Conservative: a client that ever parked sets it
//!   again when it takes the lock, so a stale `K` costs one futex wake, and a
//!   missing one cannot happen while someone sleeps (see [`lock_contended`]).
//! - `U` (HUNGRY): a client has waited past its fairness bound and sleeps on
//!   the slot's `hungry` futex: the next release hands the lock off instead of
//!   freeing it (parking_lot's eventual fairness).
//! - `H` (HANDOFF): the lock was handed off by its last holder: the counter
//!   already counts the grant, `holders` is 0, and only a hungry waiter may
//!   claim it (a running acquirer cannot barge).
//! - `rsv`: always 0. A word with a reserved bit set was not written by forelock.
//! - `generation`: bumped by the broker every time the slot's key changes, so a
//!   client that looked the key up before the change fails its CAS (the word is
//!   the seqlock of the key bytes).
//!
//! # Truth table
//!
//! | P | X | holders | H | meaning | who may write the word |
//! |---|---|---------|---|---------|------------------------|
//! | 1 | 0 | 0       | 0 | prepared and free (`K`/`U` are 0 as forelock writes it; set, they are a harmless hint) | any client: CAS to `P X owner+1 counter+1` ([`acquire_exclusive_transition`]) |
//! | 1 | 1 | o + 1   | 0 | held exclusive by client record `o`, granted on the fast path; `K`: someone may sleep on `park`; `U`: someone hungry sleeps on `hungry` | holder: [`release_transition`], unless the counter is exhausted (then its release goes through the broker, see [`needs_broker_release`]); waiters: add `K`/`U` ([`park_transition`]); broker: take over (clear `P`), release for a dead owner |
//! | 1 | 1 | 0       | 1 | handed off, not yet claimed; the counter counts the coming grant | a hungry waiter: [`claim_transition`]; the releaser: [`cancel_handoff`] when no hungry waiter slept; waiters: add `K`; broker: take over (treated as free: the counted token is skipped) |
//! | 1 | 0 | n > 0   | any | invalid (shared grants never use the fast path) | broker only: repairs it |
//! | 1 | 1 | 0       | 0 | invalid | broker only: repairs it |
//! | 1 | any | any   | 1 | invalid unless the third row | broker only: repairs it |
//! | 0 | any | any   | any | broker-managed: unprepared, contended (queue in the broker), or held through the broker; `X`/`holders` mirror the broker's state for observers and recovery; `K`/`U`/`H` are 0 as the broker writes it, and ignored | broker only |
//!
//! A client CASes only a word with `P` set, reserved bits clear, and the shape of
//! the first three rows; anything else sends it to the broker. So a client never
//! has to understand a word it did not expect: the broker owns every other state.
//!
//! # The contended path
//!
//! A client that finds a prepared key held does not go to the broker: it
//! parks on one of two 32-bit futex words in the slot's hot line
//! (`Slot::park`, `Slot::hungry`), which are sequence numbers, never states.
//! The 64-bit word cannot be a futex (Linux futexes are 32-bit), so the
//! futexes carry no lock state: a waiter reads the sequence *before* it reads
//! or CASes the word, and a releaser bumps it *after* its release CAS, so a
//! release that the waiter did not see changes the sequence and its
//! `FUTEX_WAIT` returns at once (the proof is at [`lock_contended`]).
//!
//! - A release of a `K` word frees it (`K` cleared) and wakes one sleeper on
//!   `park`; a running acquirer may take the lock first (barging), and the
//!   woken one parks again, setting `K` again.
//! - A waiter whose wait passed its bound (default 500 µs) becomes hungry: it
//!   sets `U` and sleeps on `hungry`. A release of a `U` word writes the
//!   `H` word (counter bumped, no holder) and wakes one hungry sleeper, which
//!   claims it: a direct hand-off that no running acquirer can take. If no
//!   hungry client was asleep, the releaser cancels the hand-off back to free.
//! - Every sleep has a timeout (the bound), so a waiter that was woken and
//!   died before it set `K` or claimed an `H` word stalls the others for at
//!   most one bound: the next hungry waiter claims.
//! - A waiter that finds the slot taken over (`P=0`) and held by a broker
//!   grant sleeps on `park` too, without a bit (the word is the broker's),
//!   until the broker prepares the slot again and wakes `park`, or its
//!   bound passes; only then does it ask the broker. Joining the broker's
//!   queue at once kept a hot key off the fast path for as long as the
//!   contention lasted (8 processes on one key at broker speed).
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
/// Bit 43: a client may be asleep on the slot's `park` futex.
pub const PARKED: u64 = 1 << 43;
/// Bit 44: a client that waited past its bound sleeps on the `hungry` futex:
/// the next release hands off.
pub const HUNGRY: u64 = 1 << 44;
/// Bit 45: handed off to a hungry waiter, not yet claimed.
pub const HANDOFF: u64 = 1 << 45;
/// The contended path's bits: meaningful only with `P`.
pub const CONTENDED_MASK: u64 = PARKED | HUNGRY | HANDOFF;
/// Bits 46..48: reserved, always zero.
pub const RESERVED_MASK: u64 = 0x3 << 46;
/// Bits 48..64: key generation.
pub const GENERATION_SHIFT: u32 = 48;
pub const GENERATION_MASK: u64 = 0xFFFF << GENERATION_SHIFT;

const _: () = assert!(
    COUNTER_MASK & HOLDERS_MASK == 0
        && HOLDERS_MASK
            & (EXCLUSIVE
                | PREPARED
                | OWNER_DIED
                | CONTENDED_MASK
                | RESERVED_MASK
                | GENERATION_MASK)
            == 0
        && (EXCLUSIVE | PREPARED | OWNER_DIED) & (CONTENDED_MASK | RESERVED_MASK) == 0
        && CONTENDED_MASK & (RESERVED_MASK | GENERATION_MASK) == 0
        && (COUNTER_MASK
            | HOLDERS_MASK
            | EXCLUSIVE
            | PREPARED
            | OWNER_DIED
            | CONTENDED_MASK
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
    pub const fn is_parked(self) -> bool {
        self.0 & PARKED != 0
    }
    pub const fn is_hungry(self) -> bool {
        self.0 & HUNGRY != 0
    }
    /// The third row of the truth table: prepared, handed off, unclaimed.
    pub const fn is_handoff(self) -> bool {
        self.0 & (PREPARED | EXCLUSIVE | HANDOFF) == PREPARED | EXCLUSIVE | HANDOFF
            && self.holders() == 0
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
                | (flags & (EXCLUSIVE | PREPARED | OWNER_DIED | CONTENDED_MASK))
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
            "Word(gen={} {}{}{}{}{}{} holders={} counter={}{})",
            self.generation(),
            if self.is_prepared() { "P" } else { "-" },
            if self.is_exclusive() { "X" } else { "-" },
            if self.owner_died() { "D" } else { "-" },
            if self.is_parked() { "K" } else { "-" },
            if self.is_hungry() { "U" } else { "-" },
            if self.0 & HANDOFF != 0 { "H" } else { "-" },
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

/// The checks every client grant starts with: a word forelock wrote (no
/// reserved bit), of the key the client looked up (its generation), on the
/// fast path (prepared).
const fn on_fast_path(current: Word, expected_generation: u16) -> Result<(), Decline> {
    if current.0 & RESERVED_MASK != 0 {
        Err(Decline::Malformed)
    } else if current.generation() != expected_generation {
        Err(Decline::GenerationChanged)
    } else if !current.is_prepared() {
        Err(Decline::NotPrepared)
    } else {
        Ok(())
    }
}

/// The pure part of a fast-path acquire: from a prepared, free word, the held
/// word for `owner`. Checked before every CAS.
#[inline]
pub fn acquire_exclusive_transition(
    current: Word,
    expected_generation: u16,
    owner: u32,
) -> Result<FastGrant, Decline> {
    grant_transition(current, expected_generation, owner, 0)
}

/// [`acquire_exclusive_transition`] for a client that has parked: the held
/// word carries `keep` (`PARKED`, and `HUNGRY` for a hungry one), because
/// other clients may still sleep on the slot's futexes and the release must
/// wake them.
pub fn grant_transition(
    current: Word,
    expected_generation: u16,
    owner: u32,
    keep: u64,
) -> Result<FastGrant, Decline> {
    on_fast_path(current, expected_generation)?;
    if current.is_handoff() {
        // Reserved for a hungry waiter: a running acquirer may not barge.
        return Err(Decline::Held);
    }
    if current.0 & HANDOFF != 0 {
        return Err(Decline::Malformed);
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
        PREPARED | EXCLUSIVE | (keep & (PARKED | HUNGRY)),
        owner + 1,
        current.counter() + 1,
    );
    Ok(FastGrant {
        held,
        owner_died: current.owner_died(),
    })
}

/// A hungry waiter claims a handed-off word: held by `owner` with the
/// counter the hand-off already bumped (the grant was counted then), and
/// `PARKED` (others may sleep). `HUNGRY` is not kept: other hungry sleepers
/// set it again when their bounded sleep ends (every bound), so hand-offs,
/// each of which leaves the lock idle for a wake-up, come at most about
/// once per bound per hungry waiter, and running acquirers barge between
/// them (parking_lot's eventual fairness; a conservative `HUNGRY` made
/// every release a hand-off while anyone was hungry: 54.7k ops/s with four
/// processes on one key, against 3.1M for a raw futex).
pub fn claim_transition(
    current: Word,
    expected_generation: u16,
    owner: u32,
) -> Result<FastGrant, Decline> {
    on_fast_path(current, expected_generation)?;
    if !current.is_handoff() {
        return Err(Decline::Held);
    }
    debug_assert!(owner <= MAX_OWNER_INDEX);
    Ok(FastGrant {
        held: Word::new(
            current.generation(),
            PREPARED | EXCLUSIVE | PARKED,
            owner + 1,
            current.counter(),
        ),
        // A hand-off comes from a live holder's release: nobody died.
        owner_died: false,
    })
}

/// A waiter about to sleep: the held (or handed-off) word with `PARKED`, and
/// `HUNGRY` for a hungry waiter, so that the release wakes it. `Ok(None)`:
/// the bits are already set, nothing to write. `Err`: the word is not held
/// any more (or not prepared): try again from the top.
pub fn park_transition(current: Word, hungry: bool) -> Result<Option<Word>, Decline> {
    if current.0 & RESERVED_MASK != 0 {
        return Err(Decline::Malformed);
    }
    if !current.is_prepared() {
        return Err(Decline::NotPrepared);
    }
    let add = if hungry && !current.is_handoff() {
        PARKED | HUNGRY
    } else {
        PARKED
    };
    let shape_ok =
        current.is_handoff() || (current.0 & HANDOFF == 0 && current.exclusive_owner().is_some());
    if !shape_ok {
        return Err(Decline::Held);
    }
    if current.0 & add == add {
        Ok(None)
    } else {
        Ok(Some(Word(current.0 | add)))
    }
}

/// What a releaser must do after its release CAS succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterRelease {
    /// Nobody sleeps: done.
    Nothing,
    /// Wake one sleeper on the `park` futex (bump it first).
    WakeParked,
    /// The word is handed off: wake one sleeper on the `hungry` futex (bump
    /// it first); if none was asleep, [`cancel_handoff`].
    WakeHungry,
}

/// The release of a fast-path hold, from the word as it is now (the holder's
/// `held` word plus any `PARKED`/`HUNGRY` waiters added): free, or handed
/// off when a hungry waiter asked for it and the counter has room for the
/// grant it counts. The owner-died bit is never set here (the grant
/// consumed it; [`release_for_dead_owner`] sets it).
pub const fn release_transition(current: Word) -> (Word, AfterRelease) {
    if current.is_hungry() && (current.counter() as u64) < COUNTER_MASK {
        let handed = Word::new(
            current.generation(),
            PREPARED | EXCLUSIVE | HANDOFF | (current.0 & PARKED),
            0,
            current.counter() + 1,
        );
        (handed, AfterRelease::WakeHungry)
    } else if current.0 & (PARKED | HUNGRY) != 0 {
        (released(current), AfterRelease::WakeParked)
    } else {
        (released(current), AfterRelease::Nothing)
    }
}

/// A hand-off no hungry waiter was asleep to take, given back: free, with
/// the counter as the hand-off left it (the token it counted is skipped:
/// tokens stay strictly increasing). `true` in the second field: `PARKED`
/// was set, wake one sleeper on `park`.
pub const fn cancel_handoff(handed: Word) -> (Word, bool) {
    (
        Word::new(handed.generation(), PREPARED, 0, handed.counter()),
        handed.is_parked(),
    )
}

/// Is `current` still the hold that `held` was granted as? The same word but
/// for the bits waiters add (`PARKED`, `HUNGRY`).
pub const fn same_hold(current: Word, held: Word) -> bool {
    current.0 & !(PARKED | HUNGRY) == held.0 & !(PARKED | HUNGRY)
}

/// A fast-path hold that took the counter's last value is released through
/// the broker, not by CAS. Freed by CAS, its word would say "exhausted"
/// to every contender at once, and each would ask the broker (which must
/// rebase the token): under enough contention the broker's queue then
/// never drained, and the key stayed at broker speed for as long as the
/// contention lasted (8 processes on one hot key, whose 24-bit counter runs
/// out every few seconds). Released through the broker, the word stays
/// held until the broker has rebased the counter and prepared the slot
/// again; the contenders wait on the slot meanwhile, as for any holder.
pub const fn needs_broker_release(held: Word) -> bool {
    held.counter() as u64 == COUNTER_MASK
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
// | [`prepare_held_for`] | `P=0`, free | `P=1`, `X`, owner + 1, counter + 1, `D` cleared (reported) | store: the word a client's own fast-path grant writes, so the holder, recognising it ([`granted_on_fast_path`]), releases with one CAS (issue 12: one round trip for an unprepared key) |
//
// The client's two transitions ([`try_acquire_exclusive`], [`try_release_exclusive`])
// require `P=1`, so after [`take_over`] the word is the broker's alone, and
// the only transitions that race with a client are `take_over`,
// `release_for_dead_owner` and `rekey` of a prepared word: all three are one
// atomic read-modify-write, checked against the client's under loom below.

/// The word after the broker takes a slot over: `P` and the contended
/// path's bits cleared (a managed word has none), all else kept. A
/// handed-off word (`H`) becomes a managed word with `X` and no holder:
/// the broker reads the word it replaced and treats a hand-off as free (the
/// counted token is skipped); the claimer's CAS fails (it needs `P`) and it
/// asks the broker.
pub const fn take_over(w: Word) -> Word {
    Word(w.0 & !(PREPARED | CONTENDED_MASK))
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
    // A managed word never carries the contended path's bits (truth table):
    // one that does was not written by the broker.
    if current.0 & (RESERVED_MASK | CONTENDED_MASK) != 0 {
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

/// The client's half of [`prepare_held_for`]: after the broker answered an
/// exclusive acquire with `token`, is the slot's word (`current`, loaded
/// with Acquire after the answer, `base` the slot's token base read after
/// it) the fast-path hold the broker wrote for `owner`? Then `Some(held)`:
/// the holder releases with [`release_contended`] from `held`, with no
/// message to the broker. `None`: the grant is broker-managed (or the broker
/// has taken the slot over since), and the release goes through the broker.
///
/// The match is exact, so it cannot mistake another hold for ours: `P`
/// (clients never write a `P=0` word to `P=1`), `X` with our index, and
/// `base + counter == token` (tokens of a key are never issued twice). The
/// bits waiters add (`PARKED`, `HUNGRY`) are ignored, as [`same_hold`] does.
pub fn granted_on_fast_path(current: Word, owner: u32, base: u64, token: u64) -> Option<Word> {
    let clean = current.0 & (RESERVED_MASK | HANDOFF) == 0
        && current.is_prepared()
        && current.exclusive_owner() == Some(owner)
        && base.checked_add(current.counter() as u64) == Some(token);
    clean.then_some(Word(current.0 & !(PARKED | HUNGRY)))
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
/// must then go through the broker, which holds the queue), or when the
/// hold used the counter's last value ([`needs_broker_release`]).
///
/// SYNC POINT: Release pairs with the Acquire of the next fast-path
/// [`try_acquire_exclusive`] and of the broker's takeover CAS. Failure is
/// Relaxed: the caller then talks to the broker, which re-reads the word.
#[inline]
pub fn try_release_exclusive<C: WordCell + ?Sized>(cell: &C, held: Word) -> bool {
    !needs_broker_release(held)
        && cell
            .compare_exchange_word(held, released(held), Ordering::Release, Ordering::Relaxed)
            .is_ok()
}

// ---- the contended path, generic over its futexes --------------------------

/// The slot's two futex words (`Slot::park`, `Slot::hungry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// Waiters within their bound.
    Parked,
    /// Waiters past their bound, waiting for a hand-off.
    Hungry,
}

/// What a waiter needs from its surroundings: the futexes (real ones on a
/// shared mapping in the client, a loom model in the tests), its clock and
/// its spin policy. Keeping them behind a trait lets loom check the very
/// code the client runs.
pub trait Parker {
    /// The current value of `queue`'s futex word.
    /// SYNC POINT: Acquire, pairing with the Release bump of
    /// [`Unparker::wake_one`]: a waiter that reads a bumped value also sees
    /// the release CAS that preceded the bump.
    fn sequence(&self, queue: Queue) -> u32;
    /// Sleep on `queue` while its futex word holds `expected`. Returns at a
    /// wake, at once if the value changed, at a timeout or spuriously: the
    /// caller re-reads the word every time.
    fn sleep(&mut self, queue: Queue, expected: u32);
    /// Has this waiter waited past its fairness bound?
    fn hungry(&mut self) -> bool;
    /// A hungry waiter: may it ask for a hand-off now, given the `hungry`
    /// futex sequence (bumped by every hand-off)? The client says yes when
    /// the sequence has not moved for a whole bound (no hand-off to anyone
    /// lately), so a key hands off about once per bound however many
    /// waiters are hungry, and running acquirers barge in between.
    fn may_ask_handoff(&mut self, hungry_sequence: u32) -> bool;
    /// Has this waiter's deadline passed (a lock with a timeout)?
    fn expired(&mut self) -> bool;
    /// Spin once more before the first sleep? (`false`: sleep now.)
    fn spin(&mut self) -> bool;
}

/// What a releaser needs: bump a futex word and wake one sleeper on it.
pub trait Unparker {
    /// Bump `queue`'s futex word (SYNC POINT: Release, pairing with the
    /// Acquire of [`Parker::sequence`]), then wake at most one sleeper on it.
    /// Returns how many woke (0 or 1).
    fn wake_one(&mut self, queue: Queue) -> u32;
}

/// How a contended acquire ended without a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContendedEnd {
    /// The word left the fast path's states: ask the broker.
    Declined(Decline),
    /// The parker's deadline passed.
    Expired,
}

/// Release CAS attempts before the release is left to the broker. Each
/// failure means the word changed under the holder: waiters add `PARKED` and
/// `HUNGRY` once each, so two failures are the most a well-behaved table
/// gives; more means a scribbler, and the broker sorts the slot out.
pub const RELEASE_ATTEMPTS: u32 = 8;

/// The contended acquire of a prepared key: retry the grant, spin a little,
/// then sleep on the slot's futex until the word frees or (once hungry) is
/// handed off. Ends only with a grant, a decline (ask the broker) or the
/// parker's deadline.
///
/// No lost wake-up: the waiter reads the futex sequence (Acquire) *before*
/// it reads the word, and sleeps only after it saw (or CASed) a held word
/// with its bit (`PARKED`, or `HUNGRY` when hungry). A releaser CASes that
/// word to free or handed-off, and bumps the sequence (Release) *after*
/// that CAS. If the waiter's sequence read saw the bump, the release CAS
/// happened before its word read, which then cannot have seen the held word
/// (coherence): contradiction. So its sequence is the pre-bump one, and
/// `FUTEX_WAIT` either sees the bumped value and returns, or was queued
/// before the wake and is woken (or another sleeper is, and that one sets
/// `PARKED` again before it sleeps or takes the lock: the bit is
/// conservative). Checked under loom with untimed sleeps on `park`, where a
/// lost wake-up is a deadlock. Sleeps on `hungry` are bounded by design
/// (a hungry sleeper sets `HUNGRY` again each time its sleep ends, which
/// keeps hand-offs rare), and the model lets them end.
pub fn lock_contended<C: WordCell + ?Sized, P: Parker + ?Sized>(
    cell: &C,
    expected_generation: u16,
    owner: u32,
    parker: &mut P,
) -> Result<FastGrant, ContendedEnd> {
    let mut slept = false;
    // Unbounded by design, like any blocking lock: every turn either sleeps,
    // or follows a change of the word made by another client (progress), or
    // ends; the parker's deadline bounds a lock with a timeout.
    loop {
        let hungry = parker.hungry();
        let asking = hungry && {
            let handoffs = parker.sequence(Queue::Hungry);
            parker.may_ask_handoff(handoffs)
        };
        // A hungry waiter that may not ask yet waits like the others (on
        // `park`, woken by releases, free to barge).
        let queue = if asking { Queue::Hungry } else { Queue::Parked };
        let sequence = parker.sequence(queue);
        // Relaxed: the grant CASes below are the Acquire; this read only
        // picks the transition (and comes after the sequence's Acquire).
        let current = cell.load_word(Ordering::Relaxed);
        let attempt = if current.is_handoff() && hungry {
            claim_transition(current, expected_generation, owner)
        } else {
            // A waiter that slept keeps `PARKED` for the others (it may
            // not be the last sleeper); `HUNGRY` is for the hungry sleepers
            // to set again (see `claim_transition`).
            let keep = if slept { PARKED } else { 0 };
            grant_transition(current, expected_generation, owner, keep)
        };
        match attempt {
            Ok(grant) => {
                // SYNC POINT: Acquire pairs with the Release of the release
                // (or hand-off) CAS that wrote `current`. Failure Relaxed:
                // we start over from the sequence read.
                if cell
                    .compare_exchange_word(
                        current,
                        grant.held,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    return Ok(grant);
                }
                continue;
            }
            Err(Decline::Held) => {}
            Err(Decline::NotPrepared) if !hungry && broker_holds(current) => {
                // The broker took the slot over and a broker grant holds it
                // (a take-over for a queued waiter, a counter rebase). Its
                // queue would keep the key off the fast path for as long as
                // contended clients keep joining it (seen: 8 processes on
                // one key stuck at broker speed for a whole run). So wait,
                // bounded, for the slot to come back to the fast path (the
                // broker wakes `park` when it re-prepares a slot it took
                // over); only a waiter past its bound asks the broker.
                if parker.expired() {
                    return Err(ContendedEnd::Expired);
                }
                parker.sleep(Queue::Parked, sequence);
                slept = true;
                continue;
            }
            Err(other) => return Err(ContendedEnd::Declined(other)),
        }
        if parker.expired() {
            return Err(ContendedEnd::Expired);
        }
        if !slept && parker.spin() {
            continue;
        }
        match park_transition(current, asking) {
            Ok(Some(marked)) => {
                // SYNC POINT: Release orders our sequence read before this
                // write, so the releaser's CAS that reads it (Acquire) and
                // its later bump cannot be what we read. Failure Relaxed:
                // start over.
                if cell
                    .compare_exchange_word(current, marked, Ordering::Release, Ordering::Relaxed)
                    .is_err()
                {
                    continue;
                }
            }
            Ok(None) => {}
            Err(Decline::Held) => continue,
            Err(other) => return Err(ContendedEnd::Declined(other)),
        }
        // A hungry waiter never gets here with a hand-off (it claimed it or
        // lost the claim and started over), so `queue` matches the bit we
        // saw or set: `HUNGRY` for the hungry queue, `PARKED` for the other.
        debug_assert!(!(asking && current.is_handoff()));
        parker.sleep(queue, sequence);
        slept = true;
    }
}

/// A managed word (`P=0`) that says the broker has a holder: well formed,
/// held exclusive or shared (the broker's mirror).
const fn broker_holds(current: Word) -> bool {
    !current.is_prepared() && current.0 & RESERVED_MASK == 0 && !current.is_free()
}

/// The release of a fast-path hold that may have waiters: one CAS from the
/// granted word when nobody came, else from the word with the waiters'
/// bits; then the wake the truth table asks for. `false`: the word is no
/// longer this hold's (the broker took the slot over, or a scribbler wrote
/// it), or the hold took the counter's last value
/// ([`needs_broker_release`]): release through the broker.
pub fn release_contended<C: WordCell + ?Sized, U: Unparker + ?Sized>(
    cell: &C,
    held: Word,
    unparker: &mut U,
) -> bool {
    if needs_broker_release(held) {
        return false;
    }
    let mut current = held;
    let mut attempts = 0;
    let (written, after) = loop {
        if !same_hold(current, held) || !current.is_prepared() {
            return false;
        }
        let (next, after) = release_transition(current);
        // SYNC POINT: Release pairs with the Acquire of the next grant or
        // claim CAS, and of the broker's take-over. Failure Relaxed: the
        // value is only compared with `held` again.
        match cell.compare_exchange_word(current, next, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => break (next, after),
            Err(now) => current = now,
        }
        attempts += 1;
        if attempts >= RELEASE_ATTEMPTS {
            return false;
        }
    };
    match after {
        AfterRelease::Nothing => {}
        AfterRelease::WakeParked => {
            unparker.wake_one(Queue::Parked);
        }
        AfterRelease::WakeHungry => {
            if unparker.wake_one(Queue::Hungry) == 0 {
                take_back_handoff(cell, written, unparker);
            }
        }
    }
    true
}

/// No hungry waiter was asleep for the hand-off: give it back as free,
/// unless someone claimed it meanwhile (a hungry waiter on its way to
/// sleep) or the broker took the slot over. Bounded: the word can only gain
/// `PARKED` (once) before one of those ends the loop.
fn take_back_handoff<C: WordCell + ?Sized, U: Unparker + ?Sized>(
    cell: &C,
    handed: Word,
    unparker: &mut U,
) {
    let mut current = handed;
    for _ in 0..RELEASE_ATTEMPTS {
        if !current.is_handoff()
            || current.generation() != handed.generation()
            || current.counter() != handed.counter()
        {
            return;
        }
        let (free, wake) = cancel_handoff(current);
        // SYNC POINT: Release pairs with the Acquire of the next grant CAS
        // (our critical section is before the hand-off CAS, before this).
        match cell.compare_exchange_word(current, free, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => {
                if wake {
                    unparker.wake_one(Queue::Parked);
                }
                return;
            }
            Err(now) => current = now,
        }
    }
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
        let reserved = Word(prepared(1).0 | (1 << 46));
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

    /// A parker for plain unit tests: each sleep runs `on_sleep` (what
    /// other parties do meanwhile), hungry after `hungry_after` sleeps.
    struct StepParker<'a> {
        sleeps: u32,
        hungry_after: u32,
        on_sleep: &'a dyn Fn(u32),
    }

    impl Parker for StepParker<'_> {
        fn sequence(&self, _: Queue) -> u32 {
            0
        }
        fn sleep(&mut self, _: Queue, _: u32) {
            self.sleeps += 1;
            (self.on_sleep)(self.sleeps);
        }
        fn hungry(&mut self) -> bool {
            self.sleeps >= self.hungry_after
        }
        fn may_ask_handoff(&mut self, _: u32) -> bool {
            true
        }
        fn expired(&mut self) -> bool {
            false
        }
        fn spin(&mut self) -> bool {
            false
        }
    }

    /// Regression (hot-8p stuck at broker speed): a contended waiter that
    /// finds the slot taken over and held by a broker grant waits for the
    /// slot to come back to the fast path instead of joining the broker's
    /// queue; only once past its bound does it ask the broker.
    #[test]
    fn a_waiter_on_a_slot_the_broker_holds_waits_for_the_fast_path_until_its_bound() {
        let word = AtomicU64::new(Word::new(7, EXCLUSIVE, 3, 10).0);
        // The broker's holder releases and the slot is prepared again
        // during the waiter's second sleep.
        let reprepare = |n: u32| {
            if n == 2 {
                word.store(Word::new(7, PREPARED, 0, 11).0, Ordering::Release);
            }
        };
        let mut parker = StepParker {
            sleeps: 0,
            hungry_after: 100,
            on_sleep: &reprepare,
        };
        let g = lock_contended(&word, 7, 1, &mut parker).expect("granted on the fast path");
        assert_eq!(g.held, Word::new(7, PREPARED | EXCLUSIVE | PARKED, 2, 12));
        assert_eq!(parker.sleeps, 2);
        // Past its bound it asks the broker.
        let word = AtomicU64::new(Word::new(7, EXCLUSIVE, 3, 10).0);
        let mut parker = StepParker {
            sleeps: 0,
            hungry_after: 1,
            on_sleep: &|_| {},
        };
        assert_eq!(
            lock_contended(&word, 7, 1, &mut parker),
            Err(ContendedEnd::Declined(Decline::NotPrepared))
        );
        assert_eq!(parker.sleeps, 1);
        // A managed, free word goes to the broker at once (nobody holds it
        // there to hand it back).
        let word = AtomicU64::new(Word::new(7, 0, 0, 10).0);
        let mut parker = StepParker {
            sleeps: 0,
            hungry_after: 100,
            on_sleep: &|_| {},
        };
        assert_eq!(
            lock_contended(&word, 7, 1, &mut parker),
            Err(ContendedEnd::Declined(Decline::NotPrepared))
        );
        assert_eq!(parker.sleeps, 0);
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
    fn a_client_recognises_the_fast_hold_its_broker_grant_wrote_and_nothing_else() {
        let g = prepare_held_for(Word::new(7, 0, 0, 41), 3).unwrap();
        // base 100: the broker answered token 142.
        assert_eq!(granted_on_fast_path(g.held, 3, 100, 142), Some(g.held));
        // Waiters' bits do not change whose hold it is.
        let marked = Word(g.held.0 | PARKED | HUNGRY);
        assert_eq!(granted_on_fast_path(marked, 3, 100, 142), Some(g.held));
        // Another owner, another token, a taken-over (P=0) word, a hand-off,
        // reserved bits: not ours to release by CAS.
        assert_eq!(granted_on_fast_path(g.held, 2, 100, 142), None);
        assert_eq!(granted_on_fast_path(g.held, 3, 100, 141), None);
        assert_eq!(granted_on_fast_path(take_over(g.held), 3, 100, 142), None);
        let handed = Word::new(7, PREPARED | EXCLUSIVE | HANDOFF, 0, 42);
        assert_eq!(granted_on_fast_path(handed, u32::MAX, 100, 142), None);
        assert_eq!(
            granted_on_fast_path(Word(g.held.0 | (1 << 46)), 3, 100, 142),
            None
        );
        assert_eq!(granted_on_fast_path(g.held, 3, u64::MAX, 142), None);
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
            prepare_held_for(Word(Word::new(7, 0, 0, 1).0 | (1 << 46)), 3),
            Err(Decline::Malformed)
        );
        for bit in [PARKED, HUNGRY, HANDOFF] {
            assert_eq!(
                prepare_held_for(Word(Word::new(7, 0, 0, 1).0 | bit), 3),
                Err(Decline::Malformed),
                "a managed word with {bit:#x}"
            );
        }
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

    #[test]
    fn a_waiter_marks_a_held_word_parked_and_a_hungry_one_hungry_too() {
        let held = Word::new(7, PREPARED | EXCLUSIVE, 2, 5);
        let parked = park_transition(held, false).unwrap().unwrap();
        assert!(parked.is_parked());
        assert!(!parked.is_hungry());
        assert_eq!(park_transition(parked, false), Ok(None));
        let hungry = park_transition(parked, true).unwrap().unwrap();
        assert!(hungry.is_parked());
        assert!(hungry.is_hungry());
        assert!(same_hold(hungry, held));
        // A free or managed word is not slept on.
        assert_eq!(park_transition(prepared(5), false), Err(Decline::Held));
        assert_eq!(
            park_transition(Word::new(7, EXCLUSIVE, 2, 5), false),
            Err(Decline::NotPrepared)
        );
    }

    #[test]
    fn a_release_frees_and_wakes_or_hands_off_as_the_waiters_asked() {
        let held = Word::new(7, PREPARED | EXCLUSIVE, 2, 5);
        assert_eq!(
            release_transition(held),
            (prepared(5), AfterRelease::Nothing)
        );
        assert_eq!(
            release_transition(Word(held.0 | PARKED)),
            (prepared(5), AfterRelease::WakeParked)
        );
        let (handed, after) = release_transition(Word(held.0 | PARKED | HUNGRY));
        assert_eq!(after, AfterRelease::WakeHungry);
        assert!(handed.is_handoff());
        assert!(handed.is_parked());
        assert!(!handed.is_hungry());
        assert_eq!(
            handed.counter(),
            6,
            "the hand-off counts the grant it makes"
        );
        // A hand-off is not for running acquirers.
        assert_eq!(
            acquire_exclusive_transition(handed, 7, 3),
            Err(Decline::Held)
        );
        let claimed = claim_transition(handed, 7, 3).unwrap();
        assert_eq!(claimed.held.exclusive_owner(), Some(3));
        assert_eq!(claimed.held.counter(), 6);
        assert!(claimed.held.is_parked(), "more waiters may sleep");
        assert!(
            !claimed.held.is_hungry(),
            "other hungry sleepers set it again when their bounded sleep ends"
        );
        let (free, wake) = cancel_handoff(handed);
        assert_eq!(free, prepared(6), "a cancelled hand-off skips its token");
        assert!(wake);
    }

    #[test]
    fn a_hungry_release_with_an_exhausted_counter_frees_instead_of_handing_off() {
        let held = Word::new(7, PREPARED | EXCLUSIVE | HUNGRY, 2, COUNTER_MASK as u32);
        let (free, after) = release_transition(held);
        assert!(free.is_free());
        assert_eq!(free.counter() as u64, COUNTER_MASK);
        assert_eq!(after, AfterRelease::WakeParked);
    }

    #[test]
    fn a_handoff_bit_on_any_other_shape_is_malformed() {
        let bad = Word(prepared(1).0 | HANDOFF);
        assert_eq!(
            acquire_exclusive_transition(bad, 7, 3),
            Err(Decline::Malformed)
        );
        assert_eq!(claim_transition(bad, 7, 3), Err(Decline::Held));
        let held_and_handed = Word::new(7, PREPARED | EXCLUSIVE | HANDOFF, 2, 1);
        assert!(!held_and_handed.is_handoff());
        assert_eq!(
            acquire_exclusive_transition(held_and_handed, 7, 3),
            Err(Decline::Malformed)
        );
    }

    /// An unparker for releases that must wake nobody.
    struct NoWake;
    impl Unparker for NoWake {
        fn wake_one(&mut self, _: Queue) -> u32 {
            panic!("no wake-up expected here")
        }
    }

    #[test]
    fn the_release_gives_up_to_the_broker_once_the_word_is_not_its_hold() {
        let cell = AtomicU64::new(prepared(0).0);
        let g = try_acquire_exclusive(&cell, 7, 0).unwrap();
        cell.store(take_over(g.held).0, Ordering::Relaxed);
        assert!(!release_contended(&cell, g.held, &mut NoWake));
        let cell = AtomicU64::new(prepared(0).0);
        let g = try_acquire_exclusive(&cell, 7, 0).unwrap();
        assert!(release_contended(&cell, g.held, &mut NoWake));
        assert_eq!(Word(cell.load(Ordering::Relaxed)), prepared(1));
    }

    /// Regression: such a word freed by CAS sent every contender to the
    /// broker at once (8 processes on one hot key stuck at broker speed).
    #[test]
    fn a_hold_that_took_the_counters_last_value_is_not_released_by_cas() {
        let last = prepared(COUNTER_MASK as u32 - 1);
        let cell = AtomicU64::new(last.0);
        let g = try_acquire_exclusive(&cell, 7, 0).unwrap();
        assert!(needs_broker_release(g.held));
        cell.fetch_or(PARKED, Ordering::Relaxed);
        assert!(!release_contended(&cell, g.held, &mut NoWake));
        assert!(!try_release_exclusive(&cell, g.held));
        assert_eq!(
            Word(cell.load(Ordering::Relaxed)),
            Word(g.held.0 | PARKED),
            "still held: the broker releases it"
        );
        let earlier = try_acquire_exclusive(&AtomicU64::new(prepared(5).0), 7, 0).unwrap();
        assert!(!needs_broker_release(earlier.held));
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

        #[test]
        fn every_contended_transition_keeps_tokens_increasing_and_one_holder(raw in proptest::num::u64::ANY, owner in 0u32..=MAX_OWNER_INDEX, hungry in proptest::bool::ANY) {
            let w = Word(raw);
            if let Ok(g) = claim_transition(w, w.generation(), owner) {
                proptest::prop_assert!(w.is_handoff());
                proptest::prop_assert_eq!(g.held.counter(), w.counter());
                proptest::prop_assert_eq!(g.held.exclusive_owner(), Some(owner));
            }
            if let Ok(g) = grant_transition(w, w.generation(), owner, PARKED | HUNGRY) {
                proptest::prop_assert!(w.is_free() && !w.is_handoff());
                proptest::prop_assert_eq!(g.held.counter(), w.counter() + 1);
            }
            if let Ok(Some(marked)) = park_transition(w, hungry) {
                // Parking never changes who holds it, nor the counter.
                proptest::prop_assert!(same_hold(marked, w) || w.is_handoff());
                proptest::prop_assert_eq!(marked.counter(), w.counter());
                proptest::prop_assert_eq!(marked.holders(), w.holders());
            }
            let (next, _) = release_transition(w);
            proptest::prop_assert!(next.counter() >= w.counter());
            proptest::prop_assert!(next.is_free() || next.is_handoff());
            proptest::prop_assert_eq!(next.0 & RESERVED_MASK, 0);
        }
    }
}

/// Model check of the fast path: `RUSTFLAGS="--cfg loom" cargo test -p
/// forelock-shm-layout --release lockword::loom_tests`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::AtomicU32;
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
                    let token = answered.load(Ordering::Acquire);
                    if token == 0 {
                        return None; // not answered yet in this interleaving
                    }
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    // As the client library does: read the word after the
                    // answer; release by CAS only a word that names this
                    // hold (token base 0 here), else through the broker.
                    let now = word.load_word(Ordering::Acquire);
                    Some(
                        granted_on_fast_path(now, 1, 0, token as u64)
                            .is_some_and(|held| try_release_exclusive(&*word, held)),
                    )
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
            answered.store(g.held.counter() as usize, Ordering::Release);
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

    /// A model of the kernel's futexes for the slot's two words: a waiter
    /// checks the value and queues atomically with respect to wakes (the
    /// kernel's hash-bucket lock is the mutex here); a wake bumps the word
    /// before it takes the lock, as the releaser does. Sleeps never time out,
    /// so a lost wake-up shows as a deadlock.
    struct Futexes {
        seq: [AtomicU32; 2],
        queue: loom::sync::Mutex<[(u32, u32); 2]>,
        cv: [loom::sync::Condvar; 2],
    }

    fn index(q: Queue) -> usize {
        match q {
            Queue::Parked => 0,
            Queue::Hungry => 1,
        }
    }

    impl Futexes {
        fn new() -> Futexes {
            Futexes {
                seq: [AtomicU32::new(0), AtomicU32::new(0)],
                queue: loom::sync::Mutex::new([(0, 0); 2]),
                cv: [loom::sync::Condvar::new(), loom::sync::Condvar::new()],
            }
        }
        /// Wake up to `n` sleepers; returns how many.
        fn wake(&self, q: Queue, n: u32) -> u32 {
            let i = index(q);
            self.seq[i].fetch_add(1, Ordering::Release);
            let mut g = self.queue.lock().unwrap();
            let (sleepers, tokens) = g[i];
            let woken = (sleepers - tokens).min(n);
            g[i].1 += woken;
            if woken > 0 {
                self.cv[i].notify_all();
            }
            woken
        }
    }

    struct ModelParker<'a> {
        futexes: &'a Futexes,
        sleeps: u32,
        /// Hungry after this many sleeps.
        hungry_after: u32,
        last_handoffs: Option<u32>,
    }

    impl Parker for ModelParker<'_> {
        fn sequence(&self, q: Queue) -> u32 {
            self.futexes.seq[index(q)].load(Ordering::Acquire)
        }
        fn sleep(&mut self, q: Queue, expected: u32) {
            let i = index(q);
            self.sleeps += 1;
            if q == Queue::Hungry {
                // A hungry sleep is bounded (its timeout is the bound): the
                // model lets it end at any point after a yield. A hand-off's
                // wake-up still bumps the word, so a claim is also reached
                // through the wake (the sequence changes).
                loom::thread::yield_now();
                return;
            }
            let mut g = self.futexes.queue.lock().unwrap();
            if self.futexes.seq[i].load(Ordering::Relaxed) != expected {
                return;
            }
            g[i].0 += 1;
            loop {
                g = self.futexes.cv[i].wait(g).unwrap();
                if g[i].1 > 0 {
                    g[i].1 -= 1;
                    break;
                }
            }
            g[i].0 -= 1;
        }
        fn hungry(&mut self) -> bool {
            self.sleeps >= self.hungry_after
        }
        fn may_ask_handoff(&mut self, hungry_sequence: u32) -> bool {
            // The client's clock rule, in steps: ask unless a hand-off
            // happened since the last time we looked.
            let ask = self
                .last_handoffs
                .is_none_or(|last| last == hungry_sequence);
            self.last_handoffs = Some(hungry_sequence);
            ask
        }
        fn expired(&mut self) -> bool {
            false
        }
        fn spin(&mut self) -> bool {
            false
        }
    }

    struct ModelUnparker<'a>(&'a Futexes);

    impl Unparker for ModelUnparker<'_> {
        fn wake_one(&mut self, q: Queue) -> u32 {
            self.0.wake(q, 1)
        }
    }

    /// The holder (owner 0) releases while two clients wait on the
    /// contended path, one of which turns hungry after `hungry_after`
    /// sleeps: every client gets the lock (no lost wake-up: loom reports a
    /// deadlock otherwise), one at a time, with strictly increasing counters.
    fn contended_model(hungry_after: [u32; 2]) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(move || {
            let held = Word::new(0, PREPARED | EXCLUSIVE, 1, 1);
            let word = Arc::new(AtomicU64::new(held.0));
            let futexes = Arc::new(Futexes::new());
            let inside = Arc::new(AtomicUsize::new(0));
            let counters = Arc::new(loom::sync::Mutex::new(vec![1u32]));
            let handles: Vec<_> = (0..2u32)
                .map(|c| {
                    let (word, futexes, inside, counters) = (
                        word.clone(),
                        futexes.clone(),
                        inside.clone(),
                        counters.clone(),
                    );
                    loom::thread::spawn(move || {
                        let mut parker = ModelParker {
                            futexes: &futexes,
                            sleeps: 0,
                            hungry_after: hungry_after[c as usize],
                            last_handoffs: None,
                        };
                        let g = lock_contended(&*word, 0, c + 1, &mut parker).unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::Relaxed), 0);
                        counters.lock().unwrap().push(g.held.counter());
                        inside.fetch_sub(1, Ordering::Relaxed);
                        assert!(release_contended(
                            &*word,
                            g.held,
                            &mut ModelUnparker(&futexes)
                        ));
                    })
                })
                .collect();
            assert!(release_contended(
                &*word,
                held,
                &mut ModelUnparker(&futexes)
            ));
            for h in handles {
                h.join().unwrap();
            }
            let counters = counters.lock().unwrap();
            assert_eq!(counters.len(), 3);
            assert!(counters.windows(2).all(|p| p[0] < p[1]), "{counters:?}");
            let end = Word(word.load(Ordering::Relaxed));
            assert!(end.is_free(), "{end:?}");
        });
    }

    #[test]
    fn contended_waiters_are_all_woken_and_never_overlap() {
        contended_model([u32::MAX, u32::MAX]);
    }

    #[test]
    fn a_hungry_waiter_gets_a_handoff_or_the_lock_and_nobody_is_stranded() {
        contended_model([0, u32::MAX]);
    }

    #[test]
    fn two_hungry_waiters_share_handoffs_and_the_last_one_is_given_back() {
        contended_model([1, 0]);
    }

    #[test]
    fn a_dead_holder_released_by_the_broker_wakes_its_sleeper() {
        // The holder (owner 0) dies holding the lock; the broker frees the
        // word for it and wakes every sleeper (engine::wake_contended).
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let held = Word::new(0, PREPARED | EXCLUSIVE, 1, 1);
            let word = Arc::new(AtomicU64::new(held.0));
            let futexes = Arc::new(Futexes::new());
            let (w2, f2) = (word.clone(), futexes.clone());
            let waiter = loom::thread::spawn(move || {
                let mut parker = ModelParker {
                    futexes: &f2,
                    sleeps: 0,
                    hungry_after: 1,
                    last_handoffs: None,
                };
                let g = lock_contended(&*w2, 0, 2, &mut parker).unwrap();
                assert!(g.owner_died);
                assert!(release_contended(&*w2, g.held, &mut ModelUnparker(&f2)));
            });
            // The broker's dead-owner release (registry::client_gone).
            let mut cur = word.load_word(Ordering::Acquire);
            loop {
                match word.compare_exchange_word(
                    cur,
                    release_for_dead_owner(cur),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(now) => cur = now,
                }
            }
            if cur.0 & (PARKED | HUNGRY) != 0 {
                futexes.wake(Queue::Parked, u32::MAX);
                futexes.wake(Queue::Hungry, u32::MAX);
            }
            waiter.join().unwrap();
            assert!(Word(word.load(Ordering::Relaxed)).is_free());
        });
    }
}
