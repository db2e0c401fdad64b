//! The checker of the chaos test (`tests/tests/chaos.rs`), shared by the test
//! (the driver) and its worker processes (`fl-chaos-worker`).
//!
//! # The resource each key protects
//!
//! Every checked key `i` has a directory `<run>/keys/<i>/` with:
//!
//! - `log`: append-only (O_APPEND), one record per `write(2)`, each a whole
//!   line, so records from different processes never interleave and the file
//!   order is one total order of all appends:
//!   - `E <wid> <token> <x|s> <owner_died> <fast>`: worker `wid` entered
//!     (appended right after its grant, before anything else);
//!   - `X <wid> <token>`: it is leaving (appended right before its release);
//!   - `K <wid>`: the driver is about to SIGKILL `wid` (appended BEFORE the
//!     signal), or `wid` is exiting abnormally (panic hook, before it exits).
//! - `writer`: the "writer inside" marker, `<wid> <token>`, made by linking a
//!   fully written private file to this name: link(2) fails if the name
//!   exists, so the marker appears atomically and whole (O_EXCL with content).
//! - `last`: the token of the latest exclusive holder (written to a private
//!   file, then renamed over `last`: readers see the old or the new value).
//!
//! and `<run>/doomed/<wid>` exists once worker `wid` is dead or about to be
//! killed: the driver makes it before SIGKILL and after reaping a worker that
//! exited by itself; a worker's panic hook makes it before the process dies.
//! Workers are named by `wid`, a number the driver never reuses (pids are).
//!
//! # Why the checks have no races (no false alarms)
//!
//! A holder appends `E` after its grant and `X` before its release, so each
//! section `E..X` in the log lies inside a real hold. The log analysis
//! ([`analyze`], run by the driver after every process stopped) walks a key's
//! log in order:
//!
//! - overlap: an `E` appended while another worker's section is open (its `E`
//!   seen, its `X` or `K` not yet) means both held at that moment: two holders
//!   inside at once if either is exclusive. A killed holder's section ends at
//!   its `K`, which precedes the signal: a holder that entered after the `K`
//!   may have been granted after the death, so it is never blamed (the check
//!   under-approximates dead holders' sections; it never over-approximates).
//! - fencing: an exclusive `E` must carry a token above every token of a
//!   section already closed (`X` or `K`) before it; a shared `E` one above
//!   every closed exclusive section's. Either holder of such a pair was
//!   granted after the other released, unless the two overlapped: so a token
//!   that does not increase is always a real fault (a token gone backwards or
//!   an overlap the log did not show). Two shared holders' tokens are not
//!   compared (they may be granted in one order and log in the other).
//!
//! The workers check live too (so a violation is seen when it happens, with
//! its context), each check sound for the same reasons:
//!
//! - an exclusive holder links its marker; an existing marker belongs either
//!   to a doomed worker (left by a holder that died inside: taken over with
//!   an atomic rename, and the owner-died flag expected) or to a live worker:
//!   a live writer is inside, a violation (a live holder removes its marker
//!   before its `X` and release, so a correct grant never sees it);
//! - after its sleep inside, it reads the log from where it appended its `E`:
//!   another worker's `E` after its own is an entry while it was inside;
//! - `last` must be below its token; a shared holder checks the same, and
//!   that no live writer's marker is present and no exclusive `E` follows its
//!   own.
//!
//! Each violation is appended to `<run>/violations.log` (one line, counted by
//! the driver). A worker killed while inside leaves its marker and an open
//! section: that is the "half-written resource" of an owner death, accepted
//! (the marker is doomed, the section closed by `K`), never a violation.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Directory of checked key `index` under the run directory.
pub fn key_dir(run: &Path, index: usize) -> PathBuf {
    run.join("keys").join(index.to_string())
}

pub fn doomed_path(run: &Path, wid: u64) -> PathBuf {
    run.join("doomed").join(wid.to_string())
}

pub fn violations_path(run: &Path) -> PathBuf {
    run.join("violations.log")
}

/// Things worth reporting that are not violations (client errors, stale
/// markers without the owner-died flag).
pub fn notes_path(run: &Path) -> PathBuf {
    run.join("notes.log")
}

pub fn stop_path(run: &Path) -> PathBuf {
    run.join("stop")
}

/// Create the run directory's folders for `keys` checked keys.
pub fn prepare_run(run: &Path, keys: usize) {
    std::fs::create_dir_all(run.join("doomed")).unwrap();
    std::fs::create_dir_all(run.join("workers")).unwrap();
    for i in 0..keys {
        std::fs::create_dir_all(key_dir(run, i)).unwrap();
    }
}

/// Open a file for appending whole records.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().append(true).create(true).open(path)
}

/// Append one record with one write(2) (O_APPEND: atomic at the end of file).
pub fn append(file: &mut File, line: &str) -> std::io::Result<()> {
    debug_assert!(line.ends_with('\n'));
    let written = file.write(line.as_bytes())?;
    if written != line.len() {
        return Err(std::io::Error::other("short append to a checker log"));
    }
    Ok(())
}

/// Append `line` to the file at `path` (opened for this one record).
pub fn append_to(path: &Path, line: &str) {
    if let Ok(mut f) = open_append(path) {
        let _ = append(&mut f, line);
    }
}

/// Worker `wid` is dead or about to die: make its doomed file, then close its
/// open sections in every key's log. Called before the SIGKILL (driver) or the
/// abnormal exit (worker's panic hook), or after reaping a worker that exited.
pub fn doom(run: &Path, keys: usize, wid: u64) {
    let _ = File::create(doomed_path(run, wid));
    for i in 0..keys {
        append_to(&key_dir(run, i).join("log"), &format!("K {wid}\n"));
    }
}

pub fn is_doomed(run: &Path, wid: u64) -> bool {
    doomed_path(run, wid).exists()
}

/// What the log analysis found.
#[derive(Debug, Default)]
pub struct Analysis {
    pub grants: u64,
    pub exclusive: u64,
    pub shared: u64,
    pub fast_path: u64,
    pub owner_died: u64,
    /// Sections closed by `K` (holders killed while inside).
    pub killed_inside: u64,
    /// Exclusive holders killed inside whose next holder was not told the
    /// previous owner died (a broken promise, reported apart: not a
    /// violation of mutual exclusion or fencing).
    pub owner_death_unreported: Vec<String>,
    pub violations: Vec<String>,
    /// Distinct sections someone else entered (each double grant counts
    /// once here, however many entries it let in).
    pub overlapped_sections: u64,
    /// Entries whose owner_died flag was set, among the first entries into
    /// an overlapped section: the broker released a live holder's lock as if
    /// it had died.
    pub overlaps_reported_as_owner_death: u64,
}

/// Walk every key's log (see the module docs). Run only once every worker
/// has stopped.
pub fn analyze(run: &Path, keys: &[String]) -> Analysis {
    let mut a = Analysis::default();
    for (i, key) in keys.iter().enumerate() {
        let text = std::fs::read_to_string(key_dir(run, i).join("log")).unwrap_or_default();
        // wid -> (exclusive, token, line number of its E)
        let mut open: HashMap<u64, (bool, u64, usize)> = HashMap::new();
        let mut floor_any = 0u64;
        let mut floor_exclusive = 0u64;
        // An exclusive holder was killed inside (its `K` seen): the first
        // grant after the death must carry owner_died. Shared holders granted
        // together may log in another order than their grants, but all log
        // before the next exclusive holder enters (or overlap it): so the
        // first grant is the lowest token among the entries from the `K` up
        // to the next exclusive entry. Pending: (K line, lowest token so far,
        // its owner_died, its wid, its line).
        let mut expect_died: Option<(usize, u64, bool, u64, usize)> = None;
        // (wid, token) of the sections already counted as overlapped.
        let mut overlapped: std::collections::HashSet<(u64, u64)> = Default::default();
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let f: Vec<&str> = line.split(' ').collect();
            let num = |s: Option<&&str>| s.and_then(|s| s.parse::<u64>().ok());
            match f.first().copied() {
                Some("E") if f.len() == 6 => {
                    let (Some(wid), Some(token)) = (num(f.get(1)), num(f.get(2))) else {
                        a.violations
                            .push(format!("{key}: log line {line_no} unreadable: {line:?}"));
                        continue;
                    };
                    let exclusive = f[3] == "x";
                    a.grants += 1;
                    if exclusive {
                        a.exclusive += 1;
                    } else {
                        a.shared += 1;
                    }
                    a.owner_died += u64::from(f[4] == "true");
                    if let Some(pending) = &mut expect_died {
                        if token < pending.1 {
                            *pending = (pending.0, token, f[4] == "true", wid, line_no);
                        }
                        if exclusive {
                            let pending = expect_died.take().expect("just matched");
                            owner_death_check(&mut a, key, pending);
                        }
                    }
                    a.fast_path += u64::from(f[5] == "true");
                    for (&other, &(other_exclusive, other_token, other_line)) in &open {
                        if other != wid && (exclusive || other_exclusive) {
                            if overlapped.insert((other, other_token)) {
                                a.overlapped_sections += 1;
                                a.overlaps_reported_as_owner_death += u64::from(f[4] == "true");
                            }
                            a.violations.push(format!(
                                "{key}: two holders inside at once: worker {wid} entered \
                                 {} with token {token} (log line {line_no}) while worker \
                                 {other} was inside {} with token {other_token} (since line \
                                 {other_line})",
                                mode(exclusive),
                                mode(other_exclusive)
                            ));
                        }
                    }
                    let floor = if exclusive {
                        floor_any
                    } else {
                        floor_exclusive
                    };
                    if token <= floor {
                        a.violations.push(format!(
                            "{key}: fencing token did not increase: worker {wid} entered {} \
                             with token {token} (log line {line_no}), not above {floor}, the \
                             highest token of an earlier {} hold already ended",
                            mode(exclusive),
                            if exclusive { "" } else { "exclusive" }
                        ));
                    }
                    if open.insert(wid, (exclusive, token, line_no)).is_some() {
                        a.violations.push(format!(
                            "{key}: worker {wid} entered twice without leaving (line {line_no})"
                        ));
                    }
                }
                Some("X") if f.len() == 3 => {
                    let Some(wid) = num(f.get(1)) else { continue };
                    if let Some((exclusive, token, _)) = open.remove(&wid) {
                        close(&mut floor_any, &mut floor_exclusive, exclusive, token);
                    }
                }
                Some("K") if f.len() == 2 => {
                    let Some(wid) = num(f.get(1)) else { continue };
                    if let Some((exclusive, token, _)) = open.remove(&wid) {
                        a.killed_inside += 1;
                        if exclusive {
                            if let Some(pending) = expect_died.take() {
                                owner_death_check(&mut a, key, pending);
                            }
                            expect_died = Some((line_no, u64::MAX, true, 0, 0));
                        }
                        close(&mut floor_any, &mut floor_exclusive, exclusive, token);
                    }
                }
                _ => a
                    .violations
                    .push(format!("{key}: log line {line_no} unreadable: {line:?}")),
            }
        }
        if let Some(pending) = expect_died.take() {
            owner_death_check(&mut a, key, pending);
        }
    }
    a
}

/// The first grant after an exclusive holder's death (see `analyze`) must
/// say the previous owner died. No entry at all (u64::MAX) is fine.
fn owner_death_check(
    a: &mut Analysis,
    key: &str,
    (k_line, token, died, wid, line_no): (usize, u64, bool, u64, usize),
) {
    if token != u64::MAX && !died {
        a.owner_death_unreported.push(format!(
            "{key}: worker {wid} was granted first (token {token}, log line {line_no}) after \
             an exclusive holder was killed inside (line {k_line}), without \
             previous_owner_died()"
        ));
    }
}

fn close(floor_any: &mut u64, floor_exclusive: &mut u64, exclusive: bool, token: u64) {
    *floor_any = (*floor_any).max(token);
    if exclusive {
        *floor_exclusive = (*floor_exclusive).max(token);
    }
}

fn mode(exclusive: bool) -> &'static str {
    if exclusive { "exclusive" } else { "shared" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analyze_text(log: &str) -> Analysis {
        let dir = crate::TempDir::new("chaos-analyze");
        prepare_run(dir.path(), 1);
        std::fs::write(key_dir(dir.path(), 0).join("log"), log).unwrap();
        analyze(dir.path(), &["k".into()])
    }

    #[test]
    fn sequential_holders_with_rising_tokens_are_fine() {
        let a = analyze_text(
            "E 1 5 x false true\nX 1 5\nE 2 6 s false false\nE 3 7 s false false\n\
             X 3 7\nX 2 6\nE 1 8 x false true\nX 1 8\n",
        );
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!((a.grants, a.exclusive, a.shared, a.fast_path), (4, 2, 2, 2));
    }

    #[test]
    fn an_entry_inside_an_exclusive_section_is_two_holders() {
        let a = analyze_text("E 1 5 x false true\nE 2 6 s false false\nX 2 6\nX 1 5\n");
        assert_eq!(a.violations.len(), 1, "{:?}", a.violations);
        assert!(a.violations[0].contains("two holders"));
        assert_eq!(a.overlapped_sections, 1);
    }

    #[test]
    fn a_killed_holder_section_ends_at_its_k_and_the_next_may_enter() {
        let a = analyze_text("E 1 5 x false true\nK 1\nE 2 6 x true false\nX 2 6\n");
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!((a.killed_inside, a.owner_died), (1, 1));
        assert!(a.owner_death_unreported.is_empty());
        let a = analyze_text("E 1 5 x false true\nK 1\nE 2 6 x false false\nX 2 6\n");
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!(a.owner_death_unreported.len(), 1);
        // Shared holders granted after the death log in any order: the flag
        // goes with the lowest token.
        let a = analyze_text(
            "E 1 5 x false true\nK 1\nE 3 7 s false false\nE 2 6 s true false\n\
             X 2 6\nX 3 7\nE 4 8 x false true\nX 4 8\n",
        );
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert!(
            a.owner_death_unreported.is_empty(),
            "{:?}",
            a.owner_death_unreported
        );
    }

    #[test]
    fn a_token_below_an_ended_hold_is_a_fencing_violation() {
        let a = analyze_text("E 1 9 x false true\nX 1 9\nE 2 9 x false false\nX 2 9\n");
        assert_eq!(a.violations.len(), 1, "{:?}", a.violations);
        assert!(a.violations[0].contains("fencing"));
        // Shared holders' tokens are not compared with each other.
        let a = analyze_text("E 1 9 s false false\nX 1 9\nE 2 8 s false false\nX 2 8\n");
        assert!(a.violations.is_empty(), "{:?}", a.violations);
    }
}
