//! `forelock locks`: one row per key in the table, like PostgreSQL's
//! `pg_locks`.
//!
//! Everything comes from shared memory: the lock word (mode, exclusive
//! owner, counter, PREPARED), the slot (token base, waiter count, grant time,
//! score) and the client records (pids; the broker-granted holds of each
//! client, which name shared holders). The broker keeps its queues in its own
//! memory, so waiters are a count, not pids.

use super::{RuntimeDirArg, format_ms, open_table};
use serde::Serialize;
use shm_layout::lockword::Word;
use shm_layout::sync::shm::Ordering;
use shm_layout::table::{CLIENT_ACTIVE, HOLD_SHARED, TableView};
use std::collections::HashMap;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct LocksArgs {
    #[command(flatten)]
    pub runtime: RuntimeDirArg,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct LockRow {
    pub key: String,
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
    /// Requests queued in the broker for this key.
    pub waiters: u32,
    /// Fencing token of the latest grant of this key.
    pub token: u64,
    pub prepared: bool,
    /// The previous holder died holding the lock; the next grant reports it.
    pub owner_died: bool,
    /// The forecaster's latest score for the key (0 when unscored).
    pub score: f32,
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
        let key = key_text(&slot.key_bytes());
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
        rows.push(LockRow {
            key,
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
            waiters: slot.waiters.load(Ordering::Relaxed),
            token: slot
                .token_base
                .load(Ordering::Relaxed)
                .wrapping_add(u64::from(word.counter())),
            prepared: word.is_prepared(),
            owner_died: word.owner_died(),
            score: f32::from_bits(slot.score_bits.load(Ordering::Relaxed)),
        });
    }
    rows.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(rows)
}

pub fn run(args: &LocksArgs) -> anyhow::Result<i32> {
    let rows = read(&args.runtime.dir())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render(&rows));
    }
    Ok(0)
}

/// The text table of `forelock locks`.
pub fn render(rows: &[LockRow]) -> String {
    use std::fmt::Write as _;
    let header = [
        "KEY", "MODE", "PID", "HELD FOR", "WAITERS", "TOKEN", "PREPARED", "SCORE",
    ];
    let mut table: Vec<[String; 8]> = vec![header.map(String::from)];
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
            r.waiters.to_string(),
            r.token.to_string(),
            if r.prepared { "yes" } else { "no" }.into(),
            format!("{:.2}", r.score),
        ]);
    }
    let mut widths = [0usize; 8];
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
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(
        out,
        "({} keys; waiters are queued in forelockd's memory, so only their count is shown)",
        rows.len()
    );
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
}
