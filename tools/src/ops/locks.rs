//! `forelock locks`: one row per key in the table, like PostgreSQL's
//! `pg_locks`.
//!
//! The rows come from shared memory: the lock word (mode, exclusive owner,
//! counter, PREPARED), the slot (token base, waiter count, grant time, score)
//! and the client records (pids; the broker-granted holds of each client,
//! which name shared holders). The broker keeps its queues in its own
//! memory, so the waiters' pids are asked of it (`Request::Waiters`, no
//! client record, a short timeout) for the keys the table says are waited
//! for. A broker that is busy, stopped or dead does not answer: the rows are
//! printed all the same, with the waiters as a count and a note.

use super::{RuntimeDirArg, format_ms, open_table};
use serde::Serialize;
use shm_layout::lockword::Word;
use shm_layout::sync::shm::Ordering;
use shm_layout::table::{CLIENT_ACTIVE, HOLD_SHARED, TableView};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the broker may take to answer one question about waiters.
const BROKER_TIMEOUT: Duration = Duration::from_millis(200);
/// How long all the questions of one `forelock locks` may take together.
const BROKER_BUDGET: Duration = Duration::from_secs(1);
/// Waiter pids the text table prints per key (`--json` has them all, up to
/// [`forelock::observe::WAITERS_MAX`]).
const PIDS_SHOWN: usize = 10;

#[derive(clap::Args, Debug)]
pub struct LocksArgs {
    #[command(flatten)]
    pub runtime: RuntimeDirArg,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One queued acquire.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaiterRow {
    pub pid: u32,
    pub shared: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct LockRow {
    pub key: String,
    /// The key's bytes, to ask the broker about it.
    #[serde(skip)]
    pub key_bytes: Vec<u8>,
    pub slot: u32,
    /// "exclusive", "shared" or "free".
    pub mode: &'static str,
    /// Exclusive: the holder; shared: every shared holder the broker recorded.
    pub holder_pids: Vec<u32>,
    /// Shared holders counted in the lock word.
    pub holders: u32,
    /// Granted by the holder's own CAS on a prepared slot (no broker).
    pub fast_path: bool,
    /// Milliseconds since the broker granted the lock; None when free, or
    /// when the holder took it on the fast path (the broker does not see
    /// that grant's time).
    pub held_for_ms: Option<u64>,
    /// Requests queued in the broker for this key (the broker's count when
    /// it answered, else the table's).
    pub waiter_count: u32,
    /// The queued requests, head of the queue first (the broker lists at
    /// most [`forelock::observe::WAITERS_MAX`]); None when the broker did not
    /// answer.
    pub waiters: Option<Vec<WaiterRow>>,
    /// Fencing token of the latest grant of this key.
    pub token: u64,
    pub prepared: bool,
    /// The previous holder died holding the lock; the next grant reports it.
    pub owner_died: bool,
    /// The forecaster's latest score for the key (0 when unscored).
    pub score: f32,
    /// A global key (clustered broker): which host holds its node grant,
    /// as this broker last saw at etcd ([`global_hosts`]); None for a local
    /// key or without `[cluster]`.
    pub host: Option<String>,
}

/// Printable form of a key: text as is, other bytes as \xNN.
fn key_text(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Pids of the processes holding each slot through the broker, from the
/// client records' hold lists.
fn broker_holders(view: &TableView) -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    for i in 0..view.geometry().client_count {
        let Some(record) = view.client(i) else { break };
        if record.state.load(Ordering::Relaxed) != CLIENT_ACTIVE {
            continue;
        }
        let pid = record.pid.load(Ordering::Relaxed);
        for hold in &record.broker_holds {
            let raw = hold.load(Ordering::Relaxed);
            let slot_plus_one = raw & !HOLD_SHARED;
            if slot_plus_one != 0 {
                map.entry(slot_plus_one - 1).or_default().push(pid);
            }
        }
    }
    map
}

fn client_pid(view: &TableView, index: u32) -> Option<u32> {
    let record = view.client(index)?;
    (record.state.load(Ordering::Relaxed) == CLIENT_ACTIVE)
        .then(|| record.pid.load(Ordering::Relaxed))
}

/// Every keyed slot of the table at `dir`, sorted by key.
pub fn read(dir: &Path) -> anyhow::Result<Vec<LockRow>> {
    let table = open_table(dir)?;
    let view = &table.view;
    let now_ms = shm_layout::monotonic_ns() / 1_000_000;
    let holders = broker_holders(view);
    let mut rows = Vec::new();
    for s in 0..view.geometry().slot_count {
        let Some(slot) = view.slot(s) else { break };
        if slot.key_len.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let word: Word = slot.word_acquire();
        let key_bytes = slot.key_bytes();
        let key = key_text(&key_bytes);
        let (mode, holder_pids) = if let Some(owner) = word.exclusive_owner() {
            ("exclusive", client_pid(view, owner).into_iter().collect())
        } else if word.shared_holders() > 0 {
            ("shared", holders.get(&s).cloned().unwrap_or_default())
        } else {
            ("free", Vec::new())
        };
        let fast_path = mode == "exclusive" && word.is_prepared();
        let held_since = slot.held_since_ms.load(Ordering::Relaxed);
        let held_for_ms = (mode != "free" && !fast_path && held_since != 0)
            .then(|| now_ms.saturating_sub(held_since));
        let waiter_count = slot.waiters.load(Ordering::Relaxed);
        rows.push(LockRow {
            key,
            key_bytes,
            slot: s,
            mode,
            holder_pids,
            holders: if mode == "shared" {
                word.shared_holders()
            } else {
                u32::from(mode == "exclusive")
            },
            fast_path,
            held_for_ms,
            waiter_count,
            // Nobody waits as far as the table knows; else asked below.
            waiters: (waiter_count == 0).then(Vec::new),
            token: slot
                .token_base
                .load(Ordering::Relaxed)
                .wrapping_add(u64::from(word.counter())),
            prepared: word.is_prepared(),
            owner_died: word.owner_died(),
            score: f32::from_bits(slot.score_bits.load(Ordering::Relaxed)),
            host: None,
        });
    }
    rows.sort_by(|a, b| a.key.cmp(&b.key));
    if let Ok(text) = std::fs::read_to_string(dir.join("cluster.json"))
        && let Ok(status) = serde_json::from_str::<serde_json::Value>(&text)
    {
        global_hosts(&status, &mut rows);
    }
    Ok(rows)
}

/// Fills [`LockRow::host`] for the global keys among `rows` from the
/// broker's `cluster.json` (`status`): `<node> (this host)` while this host
/// holds the node grant; the holder's node name while this host waits for
/// it (the host of the key's oldest etcd entry when it queued); `not here`
/// when this host neither holds nor waits for it (ask etcd, or `forelock
/// locks` on the other hosts).
pub fn global_hosts(status: &serde_json::Value, rows: &mut [LockRow]) {
    let Some(prefix) = status["key_prefix"].as_str() else {
        return;
    };
    let keys = status["keys"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for row in rows.iter_mut().filter(|r| r.key.starts_with(prefix)) {
        let entry = keys
            .iter()
            .find(|k| k["key"].as_str() == Some(row.key.as_str()));
        row.host = Some(match entry {
            Some(k) => match (k["state"].as_str(), k["holder"].as_str()) {
                (Some("held"), Some(node)) => format!("{node} (this host)"),
                (_, Some(node)) => node.to_string(),
                (_, None) => "unknown (queued)".to_string(),
            },
            None => "not here".to_string(),
        });
    }
}

/// Ask the broker serving `dir` who waits for each key of `rows` the table
/// says is waited for, within [`BROKER_TIMEOUT`] per question and
/// [`BROKER_BUDGET`] in all. Rows it did not answer for keep `waiters:
/// None`; the error says why.
pub fn ask_waiters(dir: &Path, rows: &mut [LockRow]) -> Result<(), String> {
    if rows.iter().all(|r| r.waiters.is_some()) {
        return Ok(());
    }
    let started = Instant::now();
    let mut observer =
        forelock::observe::Observer::connect(dir, BROKER_TIMEOUT).map_err(|e| e.to_string())?;
    for row in rows.iter_mut().filter(|r| r.waiters.is_none()) {
        if started.elapsed() > BROKER_BUDGET {
            return Err(format!(
                "forelockd took more than {BROKER_BUDGET:?} to answer for every key"
            ));
        }
        let answer = observer
            .waiters(&row.key_bytes)
            .map_err(|e| e.to_string())?;
        row.waiter_count = answer.total;
        row.waiters = Some(
            answer
                .waiters
                .iter()
                .map(|w| WaiterRow {
                    pid: w.pid,
                    shared: w.shared,
                })
                .collect(),
        );
    }
    Ok(())
}

pub fn run(args: &LocksArgs) -> anyhow::Result<i32> {
    let dir = args.runtime.dir();
    let mut rows = read(&dir)?;
    let unanswered = ask_waiters(&dir, &mut rows).err();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        if let Some(why) = &unanswered {
            eprintln!("forelock locks: waiters' pids unknown (\"waiters\": null): {why}");
        }
    } else {
        print!("{}", render(&rows, unanswered.as_deref()));
    }
    Ok(0)
}

/// The WAITERS cell: the count, and the pids in queue order when the broker
/// named them (`*`: a shared request).
fn waiters_cell(r: &LockRow) -> String {
    match &r.waiters {
        Some(list) if !list.is_empty() => {
            let mut pids: Vec<String> = list
                .iter()
                .take(PIDS_SHOWN)
                .map(|w| format!("{}{}", w.pid, if w.shared { "*" } else { "" }))
                .collect();
            if (r.waiter_count as usize) > pids.len() {
                pids.push("...".into());
            }
            format!("{} (pids {})", r.waiter_count, pids.join(","))
        }
        _ => r.waiter_count.to_string(),
    }
}

/// The text table of `forelock locks`; `unanswered` says why the broker did
/// not name the waiters, if it did not.
pub fn render(rows: &[LockRow], unanswered: Option<&str>) -> String {
    use std::fmt::Write as _;
    let header = [
        "KEY", "MODE", "PID", "HELD FOR", "WAITERS", "TOKEN", "PREPARED", "SCORE", "HOST",
    ];
    // The HOST column only on a clustered broker with global keys.
    let hosts = rows.iter().any(|r| r.host.is_some());
    let columns = if hosts { 9 } else { 8 };
    let mut table: Vec<[String; 9]> = vec![header.map(String::from)];
    for r in rows {
        let pid = match (r.mode, r.holder_pids.as_slice()) {
            ("free", _) => "-".into(),
            ("shared", []) => format!("{} holders", r.holders),
            (_, []) => "?".into(),
            (_, pids) => pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        let held = match (r.mode, r.held_for_ms) {
            ("free", _) => "-".into(),
            (_, Some(ms)) => format_ms(ms),
            (_, None) => "(fast path)".into(),
        };
        let mode = if r.owner_died {
            format!("{} (owner died)", r.mode)
        } else {
            r.mode.to_string()
        };
        table.push([
            r.key.clone(),
            mode,
            pid,
            held,
            waiters_cell(r),
            r.token.to_string(),
            if r.prepared { "yes" } else { "no" }.into(),
            format!("{:.2}", r.score),
            r.host.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .take(columns)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    match unanswered {
        None => {
            let _ = writeln!(
                out,
                "({} keys; waiters' pids in queue order, * = shared)",
                rows.len()
            );
        }
        Some(why) => {
            let _ = writeln!(
                out,
                "({} keys; waiters shown as a count only: {why})",
                rows.len()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_control_or_invalid_bytes_print_escaped() {
        assert_eq!(key_text(b"orders:42"), "orders:42");
        assert_eq!(key_text(b"a\nb"), "a\\nb");
        assert_eq!(key_text(b"a\xffb"), "a\\xffb");
    }

    fn row(key: &str, waiter_count: u32, waiters: Option<Vec<WaiterRow>>) -> LockRow {
        LockRow {
            key: key.into(),
            key_bytes: key.as_bytes().to_vec(),
            slot: 0,
            mode: "exclusive",
            holder_pids: vec![10],
            holders: 1,
            fast_path: false,
            held_for_ms: Some(5),
            waiter_count,
            waiters,
            token: 7,
            prepared: false,
            owner_died: false,
            score: 0.0,
            host: None,
        }
    }

    #[test]
    fn a_global_key_shows_which_host_holds_it_from_cluster_json() {
        let status = serde_json::json!({
            "node": "h2",
            "key_prefix": "global/",
            "keys": [
                {"key": "global/mine", "state": "held", "holder": "h2"},
                {"key": "global/theirs", "state": "queued", "holder": "h1"},
                {"key": "global/retried", "state": "queued", "holder": null},
            ],
        });
        let mut rows = [
            row("global/mine", 0, Some(vec![])),
            row("global/nobody-here", 0, Some(vec![])),
            row("global/retried", 1, None),
            row("global/theirs", 1, None),
            row("local", 0, Some(vec![])),
        ];
        global_hosts(&status, &mut rows);
        let hosts: Vec<Option<&str>> = rows.iter().map(|r| r.host.as_deref()).collect();
        assert_eq!(
            hosts,
            [
                Some("h2 (this host)"),
                Some("not here"),
                Some("unknown (queued)"),
                Some("h1"),
                None
            ]
        );
        let text = render(&rows, None);
        assert!(text.lines().next().unwrap().ends_with("HOST"), "{text}");
        let theirs = text
            .lines()
            .find(|l| l.starts_with("global/theirs"))
            .unwrap();
        assert!(theirs.ends_with("h1"), "{theirs}");
        let local = text.lines().find(|l| l.starts_with("local")).unwrap();
        assert!(local.ends_with('-'), "{local}");
        // A broker without [cluster] writes no cluster.json: no HOST column.
        let plain = [row("global/x", 0, Some(vec![]))];
        assert!(!render(&plain, None).contains("HOST"));
    }

    #[test]
    fn the_waiters_column_names_pids_in_queue_order_or_the_count_alone() {
        let w = |pid, shared| WaiterRow { pid, shared };
        let rows = [
            row("a", 0, Some(vec![])),
            row("b", 2, Some(vec![w(123, false), w(456, true)])),
            row("c", 3, None),
        ];
        let text = render(&rows, None);
        assert!(text.contains("2 (pids 123,456*)"), "{text}");
        assert!(text.contains("* = shared"), "{text}");
        let c = text.lines().find(|l| l.starts_with("c ")).unwrap();
        assert!(c.contains("  3  "), "{c}");

        let many: Vec<WaiterRow> = (1..=100).map(|p| w(p, false)).collect();
        let cell = waiters_cell(&row("d", 150, Some(many)));
        assert_eq!(cell, "150 (pids 1,2,3,4,5,6,7,8,9,10,...)");

        let text = render(&rows, Some("forelockd did not answer within 200ms"));
        assert!(
            text.contains("waiters shown as a count only: forelockd did not answer"),
            "{text}"
        );
    }
}
