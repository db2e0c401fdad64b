//! The fenced-resource checker (Jepsen's etcd "lock-set" idea, with
//! Kleppmann's fencing tokens).
//!
//! A *resource* is one shared file. Holders on every host, each holding the
//! lock under test, read-modify-write it and present their fencing token on
//! every access:
//!
//! 1. [`Checker::enter`]: read the value. Refused (`Stale`) when the token is
//!    lower than the highest accepted so far; otherwise the holder is
//!    *inside* and its token becomes the highest.
//! 2. [`Checker::write`]: write the new value. Refused when the token is
//!    lower than the highest accepted (a holder superseded while inside).
//! 3. [`Checker::leave`]: the holder is out, before it releases its lock.
//! 4. [`Checker::outcome`]: what releasing the lock returned: released,
//!    `Lost`, or another error.
//!
//! Because tokens follow grant order, a holder refused as stale, or entered
//! upon by a holder with a higher token while still inside, held its lock at
//! the same time as a later grant: its hold must have been lost. The checker
//! keeps such holders *pending* until their outcome: a release reported as
//! lost (or failed) *excuses* them (the fence did its job: a stale writer is
//! harmless); a release reported as successful is a **violation** (the lock
//! service told the holder it held the key throughout, yet someone else held
//! it too).
//!
//! What it counts ([`Counts`]):
//! - `accepted_updates`: writes applied;
//! - `stale_rejections`: entries and writes refused for a low token
//!   (expected under faults, and harmless);
//! - `lost_updates` (violation): accepted writes overwritten by a write whose
//!   read came before them (the RMW of two holders interleaved, both accepted);
//! - `overlapping_holders` (violation): a holder entered while another accepted
//!   holder was inside, and the one entered upon was told its release
//!   succeeded (or both presented the same token);
//! - `stale_acknowledged` (violation): a holder refused as stale whose release
//!   was acknowledged: its grant overlapped a later one;
//! - `duplicate_tokens` (violation): two holders presented the same token;
//! - `excused`: overlaps and stale holders whose holds were reported lost.
//!
//! [`Resource`] keeps the checker's state in the resource file itself and
//! serializes every access with `flock(2)` on it, so processes on every
//! host (network namespaces share the file system) check one history. It also
//! appends each event, with the `CLOCK_MONOTONIC` instant, to
//! `<resource>.history`, from which the tests read takeover times.
//!
//! The checker covers exclusive grants (shared holders are not modelled).

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write as _};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What releasing a lock returned, as the holder reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The release succeeded: the lock service says the hold was valid.
    Released,
    /// The release returned `Lost`: the hold had been lost (fenced).
    Lost,
    /// The release failed otherwise (e.g. the broker is gone): no claim either way.
    Error,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Released => "released",
            Outcome::Lost => "lost",
            Outcome::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "released" | "ok" => Some(Outcome::Released),
            "lost" => Some(Outcome::Lost),
            "error" => Some(Outcome::Error),
            _ => None,
        }
    }
}

/// The answer to [`Checker::enter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Inside; `value` is the resource's current value.
    Accepted { value: u64 },
    /// Refused: `highest` was accepted already.
    Stale { highest: u64 },
}

/// The answer to [`Checker::write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Accepted,
    Stale { highest: u64 },
}

/// The checker's counters (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub entries: u64,
    pub accepted_updates: u64,
    pub stale_rejections: u64,
    pub lost_updates: u64,
    pub overlapping_holders: u64,
    pub stale_acknowledged: u64,
    pub duplicate_tokens: u64,
    pub excused: u64,
    pub released: u64,
    pub holds_lost: u64,
    pub release_errors: u64,
}

impl Counts {
    /// Violations of mutual exclusion or of fencing: must be 0.
    pub fn violations(&self) -> u64 {
        self.lost_updates
            + self.overlapping_holders
            + self.stale_acknowledged
            + self.duplicate_tokens
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "violations={} (lost_updates={} overlapping_holders={} stale_acknowledged={} \
             duplicate_tokens={}) accepted_updates={} stale_rejections={} excused={} entries={} \
             released={} holds_lost={} release_errors={}",
            self.violations(),
            self.lost_updates,
            self.overlapping_holders,
            self.stale_acknowledged,
            self.duplicate_tokens,
            self.accepted_updates,
            self.stale_rejections,
            self.excused,
            self.entries,
            self.released,
            self.holds_lost,
            self.release_errors
        )
    }
}

/// A holder inside the resource: its token and the number of accepted
/// writes when it read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Inside {
    holder: String,
    token: u64,
    base_version: u64,
}

/// Why a holder's outcome decides a violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Why {
    /// Another holder entered with a higher token while this one was inside.
    Overlapped,
    /// This holder's entry or write was refused as stale.
    Stale,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    holder: String,
    token: u64,
    why: Why,
}

/// The pure state machine of the checker: no I/O.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checker {
    /// The resource's value (a counter the holders increment).
    pub value: u64,
    /// Accepted writes so far.
    pub version: u64,
    /// The highest token accepted, and who presented it.
    pub highest: u64,
    highest_holder: String,
    inside: Vec<Inside>,
    pending: Vec<Pending>,
    pub counts: Counts,
}

impl Checker {
    pub fn new() -> Checker {
        Checker::default()
    }

    /// Holders whose outcome has not been reported yet although it decides
    /// a violation.
    pub fn unresolved(&self) -> usize {
        self.pending.len()
    }

    fn pend(&mut self, holder: &str, token: u64, why: Why) {
        if !self.pending.iter().any(|p| p.holder == holder) {
            self.pending.push(Pending {
                holder: holder.into(),
                token,
                why,
            });
        }
    }

    /// `holder` presents `token` to read the resource.
    pub fn enter(&mut self, holder: &str, token: u64) -> Entry {
        self.counts.entries += 1;
        if token < self.highest {
            self.counts.stale_rejections += 1;
            self.pend(holder, token, Why::Stale);
            return Entry::Stale {
                highest: self.highest,
            };
        }
        if token == self.highest && !self.highest_holder.is_empty() && self.highest_holder != holder
        {
            self.counts.duplicate_tokens += 1;
        }
        let others: Vec<Inside> = self
            .inside
            .iter()
            .filter(|i| i.holder != holder)
            .cloned()
            .collect();
        for other in others {
            if other.token == token {
                // Two holders with one token: nothing can excuse it; both
                // stay inside, so their writes show the lost update too.
                self.counts.overlapping_holders += 1;
            } else {
                // `other` has a lower token: superseded. Whether this is a
                // violation depends on what its release returns.
                self.pend(&other.holder, other.token, Why::Overlapped);
                self.inside.retain(|i| i.holder != other.holder);
            }
        }
        self.highest = token;
        self.highest_holder = holder.into();
        self.inside.retain(|i| i.holder != holder);
        self.inside.push(Inside {
            holder: holder.into(),
            token,
            base_version: self.version,
        });
        Entry::Accepted { value: self.value }
    }

    /// `holder` presents `token` to write `value`.
    pub fn write(&mut self, holder: &str, token: u64, value: u64) -> Write {
        if token < self.highest {
            self.counts.stale_rejections += 1;
            self.pend(holder, token, Why::Stale);
            return Write::Stale {
                highest: self.highest,
            };
        }
        let version = self.version;
        let base = match self.inside.iter_mut().find(|i| i.holder == holder) {
            Some(i) => std::mem::replace(&mut i.base_version, version + 1),
            // A write without a read overwrites nothing it did not see.
            None => version,
        };
        self.counts.lost_updates += version - base;
        self.version += 1;
        self.value = value;
        self.counts.accepted_updates += 1;
        if token > self.highest {
            self.highest = token;
            self.highest_holder = holder.into();
        }
        Write::Accepted
    }

    /// `holder` is out (before it releases its lock).
    pub fn leave(&mut self, holder: &str) {
        self.inside.retain(|i| i.holder != holder);
    }

    /// What releasing `holder`'s lock returned; resolves its pending checks.
    pub fn outcome(&mut self, holder: &str, outcome: Outcome) {
        match outcome {
            Outcome::Released => self.counts.released += 1,
            Outcome::Lost => self.counts.holds_lost += 1,
            Outcome::Error => self.counts.release_errors += 1,
        }
        self.inside.retain(|i| i.holder != holder);
        let (mine, rest): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.holder == holder);
        self.pending = rest;
        for p in mine {
            match (outcome, p.why) {
                (Outcome::Released, Why::Overlapped) => self.counts.overlapping_holders += 1,
                (Outcome::Released, Why::Stale) => self.counts.stale_acknowledged += 1,
                (Outcome::Lost | Outcome::Error, _) => self.counts.excused += 1,
            }
        }
    }
}

/// What one read-modify-write came to ([`Resource::rmw`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rmw {
    /// Read and written: the update is acknowledged.
    Accepted,
    /// Refused at the read.
    StaleAtEnter,
    /// Read, then refused at the write (superseded while inside).
    StaleAtWrite,
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the
/// machine (none of the harness's processes is in a time namespace).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY:
    // - `ts` is a valid, writable timespec for the duration of the call;
    // - CLOCK_MONOTONIC is always available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The host part of a holder name `host/pid/seq`.
pub fn host_of(holder: &str) -> &str {
    holder.split('/').next().unwrap_or(holder)
}

/// A resource file holding a [`Checker`]'s state; every access under
/// `flock(LOCK_EX)` on the file.
#[derive(Clone, Debug)]
pub struct Resource {
    path: PathBuf,
}

impl Resource {
    /// A fresh resource at `path` (value 0, nothing accepted), and an empty
    /// history beside it.
    pub fn create(path: &Path) -> io::Result<Resource> {
        std::fs::write(path, serde_json::to_vec(&Checker::new())?)?;
        std::fs::write(history_path(path), "")?;
        Ok(Resource { path: path.into() })
    }

    /// The resource at `path`, made by [`Resource::create`].
    pub fn open(path: &Path) -> Resource {
        Resource { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on the state under the file's exclusive flock, store the
    /// result, and append `f`'s history line (if any) to the history.
    fn with<T>(&self, f: impl FnOnce(&mut Checker) -> (T, Option<String>)) -> io::Result<T> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)?;
        // SAFETY:
        // - the descriptor is open for the whole call (`file` outlives it);
        // - flock has no memory preconditions. The lock is released when
        //   `file` is closed at the end of this function.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        let mut checker: Checker = serde_json::from_slice(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} does not hold a checker's state ({e}); make it with fl-fenced init",
                    self.path.display()
                ),
            )
        })?;
        let (answer, line) = f(&mut checker);
        let bytes = serde_json::to_vec(&checker)?;
        // Written over the old state, then cut to length: the file is never
        // empty, even for a reader without the flock.
        file.write_all_at(&bytes, 0)?;
        file.set_len(bytes.len() as u64)?;
        if let Some(line) = line {
            let mut history = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(history_path(&self.path))?;
            writeln!(history, "{} {line}", monotonic_ns())?;
        }
        Ok(answer)
    }

    pub fn enter(&self, holder: &str, token: u64) -> io::Result<Entry> {
        self.with(|c| {
            let e = c.enter(holder, token);
            let result = match e {
                Entry::Accepted { .. } => "accepted",
                Entry::Stale { .. } => "stale",
            };
            (e, Some(format!("enter {holder} {token} {result}")))
        })
    }

    pub fn write(&self, holder: &str, token: u64, value: u64) -> io::Result<Write> {
        self.with(|c| {
            let w = c.write(holder, token, value);
            let result = match w {
                Write::Accepted => "accepted",
                Write::Stale { .. } => "stale",
            };
            (w, Some(format!("write {holder} {token} {result}")))
        })
    }

    pub fn leave(&self, holder: &str) -> io::Result<()> {
        self.with(|c| (c.leave(holder), None))
    }

    pub fn outcome(&self, holder: &str, outcome: Outcome) -> io::Result<()> {
        self.with(|c| {
            c.outcome(holder, outcome);
            ((), Some(format!("outcome {holder} 0 {}", outcome.name())))
        })
    }

    /// Enter, stay inside for `hold`, write value + 1, leave.
    pub fn rmw(&self, holder: &str, token: u64, hold: Duration) -> io::Result<Rmw> {
        let value = match self.enter(holder, token)? {
            Entry::Accepted { value } => value,
            Entry::Stale { .. } => return Ok(Rmw::StaleAtEnter),
        };
        if !hold.is_zero() {
            std::thread::sleep(hold);
        }
        let written = self.write(holder, token, value + 1)?;
        self.leave(holder)?;
        Ok(match written {
            Write::Accepted => Rmw::Accepted,
            Write::Stale { .. } => Rmw::StaleAtWrite,
        })
    }

    /// The checker's state now.
    pub fn state(&self) -> io::Result<Checker> {
        self.with(|c| (c.clone(), None))
    }

    /// The events so far. Read while holders may be appending: a last line
    /// without its newline is an append in progress and is left out.
    pub fn history(&self) -> io::Result<History> {
        let text = std::fs::read_to_string(history_path(&self.path))?;
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        History::parse(complete)
    }
}

/// `<resource>.history`.
pub fn history_path(resource: &Path) -> PathBuf {
    let mut p = resource.as_os_str().to_owned();
    p.push(".history");
    PathBuf::from(p)
}

/// One line of a resource's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC`, ns.
    pub at_ns: u64,
    /// `enter`, `write` or `outcome`.
    pub op: String,
    pub holder: String,
    pub token: u64,
    /// `accepted`/`stale`, or an [`Outcome`]'s name.
    pub result: String,
}

impl Event {
    pub fn host(&self) -> &str {
        host_of(&self.holder)
    }
}

/// A resource's history, in the order the checker saw it.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub events: Vec<Event>,
}

impl History {
    pub fn parse(text: &str) -> io::Result<History> {
        let bad = |l: &str| io::Error::new(io::ErrorKind::InvalidData, format!("history: {l:?}"));
        let mut events = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() != 5 {
                return Err(bad(line));
            }
            events.push(Event {
                at_ns: f[0].parse().map_err(|_| bad(line))?,
                op: f[1].into(),
                holder: f[2].into(),
                token: f[3].parse().map_err(|_| bad(line))?,
                result: f[4].into(),
            });
        }
        Ok(History { events })
    }

    /// Accepted writes, in order.
    pub fn accepted_writes(&self) -> impl Iterator<Item = &Event> {
        self.events
            .iter()
            .filter(|e| e.op == "write" && e.result == "accepted")
    }

    /// The first accepted write at or after `since_ns` by a host other than
    /// `except` (any host if `None`), as the time it took.
    pub fn takeover_after(&self, since_ns: u64, except: Option<&str>) -> Option<Duration> {
        self.accepted_writes()
            .find(|e| e.at_ns >= since_ns && except.is_none_or(|h| e.host() != h))
            .map(|e| Duration::from_nanos(e.at_ns - since_ns))
    }

    /// Accepted writes by `host` at or after `since_ns`.
    pub fn accepted_by_after(&self, host: &str, since_ns: u64) -> usize {
        self.accepted_writes()
            .filter(|e| e.at_ns >= since_ns && e.host() == host)
            .count()
    }

    /// The longest stretch without an accepted write between `from_ns` and
    /// `to_ns`.
    pub fn longest_gap(&self, from_ns: u64, to_ns: u64) -> Duration {
        self.longest_gap_span(from_ns, to_ns).1
    }

    /// The longest stretch without an accepted write between `from_ns` and
    /// `to_ns`: where it starts (`from_ns` or an accepted write) and how
    /// long it lasts.
    pub fn longest_gap_span(&self, from_ns: u64, to_ns: u64) -> (u64, Duration) {
        let mut last = from_ns;
        let mut gap = (from_ns, 0);
        for e in self.accepted_writes() {
            if e.at_ns < from_ns || e.at_ns > to_ns {
                continue;
            }
            if e.at_ns - last > gap.1 {
                gap = (last, e.at_ns - last);
            }
            last = e.at_ns;
        }
        if to_ns.saturating_sub(last) > gap.1 {
            gap = (last, to_ns - last);
        }
        (gap.0, Duration::from_nanos(gap.1))
    }

    /// Tokens of accepted writes, in acceptance order.
    pub fn accepted_tokens(&self) -> Vec<u64> {
        self.accepted_writes().map(|e| e.token).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder that enters, writes value + 1, leaves and releases.
    fn clean(c: &mut Checker, holder: &str, token: u64) {
        let Entry::Accepted { value } = c.enter(holder, token) else {
            panic!("{holder} refused")
        };
        assert_eq!(c.write(holder, token, value + 1), Write::Accepted);
        c.leave(holder);
        c.outcome(holder, Outcome::Released);
    }

    #[test]
    fn a_serial_history_with_rising_tokens_has_no_violation() {
        let mut c = Checker::new();
        for (i, t) in [5, 9, 10, 1 << 20 | 1, 3 << 20 | 1].into_iter().enumerate() {
            clean(&mut c, &format!("h{}/1/{i}", i % 3), t);
        }
        assert_eq!(c.counts.violations(), 0, "{}", c.counts);
        assert_eq!(c.counts.accepted_updates, 5);
        assert_eq!(c.value, 5);
        assert_eq!(c.unresolved(), 0);
    }

    #[test]
    fn a_lower_token_is_refused_and_excused_when_its_hold_was_lost() {
        let mut c = Checker::new();
        clean(&mut c, "h2/1/1", 20);
        assert_eq!(c.enter("h1/1/1", 10), Entry::Stale { highest: 20 });
        assert_eq!(c.unresolved(), 1);
        c.outcome("h1/1/1", Outcome::Lost);
        assert_eq!(c.counts.stale_rejections, 1);
        assert_eq!(c.counts.excused, 1);
        assert_eq!(c.counts.violations(), 0, "{}", c.counts);
    }

    #[test]
    fn a_stale_holder_told_its_release_succeeded_is_a_violation() {
        let mut c = Checker::new();
        clean(&mut c, "h2/1/1", 20);
        assert!(matches!(c.enter("h1/1/1", 10), Entry::Stale { .. }));
        c.outcome("h1/1/1", Outcome::Released);
        assert_eq!(c.counts.stale_acknowledged, 1);
        assert_eq!(c.counts.violations(), 1);
    }

    #[test]
    fn entering_upon_a_holder_that_then_releases_fine_is_an_overlap() {
        let mut c = Checker::new();
        assert!(matches!(c.enter("h1/1/1", 10), Entry::Accepted { .. }));
        // h2 enters while h1 is inside, with a higher token.
        assert!(matches!(c.enter("h2/1/1", 20), Entry::Accepted { .. }));
        assert_eq!(c.write("h2/1/1", 20, 1), Write::Accepted);
        c.leave("h2/1/1");
        c.outcome("h2/1/1", Outcome::Released);
        // h1's late write is refused: the fence works...
        assert!(matches!(c.write("h1/1/1", 10, 1), Write::Stale { .. }));
        c.leave("h1/1/1");
        // ...but its release says it held all along.
        c.outcome("h1/1/1", Outcome::Released);
        assert_eq!(c.counts.overlapping_holders, 1, "{}", c.counts);
        assert_eq!(c.counts.lost_updates, 0);
        assert_eq!(c.counts.violations(), 1);
    }

    #[test]
    fn entering_upon_a_holder_whose_hold_was_lost_is_excused() {
        let mut c = Checker::new();
        assert!(matches!(c.enter("h1/1/1", 10), Entry::Accepted { .. }));
        assert!(matches!(c.enter("h2/1/1", 20), Entry::Accepted { .. }));
        assert!(matches!(c.write("h1/1/1", 10, 1), Write::Stale { .. }));
        c.outcome("h1/1/1", Outcome::Lost);
        assert_eq!(c.write("h2/1/1", 20, 1), Write::Accepted);
        c.leave("h2/1/1");
        c.outcome("h2/1/1", Outcome::Released);
        assert_eq!(c.counts.violations(), 0, "{}", c.counts);
        assert_eq!(c.counts.excused, 1);
        assert_eq!(c.counts.stale_rejections, 1);
        assert_eq!(c.counts.holds_lost, 1);
    }

    #[test]
    fn two_holders_with_one_token_lose_an_acknowledged_update() {
        let mut c = Checker::new();
        clean(&mut c, "h1/1/0", 4);
        let Entry::Accepted { value: a } = c.enter("h1/1/1", 5) else {
            panic!()
        };
        let Entry::Accepted { value: b } = c.enter("h2/1/1", 5) else {
            panic!("an equal token is not lower: accepted")
        };
        assert_eq!(c.write("h1/1/1", 5, a + 1), Write::Accepted);
        assert_eq!(c.write("h2/1/1", 5, b + 1), Write::Accepted);
        c.outcome("h1/1/1", Outcome::Released);
        c.outcome("h2/1/1", Outcome::Released);
        assert_eq!(c.counts.duplicate_tokens, 1, "{}", c.counts);
        assert_eq!(c.counts.overlapping_holders, 1, "{}", c.counts);
        assert_eq!(c.counts.lost_updates, 1, "{}", c.counts);
        assert_eq!(c.value, 2, "three writes accepted, one lost");
        assert_eq!(c.counts.accepted_updates, 3);
        assert_eq!(c.counts.violations(), 3);
    }

    #[test]
    fn a_holder_that_never_reports_stays_unresolved_not_excused() {
        let mut c = Checker::new();
        clean(&mut c, "h2/1/1", 20);
        assert!(matches!(c.enter("h1/1/1", 10), Entry::Stale { .. }));
        assert_eq!(c.unresolved(), 1);
        assert_eq!(c.counts.excused, 0);
    }

    /// Regression: a test read the history while a holder was appending,
    /// and failed on the half-written line (`history: "15941525793207"`).
    #[test]
    fn a_history_read_during_an_append_leaves_the_unfinished_line_out() {
        let dir = crate::TempDir::new("fenced-torn");
        let path = dir.path().join("resource");
        let a = Resource::create(&path).unwrap();
        assert_eq!(a.rmw("h1/1/1", 1, Duration::ZERO).unwrap(), Rmw::Accepted);
        let before = a.history().unwrap().events.len();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(history_path(&path))
            .unwrap();
        std::io::Write::write_all(&mut f, b"15941525793207").unwrap();
        assert_eq!(a.history().unwrap().events.len(), before);
    }

    #[test]
    fn the_resource_file_checks_across_handles_and_keeps_a_history() {
        let dir = crate::TempDir::new("fenced");
        let path = dir.path().join("resource");
        let a = Resource::create(&path).unwrap();
        let b = Resource::open(&path);
        assert_eq!(
            a.rmw("h1/1/1", 1 << 20 | 1, Duration::ZERO).unwrap(),
            Rmw::Accepted
        );
        assert_eq!(
            b.rmw("h2/1/1", 2 << 20 | 1, Duration::ZERO).unwrap(),
            Rmw::Accepted
        );
        assert_eq!(
            a.rmw("h1/1/2", 1 << 20 | 2, Duration::ZERO).unwrap(),
            Rmw::StaleAtEnter
        );
        a.outcome("h1/1/2", Outcome::Released).unwrap();
        let state = b.state().unwrap();
        assert_eq!(state.value, 2);
        assert_eq!(state.counts.stale_acknowledged, 1);
        let h = a.history().unwrap();
        assert_eq!(h.accepted_tokens(), vec![1 << 20 | 1, 2 << 20 | 1]);
        let first = h.events[0].at_ns;
        assert_eq!(h.takeover_after(first, Some("h1")).map(|_| ()), Some(()));
        assert_eq!(h.accepted_by_after("h2", first), 1);
    }
}
