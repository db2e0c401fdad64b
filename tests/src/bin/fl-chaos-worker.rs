//! The processes of the chaos test (`tests/tests/chaos.rs`):
//!
//! - `work`: a client that loops until `<run>/stop` exists: picks a checked
//!   key, takes it exclusive or shared (blocking, try, or with a timeout) and,
//!   holding it, runs the checks of the per-key resource described in
//!   `forelock_tests::chaos` (the module docs explain why they have no races);
//! - `scribble`: a client that keeps a few OTHER keys in the table (never the
//!   checked ones) and writes random values into their lock words and into
//!   the wait cells of client records, until `<run>/stop` exists; then writes
//!   its count of writes to `<run>/scribbles`.
//!
//! Violations go to `<run>/violations.log`, client errors and oddities to
//! `<run>/notes.log`; nothing is only printed.

use clap::{Parser, Subcommand};
use forelock_tests::chaos::{
    append, append_to, doom, is_doomed, key_dir, notes_path, open_append, stop_path,
    violations_path,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// The broker's runtime directory.
    #[arg(long)]
    dir: PathBuf,
    /// The checker's directory (keys/, doomed/, the logs).
    #[arg(long)]
    run: PathBuf,
    #[arg(long)]
    seed: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Work {
        /// This worker's number (never reused within a run).
        #[arg(long)]
        wid: u64,
        /// The checked keys, comma-separated, hottest first.
        #[arg(long)]
        keys: String,
    },
    Scribble {
        /// The keys whose lock words it scribbles, comma-separated (never
        /// the checked ones).
        #[arg(long)]
        keys: String,
    },
}

fn main() {
    let args = Args::parse();
    match args.cmd {
        Cmd::Work { wid, ref keys } => {
            let keys: Vec<String> = keys.split(',').map(String::from).collect();
            work(&args.dir, &args.run, args.seed, wid, &keys);
        }
        Cmd::Scribble { ref keys } => {
            let keys: Vec<String> = keys.split(',').map(String::from).collect();
            scribble(&args.dir, &args.run, args.seed, &keys);
        }
    }
}

// ---- work ---------------------------------------------------------------------

/// Relative weights of the checked keys: the first two are hot (contended,
/// kept prepared by the keep-alive policy), the last is rare (used about as
/// often as the keep-alive lapses, so its slot is often reclaimed between
/// uses and it takes the slow path).
const KEY_WEIGHTS: [u32; 5] = [40, 30, 15, 14, 1];

struct Worker<'a> {
    run: &'a Path,
    wid: u64,
    keys: &'a [String],
    /// Each key's log, open for appending.
    logs: Vec<File>,
    rng: StdRng,
}

fn work(dir: &Path, run: &Path, seed: u64, wid: u64, keys: &[String]) {
    assert!(
        keys.len() <= KEY_WEIGHTS.len(),
        "at most {} keys",
        KEY_WEIGHTS.len()
    );
    // A panic inside a section must not look like a live writer: doom this
    // worker first (marker excused, section closed), then die as usual.
    {
        let run = run.to_path_buf();
        let nkeys = keys.len();
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            append_to(
                &notes_path(&run),
                &format!("worker {wid} panicked: {info}\n"),
            );
            doom(&run, nkeys, wid);
            default_hook(info);
        }));
    }
    let logs = (0..keys.len())
        .map(|i| open_append(&key_dir(run, i).join("log")).expect("open a key's log"))
        .collect();
    let mut w = Worker {
        run,
        wid,
        keys,
        logs,
        rng: StdRng::seed_from_u64(seed ^ wid.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
    };
    let mut client = None;
    while !stop_path(run).exists() {
        let c = match &client {
            Some(c) => c,
            None => match forelock::Client::connect_to(dir) {
                Ok(c) => client.insert(c),
                Err(e) => {
                    w.note(&format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        match w.one_round(c) {
            Round::Done | Round::Exit => {}
            Round::Reconnect => {
                client = None;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let pause = w.rng.random_range(0..=3);
        std::thread::sleep(Duration::from_millis(pause));
    }
}

enum Round {
    Done,
    /// The client reported an error other than "held": start a new client.
    Reconnect,
    /// A release failed: exit (see `one_round`).
    Exit,
}

/// A critical section in progress (between `E` and `X`).
struct Section {
    key: usize,
    token: u64,
    exclusive: bool,
    /// Our `E` record, to find it in the log.
    enter: String,
    /// The log's length before our `E`.
    from: u64,
    /// Our marker's content.
    mine: String,
    holding_marker: bool,
}

impl Worker<'_> {
    fn note(&self, text: &str) {
        append_to(
            &notes_path(self.run),
            &format!("worker {}: {text}\n", self.wid),
        );
    }

    fn violation(&self, key: usize, text: &str) {
        append_to(
            &violations_path(self.run),
            &format!("{}: worker {}: {text}\n", self.keys[key], self.wid),
        );
    }

    fn pick_key(&mut self) -> usize {
        let weights = &KEY_WEIGHTS[..self.keys.len()];
        let mut r = self.rng.random_range(0..weights.iter().sum::<u32>());
        for (i, &w) in weights.iter().enumerate() {
            if r < w {
                return i;
            }
            r -= w;
        }
        unreachable!("r is below the sum of the weights")
    }

    /// Take `key` in a random mode with a random kind of call.
    fn acquire<'c>(
        &mut self,
        client: &'c forelock::Client,
        key: usize,
    ) -> Result<Option<forelock::LockGuard<'c>>, forelock::Error> {
        let name = self.keys[key].as_str();
        let exclusive = self.rng.random_bool(0.7);
        let timeout = Duration::from_millis(self.rng.random_range(1..=50));
        let result = match (exclusive, self.rng.random_range(0..3)) {
            (true, 0) => client.lock(name),
            (true, 1) => client.try_lock(name),
            (true, _) => client.lock_timeout(name, timeout),
            (false, 0) => client.lock_shared(name),
            (false, 1) => client.try_lock_shared(name),
            (false, _) => client.lock_shared_timeout(name, timeout),
        };
        match result {
            Ok(guard) => {
                if guard.is_shared() == exclusive {
                    self.violation(key, "asked for one mode, granted the other");
                }
                Ok(Some(guard))
            }
            Err(forelock::Error::WouldBlock { .. } | forelock::Error::Timeout { .. }) => Ok(None),
            Err(e) => {
                self.note(&format!("acquire {name}: {e}"));
                Err(e)
            }
        }
    }

    /// One round: take a key, check the resource inside; sometimes, still
    /// inside, take a second key (a later one: keys are taken in order, so
    /// workers cannot deadlock) and check its resource too. A client that
    /// holds a lock while another call waits in the broker's queue is what a
    /// scribbled wait cell can hurt.
    fn one_round(&mut self, client: &forelock::Client) -> Round {
        let key = self.pick_key();
        let mut round = Round::Done;
        let guard = match self.acquire(client, key) {
            Ok(Some(guard)) => guard,
            Ok(None) => return Round::Done,
            Err(_) => return Round::Reconnect,
        };
        let outer = self.enter(key, &guard);
        if key + 1 < self.keys.len() && self.rng.random_bool(0.35) {
            let second = self.rng.random_range(key + 1..self.keys.len());
            match self.acquire(client, second) {
                Ok(Some(inner_guard)) => {
                    let inner = self.enter(second, &inner_guard);
                    self.leave(inner);
                    self.release(second, inner_guard, &mut round);
                }
                Ok(None) => {}
                Err(_) => round = Round::Reconnect,
            }
        }
        self.leave(outer);
        self.release(key, guard, &mut round);
        if matches!(round, Round::Exit) {
            // The broker may still count a hold we gave up: die, so it
            // releases it (the driver reaps us and starts another worker).
            std::process::exit(3);
        }
        round
    }

    fn release(&mut self, key: usize, guard: forelock::LockGuard<'_>, round: &mut Round) {
        if let Err(e) = guard.release() {
            self.note(&format!("release {}: {e}; exiting", self.keys[key]));
            *round = Round::Exit;
        }
    }

    fn enter(&mut self, key: usize, guard: &forelock::LockGuard<'_>) -> Option<Section> {
        match self.try_enter(key, guard) {
            Ok(section) => Some(section),
            Err(e) => {
                // The checker's own files failed: report, never guess.
                self.note(&format!("checker I/O entering {}: {e}", self.keys[key]));
                None
            }
        }
    }

    fn leave(&mut self, section: Option<Section>) {
        let Some(section) = section else { return };
        let key = section.key;
        if let Err(e) = self.try_leave(section) {
            self.note(&format!("checker I/O leaving {}: {e}", self.keys[key]));
        }
    }

    /// The first half of the critical section: see `forelock_tests::chaos`.
    fn try_enter(
        &mut self,
        key: usize,
        guard: &forelock::LockGuard<'_>,
    ) -> std::io::Result<Section> {
        let (wid, token) = (self.wid, guard.token());
        let exclusive = !guard.is_shared();
        let died = guard.previous_owner_died();
        let dir = key_dir(self.run, key);
        let log = &mut self.logs[key];
        let from = log.seek(SeekFrom::End(0))?;
        let enter = format!(
            "E {wid} {token} {} {died} {}\n",
            if exclusive { "x" } else { "s" },
            guard.fast_path()
        );
        append(log, &enter)?;
        // From here on the section is open in the log: whatever fails, the
        // caller gets a Section, so that `X` is appended (an open section
        // would make every later entry look like an overlap).
        let mine = format!("{wid} {token}\n");
        let holding_marker = match self.enter_checks(key, &dir, token, exclusive, &mine) {
            Ok(holding_marker) => holding_marker,
            Err(e) => {
                self.note(&format!("checker I/O entering {}: {e}", self.keys[key]));
                false
            }
        };
        // Mostly short; now and then long, so that holds span broker kills
        // and stops and queues form behind them.
        let sleep_us = if self.rng.random_bool(0.05) {
            self.rng.random_range(20_000..=200_000)
        } else {
            self.rng.random_range(0..=2000)
        };
        std::thread::sleep(Duration::from_micros(sleep_us));
        Ok(Section {
            key,
            token,
            exclusive,
            enter,
            from,
            mine,
            holding_marker,
        })
    }

    /// Fencing, and the marker: ours if exclusive, no live writer's if shared.
    /// True if we hold the marker.
    fn enter_checks(
        &self,
        key: usize,
        dir: &Path,
        token: u64,
        exclusive: bool,
        mine: &str,
    ) -> std::io::Result<bool> {
        let wid = self.wid;
        let last = read_number(&dir.join("last"));
        if token <= last {
            self.violation(
                key,
                &format!("fencing: token {token} is not above {last}, the last exclusive holder's"),
            );
        }
        let marker = dir.join("writer");
        let mut holding_marker = false;
        if exclusive {
            holding_marker = self.take_marker(key, dir, mine)?;
            let tmp = dir.join(format!("last-{wid}"));
            std::fs::write(&tmp, format!("{token}\n"))?;
            std::fs::rename(&tmp, dir.join("last"))?;
        } else {
            self.check_no_live_writer(key, &marker, "entered shared");
        }
        Ok(holding_marker)
    }

    /// The second half: who appended after our `E`? Nobody, while we hold
    /// exclusive; no exclusive holder, while we hold shared. Then leave.
    /// `X` is appended whatever the checks' I/O did (see `try_enter`).
    fn try_leave(&mut self, section: Section) -> std::io::Result<()> {
        let sleep_us = self.rng.random_range(0..=1000);
        std::thread::sleep(Duration::from_micros(sleep_us));
        let (key, token) = (section.key, section.token);
        if let Err(e) = self.leave_checks(section) {
            self.note(&format!("checker I/O leaving {}: {e}", self.keys[key]));
        }
        append(&mut self.logs[key], &format!("X {} {token}\n", self.wid))
    }

    fn leave_checks(&self, section: Section) -> std::io::Result<()> {
        let Section {
            key,
            token,
            exclusive,
            enter,
            from,
            mine,
            mut holding_marker,
        } = section;
        let wid = self.wid;
        let dir = key_dir(self.run, key);
        let marker = dir.join("writer");
        let mut after = String::new();
        let mut reader = File::open(dir.join("log"))?;
        reader.seek(SeekFrom::Start(from))?;
        reader.read_to_string(&mut after)?;
        let mut seen_ours = false;
        for line in after.lines() {
            if line == enter.trim_end() {
                seen_ours = true;
                continue;
            }
            let f: Vec<&str> = line.split(' ').collect();
            if !seen_ours || f[0] != "E" || f.get(1) == Some(&wid.to_string().as_str()) {
                continue;
            }
            let other_exclusive = f.get(3) == Some(&"x");
            if exclusive || other_exclusive {
                self.violation(
                    key,
                    &format!(
                        "two holders inside: while inside {} with token {token}, saw {line:?}",
                        if exclusive { "exclusive" } else { "shared" }
                    ),
                );
            }
        }
        if !seen_ours {
            self.note(&format!("own entry {enter:?} not found in the log"));
        }
        if exclusive {
            if holding_marker && std::fs::read_to_string(&marker).ok().as_deref() != Some(&*mine) {
                self.violation(
                    key,
                    &format!(
                        "the writer marker changed while inside with token {token}: now {:?}",
                        std::fs::read_to_string(&marker).ok()
                    ),
                );
                holding_marker = false;
            }
            if holding_marker {
                std::fs::remove_file(&marker)?;
            }
        } else {
            self.check_no_live_writer(key, &marker, "was inside shared");
        }
        Ok(())
    }

    /// Put our marker in place; false if a live writer's is there (reported).
    fn take_marker(&self, key: usize, dir: &Path, mine: &str) -> std::io::Result<bool> {
        let marker = dir.join("writer");
        let tmp = dir.join(format!("writer-{}", self.wid));
        std::fs::write(&tmp, mine)?;
        let mut taken = false;
        for _ in 0..3 {
            match std::fs::hard_link(&tmp, &marker) {
                Ok(()) => {
                    taken = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            let Ok(found) = std::fs::read_to_string(&marker) else {
                continue; // removed meanwhile: try again
            };
            let owner = found.split(' ').next().and_then(|w| w.parse::<u64>().ok());
            match owner {
                Some(owner) if is_doomed(self.run, owner) => {
                    // Left by a holder that died inside: the owner-died case
                    // (whether the flag was reported is checked in the log:
                    // a shared holder may have been told first).
                    std::fs::rename(&tmp, &marker)?;
                    return Ok(true);
                }
                _ => {
                    self.violation(
                        key,
                        &format!(
                            "two writers: marker {:?} of a live worker present when entering \
                             exclusive with {}",
                            found.trim_end(),
                            mine.trim_end()
                        ),
                    );
                    break;
                }
            }
        }
        let _ = std::fs::remove_file(&tmp);
        Ok(taken)
    }

    fn check_no_live_writer(&self, key: usize, marker: &Path, when: &str) {
        let Ok(found) = std::fs::read_to_string(marker) else {
            return;
        };
        let owner = found.split(' ').next().and_then(|w| w.parse::<u64>().ok());
        if !owner.is_some_and(|o| is_doomed(self.run, o)) {
            self.violation(
                key,
                &format!(
                    "a live writer's marker {:?} present when it {when}",
                    found.trim_end()
                ),
            );
        }
    }
}

fn read_number(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

// ---- scribble -----------------------------------------------------------------

fn scribble(dir: &Path, run: &Path, seed: u64, keys: &[String]) {
    use shm_layout::lockword::{EXCLUSIVE, HOLDERS_SHIFT, OWNER_DIED, PREPARED, RESERVED_MASK};
    use shm_layout::table::{CELL_ABANDONED, CELL_GRANTED, CELL_WAITING, CLIENT_ACTIVE};
    use std::sync::atomic::Ordering;

    let mut rng = StdRng::seed_from_u64(seed ^ 0x5C81_BB1E);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(shm_layout::TABLE_FILE))
        .expect("open the table");
    // SAFETY: a shared mapping of the table file, which the broker keeps at its
    // size while it runs (it re-adopts the file on restart, never shrinks it);
    // this process writes it racily on purpose, only through atomics.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.expect("map the table");
    let len = map.len();
    // SAFETY:
    // - page-aligned and `len` bytes, mapped for as long as `map` lives, which
    //   outlives `view` (both locals of this function, `view` declared later);
    // - the pointer comes from a mutable borrow, so writes through the view's
    //   atomics are allowed.
    let view =
        unsafe { shm_layout::table::TableView::new(map.as_mut_ptr(), len) }.expect("a valid table");
    let geometry = view.geometry();
    let mut client: Option<forelock::Client> = None;
    let mut writes = 0u64;
    while !stop_path(run).exists() {
        // Keep the other keys in the table: take one now and then.
        if rng.random_bool(0.3) {
            if client.is_none() {
                client = forelock::Client::connect_to(dir).ok();
            }
            let mut failed = false;
            if let Some(c) = &client {
                let key = &keys[rng.random_range(0..keys.len())];
                let r = if rng.random_bool(0.5) {
                    c.lock_timeout(key, Duration::from_millis(5))
                } else {
                    c.lock_shared_timeout(key, Duration::from_millis(5))
                };
                failed = matches!(
                    r,
                    Err(ref e) if !matches!(
                        e,
                        forelock::Error::WouldBlock { .. } | forelock::Error::Timeout { .. }
                    )
                );
            }
            if failed {
                client = None;
            }
        }
        // The lock words of the other keys' slots.
        for index in 0..geometry.slot_count {
            let Some(slot) = view.slot(index) else { break };
            // The word is the seqlock of the key bytes: read it first, check
            // the key, and replace exactly that word. If the broker re-keyed
            // the slot meanwhile (maybe to a checked key), it bumped the
            // word's generation and the exchange fails: a checked key's word
            // is never written.
            //
            // Words that are unprepared and free are left alone: the broker
            // re-keys only such a slot, and it writes the new key's word with
            // a plain store computed from the word it loaded before writing
            // the key; a scribble in between could be taken by a client CAS
            // on the new key and then overwritten. A prepared or held word
            // leaves that state only through a broker CAS, which fails after
            // our exchange (and ours fails after it).
            let word = slot.word.load(Ordering::Acquire);
            let shape = shm_layout::lockword::Word(word);
            if !shape.is_prepared() && shape.is_free() {
                continue;
            }
            let key = slot.key_bytes();
            if !keys.iter().any(|k| k.as_bytes() == key) || !rng.random_bool(0.5) {
                continue;
            }
            let holder = u64::from(rng.random_range(0..4u32)) << HOLDERS_SHIFT;
            let value = match rng.random_range(0..5) {
                0 => rng.random::<u64>(),
                1 => word | RESERVED_MASK,
                2 => PREPARED | EXCLUSIVE | holder | rng.random_range(0..1000),
                3 => PREPARED | OWNER_DIED | rng.random_range(0..1000),
                _ => 0,
            };
            // Relaxed both ways: the store publishes nothing, and a failure
            // only means "leave this slot alone".
            if slot
                .word
                .compare_exchange(word, value, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                writes += 1;
            }
        }
        // Wait cells of registered clients: mostly the first two (a client
        // uses one per concurrent call, lowest first), sometimes any.
        let active: Vec<u32> = (0..geometry.client_count)
            .filter(|&i| {
                view.client(i)
                    .is_some_and(|c| c.state.load(Ordering::Relaxed) == CLIENT_ACTIVE)
            })
            .collect();
        for _ in 0..rng.random_range(1..=3) {
            if active.is_empty() {
                break;
            }
            let record = active[rng.random_range(0..active.len())];
            let Some(c) = view.client(record) else {
                continue;
            };
            let cell = if rng.random_bool(0.7) {
                rng.random_range(0..2)
            } else {
                rng.random_range(0..c.cells.len())
            };
            let state = match rng.random_range(0..5) {
                0 => CELL_WAITING,
                1 => CELL_GRANTED,
                2 => CELL_ABANDONED,
                3 => 0,
                _ => rng.random::<u32>(),
            };
            c.cells[cell].state.store(state, Ordering::Relaxed);
            c.cells[cell].token.store(rng.random(), Ordering::Relaxed);
            c.cells[cell].flags.store(rng.random(), Ordering::Relaxed);
            writes += 1;
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(2..=20)));
    }
    std::fs::write(run.join("scribbles"), format!("{writes}\n")).expect("write the count");
}
