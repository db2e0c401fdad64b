//! `forelock bench --cluster`: global keys, measured in one run beside the
//! local paths of the same broker and beside etcd's own RPCs on the same etcd.
//!
//! Set-up (all on loopback, no network namespaces): one etcd member on two
//! free 127.0.0.1 ports with its data directory on disk, and three
//! `forelockd`s ("hosts" `a`, `b`, `c`), each with its own runtime directory
//! and a `[cluster]` section pointing at that etcd. Clients are threads of
//! this process, each with its own connection to its host's broker.
//!
//! Sections:
//! 1. acquire+release of a global key whose node grant host `a` already
//!    holds, beside a prepared local key and an unprepared local key (a fresh
//!    key per operation) on the same broker;
//! 2. the first acquisition of a global key (a fresh key each time: the
//!    broker takes a node grant from etcd), beside etcd's own `Lock` RPC (and
//!    `Lock`+`Unlock`), one linearizable `Range` (a get) and one `Put`, made
//!    with the `etcd-client` crate from this process to the same etcd, and
//!    beside the agent's own node-grant transaction made from this process;
//!    again on a fourth broker `d` that does not spin while a request waits
//!    (`spin_waiters_us = 0`);
//! 3. one key alternating between hosts `a` and `b`: the wait of each
//!    acquisition, every one a node-grant handover through etcd;
//! 4. one key taken in a loop by two clients on each of the three hosts:
//!    throughput, waits, grants per host, node-grant handovers;
//! 5. a lock trace split across three hosts by client, every key global,
//!    with prediction off and on: acquire latency, the prefetch hit rate and
//!    what unused prefetches cost other hosts ([`section_trace`]);
//! 6. the same for synthetic patterns stated in full where prediction
//!    could pay: partitions of keys rotating among the hosts on a schedule
//!    ([`rotation_rows`]) and hosts sweeping rings of shards a third of a
//!    lap apart ([`sweep_rows`]) ([`section_synthetic`]), with first uses
//!    beside cached uses of the same run.
//!
//! Any failed lock, lost hold or overlap of two holders is an error: the
//! command then fails after printing what it measured. Timings are never
//! judged here; the ratios are printed for a reader.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use super::report::format_ns;
use super::support::{
    ChildGuard, TempDir, die_with_parent, etcd_log, find_binary, poll_until, spawn_loopback_etcd,
    start_forelockd,
};

/// How long any single acquisition may wait before the bench calls it a failure.
const LOCK_PATIENCE: Duration = Duration::from_secs(20);
/// Configuration of every broker's `[cluster]` section beyond node and etcd.
const CLUSTER_SETTINGS: &str =
    "lease_ttl_ms = 10000\nlock_delay_ms = 200\nmin_hold_ms = 5\nfence_margin_ms = 1000\n";
const HOSTS: [&str; 3] = ["a", "b", "c"];
/// A fourth broker, only for section 2's second row.
const QUIET_HOST: &str = "d";

/// Sizes of one run.
struct Sizes {
    local_ops: u64,
    unprepared_ops: u64,
    first_ops: u64,
    handovers: u64,
    contention: Duration,
    /// Section 5: how much of the trace (from its start) is replayed.
    trace: Duration,
    /// Section 6: how long the synthetic rotation runs.
    rotation: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                local_ops: 2_000,
                unprepared_ops: 1_000,
                first_ops: 20,
                handovers: 20,
                contention: Duration::from_millis(400),
                trace: Duration::from_millis(300),
                rotation: Duration::from_millis(1_200),
            }
        } else {
            Sizes {
                local_ops: 100_000,
                unprepared_ops: 20_000,
                first_ops: 300,
                handovers: 300,
                contention: Duration::from_secs(3),
                trace: Duration::from_secs(2),
                rotation: Duration::from_secs(6),
            }
        }
    }
}

/// One measured line of the table.
struct Row {
    section: &'static str,
    case: String,
    samples: u64,
    p50_ns: u64,
    p99_ns: u64,
    ops_per_s: f64,
    ratio: String,
    note: String,
}

struct Latencies {
    histogram: Histogram<u64>,
    elapsed: Duration,
}

impl Latencies {
    fn new() -> Latencies {
        Latencies {
            histogram: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds"),
            elapsed: Duration::ZERO,
        }
    }

    fn record(&mut self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.histogram.saturating_record(ns);
    }

    fn p50(&self) -> u64 {
        self.histogram.value_at_quantile(0.5)
    }

    fn p99(&self) -> u64 {
        self.histogram.value_at_quantile(0.99)
    }

    fn ops_per_s(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.histogram.len() as f64 / seconds
        } else {
            0.0
        }
    }

    fn row(&self, section: &'static str, case: &str, ratio: String, note: String) -> Row {
        Row {
            section,
            case: case.to_string(),
            samples: self.histogram.len(),
            p50_ns: self.p50(),
            p99_ns: self.p99(),
            ops_per_s: self.ops_per_s(),
            ratio,
            note,
        }
    }
}

fn ratio(ours: u64, theirs: u64, of: &str) -> String {
    if theirs == 0 {
        return String::new();
    }
    format!("{:.2}x {of}", ours as f64 / theirs as f64)
}

/// A single-member etcd on loopback, killed and removed on drop.
struct Etcd {
    url: String,
    version: String,
    _server: ChildGuard,
    _dir: TempDir,
}

fn start_etcd() -> anyhow::Result<Etcd> {
    let binary = find_binary("etcd")
        .context("etcd is not installed (Debian: apt-get install etcd-server)")?;
    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.lines().next().map(str::to_string))
        .unwrap_or_default();
    let dir = TempDir::new("cluster-etcd")?;
    let (mut server, client_port) = spawn_loopback_etcd(&binary, &dir)?;
    let url = format!("http://127.0.0.1:{client_port}");
    let address = format!("127.0.0.1:{client_port}");
    let ready = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        matches!(server.try_wait(), Ok(Some(_))) || std::net::TcpStream::connect(&address).is_ok()
    });
    if let Ok(Some(status)) = server.try_wait() {
        bail!("etcd exited at start ({status}): {}", etcd_log(&dir).trim());
    }
    if !ready {
        bail!("etcd did not listen on {address} within 30 s");
    }
    Ok(Etcd {
        url,
        version,
        _server: server,
        _dir: dir,
    })
}

/// One broker with a `[cluster]` section.
struct Host {
    name: &'static str,
    runtime_dir: PathBuf,
    // Field order: the broker stops before its directory is removed.
    _broker: ChildGuard,
    _dir: TempDir,
}

/// `FORELOCK_CLUSTER_KEEP_LOGS=<dir>`: each broker's log (and its
/// predictor's, and its last `cluster.json`) is copied there when the
/// broker stops, as `<n>-<host>-<file>` (`n` counts brokers in start
/// order). With `FORELOCK_BENCH_BROKER_LOG=warn,forelock::grant_timing=debug`
/// the logs hold the node grants' step timestamps.
const KEEP_LOGS_ENV: &str = "FORELOCK_CLUSTER_KEEP_LOGS";
/// `FORELOCK_CLUSTER_SECTIONS=2,5`: run only these sections.
const SECTIONS_ENV: &str = "FORELOCK_CLUSTER_SECTIONS";

impl Drop for Host {
    fn drop(&mut self) {
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let Some(keep) = std::env::var_os(KEEP_LOGS_ENV) else {
            return;
        };
        let keep = PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let files = [
            self._dir.path().join("forelockd.log"),
            self._dir.path().join("forelock-predictor.log"),
            self.runtime_dir.join("cluster.json"),
        ];
        for file in files {
            if let Some(name) = file.file_name() {
                let to = keep.join(format!("{n}-{}-{}", self.name, name.to_string_lossy()));
                let _ = std::fs::copy(&file, to);
            }
        }
    }
}

/// `start_host`'s `broker` for a broker that sleeps at once while a request
/// waits (the default spins up to `spin_waiters_us = 1000` for a local
/// release, which on two cores takes CPU from the agent and etcd while the
/// waiter waits for a node grant).
const NO_SPIN_WHILE_WAITING: &str = "[broker]\nspin_waiters_us = 0\n";
/// The allocator of sections 1-4: a key used a moment ago stays prepared.
const KEEP_ALIVE: &str = "policy = \"keep-alive\"\nkeep_alive_ms = 5000";

/// A broker with `[cluster]` for host `name`, `allocator` as the body of
/// its `[allocator]` section ([`KEEP_ALIVE`] but in section 5), and
/// `broker` as its `[broker]` section.
fn start_host(
    name: &'static str,
    etcd_url: &str,
    prefix: &str,
    broker: &str,
    allocator: &str,
) -> anyhow::Result<Host> {
    let binary = super::forelock::broker_binary()
        .context("forelockd is not beside this executable nor on PATH")?;
    let dir = TempDir::new(&format!("cluster-{name}"))?;
    let config = format!(
        "{broker}\n[allocator]\n{allocator}\n\n[table]\nslots = 65536\n\n\
         [cluster]\nnode = \"{name}\"\netcd = [\"{etcd_url}\"]\netcd_prefix = \"{prefix}\"\n\
         {CLUSTER_SETTINGS}"
    );
    let (broker, runtime_dir) = start_forelockd(&binary, dir.path(), &config)
        .with_context(|| format!("starting the broker of host {name}"))?;
    // The agent has a lease once cluster.json says so; until then a global
    // acquire would wait for it and the first measurement would include it.
    let status = runtime_dir.join("cluster.json");
    poll_until(Duration::from_secs(20), Duration::from_millis(20), || {
        std::fs::read_to_string(&status)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some()
    });
    Ok(Host {
        name,
        runtime_dir,
        _broker: broker,
        _dir: dir,
    })
}

fn connect(host: &Host) -> anyhow::Result<forelock::Client> {
    forelock::Client::connect_to(&host.runtime_dir)
        .with_context(|| format!("connecting to the broker of host {}", host.name))
}

/// acquire+release of `key` `ops` times on `client`; also how many were
/// granted on the fast path (a prepared slot, no broker round trip).
fn acquire_release(
    client: &forelock::Client,
    ops: u64,
    key: impl Fn(u64) -> String,
) -> anyhow::Result<(Latencies, u64)> {
    let mut latencies = Latencies::new();
    let mut fast = 0;
    let names: Vec<String> = (0..ops).map(&key).collect();
    let start = Instant::now();
    for name in &names {
        let t0 = Instant::now();
        let guard = client
            .lock_timeout(name, LOCK_PATIENCE)
            .with_context(|| format!("lock {name}"))?;
        if guard.fast_path() {
            fast += 1;
        }
        guard.release().with_context(|| format!("release {name}"))?;
        latencies.record(t0.elapsed());
    }
    latencies.elapsed = start.elapsed();
    Ok((latencies, fast))
}

/// Section 1: the cached global key beside the local paths of the same broker.
fn section_cached(host: &Host, sizes: &Sizes, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let client = connect(host)?;
    // Warm the prepared key: keep-alive prepares a key used a moment ago.
    let prepared = "bench/prepared";
    let warm = poll_until(Duration::from_secs(5), Duration::from_millis(5), || {
        client
            .lock_timeout(prepared, LOCK_PATIENCE)
            .and_then(|guard| {
                let fast = guard.fast_path();
                guard.release().map(|()| fast)
            })
            .unwrap_or(false)
    });
    if !warm {
        bail!("{prepared} was never prepared by the keep-alive policy within 5 s");
    }
    // The node grant of the cached key: taken once, kept by the broker.
    let cached = "global/cached";
    client
        .lock_timeout(cached, LOCK_PATIENCE)
        .with_context(|| format!("first lock of {cached}"))?
        .release()?;
    for _ in 0..100 {
        client.lock_timeout(cached, LOCK_PATIENCE)?.release()?;
    }
    let (global, global_fast) = acquire_release(&client, sizes.local_ops, |_| cached.into())?;
    let (local, local_fast) = acquire_release(&client, sizes.local_ops, |_| prepared.into())?;
    let run = std::process::id();
    let (unprepared, unprepared_fast) = acquire_release(&client, sizes.unprepared_ops, |i| {
        format!("bench/unprepared/{run}/{i}")
    })?;
    let of = |l: &Latencies| l.histogram.len();
    rows.push(global.row(
        "1 cached",
        "global key, node grant held here",
        format!(
            "{} p50, {:.2}x ops/s of prepared",
            ratio(global.p50(), local.p50(), "prepared"),
            global.ops_per_s() / local.ops_per_s().max(f64::MIN_POSITIVE)
        ),
        format!(
            "{global_fast}/{} fast path; {} p50 unprepared",
            of(&global),
            ratio(global.p50(), unprepared.p50(), "of")
        ),
    ));
    rows.push(local.row(
        "1 cached",
        "local key, prepared",
        String::from("reference"),
        format!("{local_fast}/{} fast path", of(&local)),
    ));
    rows.push(unprepared.row(
        "1 cached",
        "local key, unprepared (fresh key)",
        ratio(unprepared.p50(), local.p50(), "prepared"),
        format!("{unprepared_fast}/{} fast path", of(&unprepared)),
    ));
    Ok(())
}

/// The same etcd through its own RPCs: Lock, Lock+Unlock, Range, Put.
struct EtcdRpcs {
    lock: Latencies,
    lock_unlock: Latencies,
    get: Latencies,
    put: Latencies,
    /// `etcd_lock::queue_and_look` on a free key: the agent's etcd work of a
    /// first acquisition, without the broker and its agent thread.
    grant_txn: Latencies,
}

/// A current-thread runtime for etcd-client, a client connected to `url`
/// and a 300 s lease: what the etcd measurements run on.
fn etcd_session(url: &str) -> anyhow::Result<(tokio::runtime::Runtime, etcd_client::Client, i64)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a tokio runtime for etcd-client")?;
    let (client, lease) = runtime.block_on(async {
        let mut client = etcd_client::Client::connect([url], None)
            .await
            .context("etcd-client connect")?;
        let lease = client
            .lease_grant(300, None)
            .await
            .context("etcd lease grant")?
            .id();
        anyhow::Ok((client, lease))
    })?;
    Ok((runtime, client, lease))
}

fn etcd_rpcs(url: &str, ops: u64) -> anyhow::Result<EtcdRpcs> {
    let (runtime, mut client, lease) = etcd_session(url)?;
    runtime.block_on(async {
        let options = || Some(etcd_client::LockOptions::new().with_lease(lease));
        let name = format!("/forelock-bench-{}/etcd-lock", std::process::id());
        // Warm the channel and etcd's lock service.
        for _ in 0..5 {
            let key = client.lock(name.as_str(), options()).await?.key().to_vec();
            client.unlock(key).await?;
        }
        let mut rpcs = EtcdRpcs {
            lock: Latencies::new(),
            lock_unlock: Latencies::new(),
            get: Latencies::new(),
            put: Latencies::new(),
            grant_txn: Latencies::new(),
        };
        let start = Instant::now();
        for _ in 0..ops {
            let t0 = Instant::now();
            let key = client
                .lock(name.as_str(), options())
                .await
                .context("etcd Lock")?
                .key()
                .to_vec();
            rpcs.lock.record(t0.elapsed());
            client.unlock(key).await.context("etcd Unlock")?;
            rpcs.lock_unlock.record(t0.elapsed());
        }
        let elapsed = start.elapsed();
        rpcs.lock.elapsed = elapsed;
        rpcs.lock_unlock.elapsed = elapsed;
        // The agent's own first step, from this process: the one
        // transaction that queues, wins and confirms a free key.
        let prefix = format!("/forelock-bench-{}-direct", std::process::id());
        let start = Instant::now();
        for i in 0..ops {
            let key = format!("global/direct/{i}");
            let names =
                forelock_cluster::etcd_lock::Names::new(&prefix, key.as_bytes(), false, lease);
            let t0 = Instant::now();
            let queued =
                forelock_cluster::etcd_lock::queue_and_look(&client, &names, "bench", lease, false)
                    .await
                    .context("the node-grant transaction")?;
            rpcs.grant_txn.record(t0.elapsed());
            if !matches!(
                queued,
                forelock_cluster::etcd_lock::Queued::Confirmed { .. }
            ) {
                bail!("the node-grant transaction on a fresh key did not confirm: {queued:?}");
            }
        }
        rpcs.grant_txn.elapsed = start.elapsed();
        let probe = format!("/forelock-bench-{}/probe", std::process::id());
        client.put(probe.as_str(), "x", None).await?;
        let start = Instant::now();
        for _ in 0..ops {
            let t0 = Instant::now();
            client
                .get(probe.as_str(), None)
                .await
                .context("etcd Range")?;
            rpcs.get.record(t0.elapsed());
        }
        rpcs.get.elapsed = start.elapsed();
        let start = Instant::now();
        for _ in 0..ops {
            let t0 = Instant::now();
            client
                .put(probe.as_str(), "x", None)
                .await
                .context("etcd Put")?;
            rpcs.put.record(t0.elapsed());
        }
        rpcs.put.elapsed = start.elapsed();
        client.lease_revoke(lease).await.ok();
        Ok(rpcs)
    })
}

/// etcd's `Lock` RPC made from this thread between two first acquisitions
/// (a fresh lease-attached lock key each time, unlocked after it), so that
/// both see etcd in the same state: after a pause of the same length
/// (measured on this VM: a `Lock` issued after a 2 ms pause took 790-870 us
/// against 540-560 us back-to-back, the same for any request: etcd and its
/// client sleep between requests, and waking them costs). Every other
/// time, the agent's node-grant transaction on a fresh key instead of
/// `Lock`: the etcd work of a first acquisition in that same state, which
/// splits a first acquisition into etcd's part and the hops around it.
struct LockInTurn {
    runtime: tokio::runtime::Runtime,
    client: etcd_client::Client,
    lease: i64,
    name: String,
    lock: Latencies,
    grant_txn: Latencies,
}

impl LockInTurn {
    fn new(url: &str) -> anyhow::Result<LockInTurn> {
        let (runtime, client, lease) = etcd_session(url)?;
        Ok(LockInTurn {
            runtime,
            client,
            lease,
            name: format!("/forelock-bench-{}/etcd-lock-in-turn", std::process::id()),
            lock: Latencies::new(),
            grant_txn: Latencies::new(),
        })
    }

    /// The `i`th request in turn: `Lock` when `i` is even, else the
    /// node-grant transaction.
    fn once(&mut self, i: u64) -> anyhow::Result<()> {
        if i % 2 == 0 {
            return self.lock_once();
        }
        let prefix = format!("/forelock-bench-{}-in-turn", std::process::id());
        let key = format!("global/in-turn/{i}");
        let names =
            forelock_cluster::etcd_lock::Names::new(&prefix, key.as_bytes(), false, self.lease);
        let t0 = Instant::now();
        let queued = self
            .runtime
            .block_on(forelock_cluster::etcd_lock::queue_and_look(
                &self.client,
                &names,
                "bench",
                self.lease,
                false,
            ))
            .context("the node-grant transaction")?;
        self.grant_txn.record(t0.elapsed());
        if !matches!(
            queued,
            forelock_cluster::etcd_lock::Queued::Confirmed { .. }
        ) {
            bail!("the node-grant transaction on a fresh key did not confirm: {queued:?}");
        }
        Ok(())
    }

    fn lock_once(&mut self) -> anyhow::Result<()> {
        let options = Some(etcd_client::LockOptions::new().with_lease(self.lease));
        let t0 = Instant::now();
        let key = self
            .runtime
            .block_on(self.client.lock(self.name.as_str(), options))
            .context("etcd Lock")?
            .key()
            .to_vec();
        self.lock.record(t0.elapsed());
        self.runtime
            .block_on(self.client.unlock(key))
            .context("etcd Unlock")?;
        Ok(())
    }
}

/// `ops` first acquisitions on `host` (a fresh global key each time): the
/// acquire alone, and acquire+release. The release of a fresh global key is
/// local (the node grant stays here, as a cached key). With `in_turn`, an
/// etcd `Lock` RPC or the node-grant transaction follows each acquisition
/// (in turn: [`LockInTurn::once`]).
fn first_acquisitions(
    host: &Host,
    ops: u64,
    mut in_turn: Option<&mut LockInTurn>,
) -> anyhow::Result<(Latencies, Latencies)> {
    let client = connect(host)?;
    let run = std::process::id();
    let mut first = Latencies::new();
    let mut first_cycle = Latencies::new();
    let start = Instant::now();
    // Keys of their own for the acquisitions in turn with Lock.
    let tag = if in_turn.is_some() {
        "in-turn"
    } else {
        "alone"
    };
    for i in 0..ops {
        let name = format!("global/first/{run}/{}/{tag}/{i}", host.name);
        let t0 = Instant::now();
        let guard = client
            .lock_timeout(&name, LOCK_PATIENCE)
            .with_context(|| format!("lock {name}"))?;
        first.record(t0.elapsed());
        guard.release().with_context(|| format!("release {name}"))?;
        first_cycle.record(t0.elapsed());
        if let Some(lock) = in_turn.as_deref_mut() {
            lock.once(i)?;
        }
    }
    first.elapsed = start.elapsed();
    first_cycle.elapsed = first.elapsed;
    if let Some(lock) = in_turn {
        lock.lock.elapsed = first.elapsed;
        lock.grant_txn.elapsed = first.elapsed;
    }
    Ok((first, first_cycle))
}

/// Section 2: first acquisitions (node grants) beside etcd's own RPCs, on
/// `host` (the default broker configuration) and on `quiet` (a broker that
/// does not spin while a request waits).
fn section_first(
    host: &Host,
    quiet: &Host,
    etcd: &Etcd,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let (first, first_cycle) = first_acquisitions(host, sizes.first_ops, None)?;
    let (quiet_first, _) = first_acquisitions(quiet, sizes.first_ops, None)?;
    // Once more, each acquisition followed by an etcd Lock RPC.
    let mut in_turn = LockInTurn::new(&etcd.url)?;
    let (first_in_turn, _) = first_acquisitions(host, sizes.first_ops, Some(&mut in_turn))?;
    let rpcs = etcd_rpcs(&etcd.url, sizes.first_ops)?;
    rows.push(first.row(
        "2 first",
        "global key, first acquire (node grant)",
        format!(
            "{}, {}",
            ratio(first.p50(), rpcs.lock.p50(), "etcd Lock"),
            ratio(first.p50(), rpcs.get.p50(), "get")
        ),
        String::from("fresh key each time; ops/s = acquire+release cycles"),
    ));
    rows.push(quiet_first.row(
        "2 first",
        &format!("the same, on host {}: spin_waiters_us = 0", quiet.name),
        ratio(quiet_first.p50(), rpcs.lock.p50(), "etcd Lock"),
        String::from("the broker sleeps while its client waits for the node grant"),
    ));
    rows.push(first_cycle.row(
        "2 first",
        "global key, first acquire + release",
        ratio(
            first_cycle.p50(),
            rpcs.lock_unlock.p50(),
            "etcd Lock+Unlock",
        ),
        String::from("release is local: the node grant stays cached"),
    ));
    rows.push(rpcs.lock.row(
        "2 first",
        "etcd Lock RPC (etcd-client)",
        String::from("reference"),
        String::from("same etcd, one lease, uncontended, back-to-back"),
    ));
    rows.push(first_in_turn.row(
        "2 first",
        "global key, first acquire, in turn with etcd Lock",
        ratio(first_in_turn.p50(), in_turn.lock.p50(), "etcd Lock in turn"),
        String::from(
            "each first acquisition followed by one etcd Lock (+Unlock) or node-grant txn from this thread",
        ),
    ));
    rows.push(in_turn.lock.row(
        "2 first",
        "etcd Lock RPC, in turn with first acquisitions",
        String::from("reference in turn"),
        String::from("the same etcd in the same state as for the row above"),
    ));
    rows.push(in_turn.grant_txn.row(
        "2 first",
        "node-grant txn alone, in turn with first acquisitions",
        ratio(
            in_turn.grant_txn.p50(),
            in_turn.lock.p50(),
            "etcd Lock in turn",
        ),
        String::from("a first acquisition's etcd work in that state; the rest is hops"),
    ));
    rows.push(rpcs.lock_unlock.row(
        "2 first",
        "etcd Lock + Unlock RPCs",
        String::new(),
        String::new(),
    ));
    rows.push(rpcs.grant_txn.row(
        "2 first",
        "node-grant txn alone (etcd-client)",
        ratio(rpcs.grant_txn.p50(), rpcs.lock.p50(), "etcd Lock"),
        String::from("queue+win+confirm of a free key, one txn, from this process"),
    ));
    rows.push(rpcs.get.row(
        "2 first",
        "etcd get (one round trip)",
        String::new(),
        String::from("linearizable Range, no disk write"),
    ));
    rows.push(rpcs.put.row(
        "2 first",
        "etcd put (one write)",
        String::new(),
        String::from("one raft entry, fsync"),
    ));
    Ok(())
}

/// Section 3: one key alternating between two hosts; each acquisition
/// after the first is a node-grant handover through etcd.
fn section_transfer(
    first: &Host,
    second: &Host,
    sizes: &Sizes,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let key = format!("global/transfer/{}", std::process::id());
    // A turn is its number; None stops the other side.
    let (to_first, first_turns) = mpsc::channel::<Option<u64>>();
    let (to_second, second_turns) = mpsc::channel::<Option<u64>>();
    let last_turn = sizes.handovers;
    let side = |host: &Host,
                turns: mpsc::Receiver<Option<u64>>,
                next: mpsc::Sender<Option<u64>>|
     -> anyhow::Result<Latencies> {
        let client = connect(host)?;
        let mut waits = Latencies::new();
        let start = Instant::now();
        while let Ok(Some(turn)) = turns.recv() {
            let t0 = Instant::now();
            let guard = match client.lock_timeout(&key, LOCK_PATIENCE) {
                Ok(guard) => guard,
                Err(error) => {
                    let _ = next.send(None);
                    return Err(error).with_context(|| format!("host {}: lock {key}", host.name));
                }
            };
            // Turn 0 takes the key from nobody: not a handover.
            if turn > 0 {
                waits.record(t0.elapsed());
            }
            let released = guard.release();
            let stop = released.is_err() || turn >= last_turn;
            let _ = next.send(if stop { None } else { Some(turn + 1) });
            released.with_context(|| format!("host {}: release {key}", host.name))?;
            if stop {
                break;
            }
        }
        waits.elapsed = start.elapsed();
        Ok(waits)
    };
    let (first_waits, second_waits) = std::thread::scope(|scope| {
        let a = scope.spawn(|| side(first, first_turns, to_second));
        let b = scope.spawn(|| side(second, second_turns, to_first.clone()));
        let _ = to_first.send(Some(0));
        let first_waits = a.join().expect("transfer thread a panicked");
        let second_waits = b.join().expect("transfer thread b panicked");
        (first_waits, second_waits)
    });
    let (first_waits, second_waits) = (first_waits?, second_waits?);
    let mut all = Latencies::new();
    all.histogram
        .add(&first_waits.histogram)
        .context("merging histograms")?;
    all.histogram
        .add(&second_waits.histogram)
        .context("merging histograms")?;
    all.elapsed = first_waits.elapsed.max(second_waits.elapsed);
    if all.histogram.len() != last_turn {
        bail!(
            "transfer: {} handovers measured, {last_turn} expected",
            all.histogram.len()
        );
    }
    rows.push(all.row(
        "3 transfer",
        &format!("handover {} <-> {}, one key", first.name, second.name),
        String::new(),
        format!(
            "acquire wait while the other host holds the node grant; p50 on {}: {}, on {}: {}",
            first.name,
            format_ns(first_waits.p50()),
            second.name,
            format_ns(second_waits.p50())
        ),
    ));
    Ok(())
}

/// Section 4: two clients on each of three hosts take one key in a loop.
fn section_contention(hosts: &[Host], sizes: &Sizes, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const CLIENTS_PER_HOST: usize = 2;
    let key = format!("global/contended/{}", std::process::id());
    let inside = AtomicBool::new(false);
    let overlaps = AtomicU64::new(0);
    // The token high bits (the node grant's etcd revision) of the last
    // holder, and how often they changed: node-grant handovers.
    let last_grant = Mutex::new((0u64, 0u64));
    let tokens_decreased = AtomicU64::new(0);
    let deadline = Instant::now() + sizes.contention;
    let worker = |host: &Host| -> anyhow::Result<(Latencies, u64)> {
        let client = connect(host)?;
        let mut waits = Latencies::new();
        let mut grants = 0u64;
        let start = Instant::now();
        while Instant::now() < deadline {
            let t0 = Instant::now();
            let guard = client
                .lock_timeout(&key, LOCK_PATIENCE)
                .with_context(|| format!("host {}: lock {key}", host.name))?;
            waits.record(t0.elapsed());
            if inside.swap(true, Ordering::SeqCst) {
                overlaps.fetch_add(1, Ordering::Relaxed);
            }
            let token = guard.token();
            {
                let mut last = last_grant.lock().expect("poisoned");
                if token <= last.0 {
                    tokens_decreased.fetch_add(1, Ordering::Relaxed);
                }
                if token >> TOKEN_COUNTER_BITS != last.0 >> TOKEN_COUNTER_BITS {
                    last.1 += 1;
                }
                last.0 = token;
            }
            inside.store(false, Ordering::SeqCst);
            guard
                .release()
                .with_context(|| format!("host {}: release {key}", host.name))?;
            grants += 1;
        }
        waits.elapsed = start.elapsed();
        Ok((waits, grants))
    };
    let results: Vec<(usize, anyhow::Result<(Latencies, u64)>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = hosts
            .iter()
            .enumerate()
            .flat_map(|(i, host)| (0..CLIENTS_PER_HOST).map(move |_| (i, host)))
            .map(|(i, host)| (i, scope.spawn(move || worker(host))))
            .collect();
        handles
            .into_iter()
            .map(|(i, handle)| (i, handle.join().expect("contention thread panicked")))
            .collect()
    });
    let mut all = Latencies::new();
    let mut per_host = vec![0u64; hosts.len()];
    for (i, result) in results {
        let (waits, grants) = result?;
        all.histogram
            .add(&waits.histogram)
            .context("merging histograms")?;
        all.elapsed = all.elapsed.max(waits.elapsed);
        per_host[i] += grants;
    }
    let overlaps = overlaps.load(Ordering::Relaxed);
    let decreased = tokens_decreased.load(Ordering::Relaxed);
    if overlaps > 0 || decreased > 0 {
        bail!("contention: {overlaps} overlapping holders, {decreased} tokens not increasing");
    }
    if per_host.iter().all(|&grants| grants == 0) {
        bail!("contention: no grants at all");
    }
    let handovers = last_grant.lock().expect("poisoned").1;
    let spread = hosts
        .iter()
        .zip(&per_host)
        .map(|(host, grants)| format!("{}={grants}", host.name))
        .collect::<Vec<_>>()
        .join(" ");
    rows.push(all.row(
        "4 contention",
        &format!(
            "one key, {} hosts x {CLIENTS_PER_HOST} clients",
            hosts.len()
        ),
        String::new(),
        format!("grants {spread}; {handovers} node grants; 0 overlaps"),
    ));
    Ok(())
}

/// Section 5's trace, unless `FORELOCK_CLUSTER_TRACE` names another: the
/// issue's `../shared/traces/tpcc-pg-a.csv.gz`, from the working directory
/// or from the repository this was built from.
const TRACE_ENV: &str = "FORELOCK_CLUSTER_TRACE";
const TRACE_NAME: &str = "tpcc-pg-a.csv.gz";
/// A replayed hold lasts at most this long (the trace's median is 9 ms, as
/// long as its transactions; one at a time, a client would fall behind).
const TRACE_HOLD_CAP: Duration = Duration::from_millis(1);
/// Prediction off and on: the allocator policy of each host's broker, and
/// whether a `forelock-predictor` runs beside it. Off is `keep-alive` (not
/// `none`, which keeps every key off the fast path): both modes then have
/// the same fast path and the same 200 ms idle timeout, and differ only by
/// the forecast.
const TRACE_MODES_ENV: &str = "FORELOCK_CLUSTER_TRACE_MODES";
const TRACE_MODES: [(&str, &str, bool, Option<&str>); 2] = [
    ("off", "keep-alive", false, None),
    ("on", "forecast", true, None),
];
/// Section 6 adds a third mode: the forecaster's successor model alone
/// (`model = "successor"`), the rung of its ladder made for "after these
/// keys, those", beside its default (`online`, which picks among the rungs
/// by their recent losses).
const SYNTHETIC_MODES: [(&str, &str, bool, Option<&str>); 3] = [
    ("off", "keep-alive", false, None),
    ("on", "forecast", true, None),
    ("on, successor model", "forecast", true, Some("successor")),
];

/// One mode of sections 5 and 6: its name, the brokers' allocator policy,
/// whether a `forelock-predictor` runs beside each broker, and that
/// predictor's model (its default if `None`).
struct TraceMode {
    name: String,
    policy: String,
    predict: bool,
    model: Option<String>,
}

fn trace_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(TRACE_ENV) {
        return Some(PathBuf::from(path));
    }
    [
        PathBuf::from("../shared/traces").join(TRACE_NAME),
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/traces")
            .join(TRACE_NAME),
    ]
    .into_iter()
    .find(|path| path.is_file())
}

/// One row of the trace as a client replays it.
#[derive(Clone, Copy)]
struct TraceRow {
    key_hash: u64,
    shared: bool,
    hold: Duration,
    /// When the row starts, from the replay's start (section 6's paced
    /// rows); `None`: as soon as the client's previous row is released
    /// (section 5's closed loop). A paced client that falls behind starts
    /// its next row at once.
    at: Option<Duration>,
    /// What the row is in the synthetic pattern (section 6), which the
    /// replay keeps latencies of apart.
    kind: RowKind,
}

/// The rows of section 6 by what their host has of the key when they start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RowKind {
    /// A trace row (section 5): not told apart.
    Trace,
    /// The host's first use of the key in this phase: its node grant is at
    /// the host that had the partition before, unless a prefetch brought it.
    FirstInPhase,
    /// The key again on the same host in the same phase: its node grant is
    /// here (cached), unless another host took it meanwhile.
    Again,
}

/// What one mode of section 5 measured.
struct TraceRun {
    latencies: Latencies,
    /// Section 6 only: the rows that were the host's first use of their key
    /// in the phase, and the rows that used it again.
    first_in_phase: Latencies,
    again: Latencies,
    /// Section 6: again rows not granted on the fast path (the key's node
    /// grant had gone, or its slot was not prepared yet).
    again_slow: u64,
    /// Summed over the hosts' cluster.json.
    prefetch_hits: u64,
    first_uses_waited: u64,
    prefetch_unused: u64,
    prefetch_unused_wait_us: u64,
    /// CPU time (user + system) the hosts' predictors used, summed.
    predictor_cpu: Duration,
}

/// CPU time (user + system) process `pid` has used so far, from
/// `/proc/<pid>/stat` (fields 14 and 15, in clock ticks).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf takes a plain integer and reads no memory of ours.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_s > 0).then(|| Duration::from_millis(ticks * 1000 / per_s as u64))
}

/// How many rows, in trace order, take a key on a host that used it
/// before while another host used it since: the first uses a prefetch
/// could serve at best. A host's first use of a key is unknown to its
/// broker (its forecaster has never seen the key), and a key used again
/// on the same host with no other host in between still has its node
/// grant here: neither can be a prefetch hit.
fn returning_first_uses(per_client: &[Vec<TraceRow>], order: &[(u64, usize, usize)]) -> usize {
    let mut seen: std::collections::HashSet<(usize, u64)> = std::collections::HashSet::new();
    let mut last_host: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut returning = 0;
    for &(_, client, index) in order {
        let host = client % HOSTS.len();
        let key = per_client[client][index].key_hash;
        if seen.contains(&(host, key)) && last_host.get(&key) != Some(&host) {
            returning += 1;
        }
        seen.insert((host, key));
        last_host.insert(key, host);
    }
    returning
}

/// Section 5: the first `seconds` of a lock trace split across three hosts
/// by client (trace client `c` runs on host `c % 3`), every key global
/// (`global/<16 hex digits of the trace key's hash>`), with prediction off
/// (allocator policy `keep-alive`: nothing is prefetched) and on (`forecast`, with
/// a `forelock-predictor` per host: a global key it scores above the
/// threshold has its node grant prefetched). Each mode runs on three fresh
/// brokers with an etcd prefix of its own. Each client replays its rows in
/// order, one at a time and as fast as it can (a closed loop: a row starts
/// when the previous one is released, not at its `ts_us`; paced at the
/// trace's own rate, every client fell behind at once and more than 90% of
/// the rows were skipped): acquire (measured), hold `min(hold_us, 1 ms)`,
/// release; so no client holds two keys and no wait can be a deadlock
/// across hosts.
fn section_trace(etcd: &Etcd, sizes: &Sizes, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let Some(path) = trace_path() else {
        bail!(
            "no trace: set {TRACE_ENV} to a lock trace (the format of shared/traces/README.md), \
             e.g. tpcc-pg-a.csv.gz"
        );
    };
    let trace = forelock_predictor::trace::read_trace_file(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    let limit_us = sizes.trace.as_micros() as u64;
    let mut per_client: Vec<Vec<TraceRow>> = Vec::new();
    let mut order = Vec::new();
    for event in trace.events.iter().take_while(|e| e.ts_us < limit_us) {
        let client = event.client as usize;
        if per_client.len() <= client {
            per_client.resize(client + 1, Vec::new());
        }
        order.push((event.ts_us, client, per_client[client].len()));
        per_client[client].push(TraceRow {
            key_hash: event.key_hash,
            shared: event.mode == forelock_predictor::trace::Mode::Shared,
            hold: Duration::from_micros(event.hold_us).min(TRACE_HOLD_CAP),
            at: None,
            kind: RowKind::Trace,
        });
    }
    let total: usize = per_client.iter().map(Vec::len).sum();
    let keys: std::collections::HashSet<u64> = per_client
        .iter()
        .flatten()
        .map(|row| row.key_hash)
        .collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let returning = returning_first_uses(&per_client, &order);
    for mode in trace_modes(&TRACE_MODES) {
        let run = trace_mode(etcd, "trace", &mode, &per_client)?;
        let mode = &mode.name;
        let first_uses = run.prefetch_hits + run.first_uses_waited;
        let hit_rate = if first_uses > 0 {
            run.prefetch_hits as f64 / first_uses as f64
        } else {
            0.0
        };
        rows.push(run.latencies.row(
            "5 trace",
            &format!(
                "{name} first {} s, prediction {mode}",
                sizes.trace.as_secs_f64()
            ),
            String::new(),
            format!(
                "{total} rows, {} keys, {} clients on 3 hosts; \
                 prefetch hit rate {:.1}% ({}/{first_uses} first uses of a node grant; \
                 {returning} rows in trace order come back to a host that used their key \
                 after another host did: the most a prefetch could serve); \
                 {} unused prefetches cost other hosts {} waiting; predictors' CPU {:.1} s",
                keys.len(),
                per_client.iter().filter(|r| !r.is_empty()).count(),
                hit_rate * 100.0,
                run.prefetch_hits,
                run.prefetch_unused,
                format_ns(run.prefetch_unused_wait_us.saturating_mul(1000)),
                run.predictor_cpu.as_secs_f64(),
            ),
        ));
    }
    Ok(())
}

/// Section 6's pattern: partitions rotating among hosts (a batch job or a
/// shard migration that moves on on a schedule). Time is cut into phases
/// of [`ROTATION_PHASE`]; in phase `e`, host `h` works on partition
/// `(2h + e) mod 6`, so each host goes through all six partitions in turn
/// (one cycle of six phases), and each partition passes from host `h` to
/// host `h - 1` with one idle phase between them. A partition is
/// [`ROTATION_KEYS`] global keys; each host's two clients split its keys
/// (even and odd), and each takes its four keys in an order shuffled per
/// phase, round after round, one row every 4-6 ms (uniform), each held
/// 0.5 ms, until the phase ends. Everything random comes from
/// [`SYNTHETIC_SEED_ENV`] (default 1).
const ROTATION_PARTITIONS: u64 = 6;
const ROTATION_KEYS: u64 = 8;
const ROTATION_PHASE: Duration = Duration::from_millis(150);
const ROTATION_CLIENTS_PER_HOST: usize = 2;
const ROTATION_HOLD: Duration = Duration::from_micros(500);
/// `FORELOCK_CLUSTER_SEED=<u64>`: the seed of section 6's patterns.
const SYNTHETIC_SEED_ENV: &str = "FORELOCK_CLUSTER_SEED";

/// splitmix64: the next value of the stream `state`.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d1_049b_b133_111b);
    z ^ (z >> 31)
}

/// Section 6's rows per client (client `c` on host `c % 3`), for `length`
/// of replay: see [`ROTATION_PHASE`].
fn rotation_rows(seed: u64, length: Duration) -> Vec<Vec<TraceRow>> {
    let hosts = HOSTS.len();
    let key_hash = |partition: u64, key: u64| {
        let mut state = seed ^ (partition << 32 | key);
        splitmix64(&mut state)
    };
    let mut per_client = vec![Vec::new(); hosts * ROTATION_CLIENTS_PER_HOST];
    let mut rng = seed;
    let phases = (length.as_micros() / ROTATION_PHASE.as_micros()) as u64;
    for phase in 0..phases {
        let phase_start = ROTATION_PHASE * phase as u32;
        let phase_end = phase_start + ROTATION_PHASE;
        for h in 0..hosts {
            let partition = (2 * h as u64 + phase) % ROTATION_PARTITIONS;
            for i in 0..ROTATION_CLIENTS_PER_HOST {
                let client = h + hosts * i;
                let mut keys: Vec<u64> = (0..ROTATION_KEYS)
                    .filter(|k| *k as usize % ROTATION_CLIENTS_PER_HOST == i)
                    .collect();
                // Fisher-Yates, from the seed's stream.
                for j in (1..keys.len()).rev() {
                    let pick = (splitmix64(&mut rng) % (j as u64 + 1)) as usize;
                    keys.swap(j, pick);
                }
                paced_rows(
                    &mut per_client[client],
                    phase_start..phase_end,
                    keys.len(),
                    &mut rng,
                    |n| key_hash(partition, keys[n % keys.len()]),
                );
            }
        }
    }
    per_client
}

/// One client's rows over `window`, both patterns' pace: one row every
/// 4-6 ms (uniform, from `rng`), each held [`ROTATION_HOLD`]; row `n` takes
/// key `key_of(n)`, and the first `first` rows are the window's first uses.
fn paced_rows(
    rows: &mut Vec<TraceRow>,
    window: std::ops::Range<Duration>,
    first: usize,
    rng: &mut u64,
    key_of: impl Fn(usize) -> u64,
) {
    let mut at = window.start;
    let mut n = 0;
    while at < window.end {
        rows.push(TraceRow {
            key_hash: key_of(n),
            shared: false,
            hold: ROTATION_HOLD,
            at: Some(at),
            kind: if n < first {
                RowKind::FirstInPhase
            } else {
                RowKind::Again
            },
        });
        n += 1;
        at += Duration::from_micros(4_000 + splitmix64(rng) % 2_001);
    }
}

/// Section 6's second pattern: staggered sweeps (hosts working through
/// the shards of a table in order, each a third of the table behind the
/// next, as a rolling migration or a batch job over ranges does). Each
/// host's client `i` (of two) sweeps ring `i` of [`SWEEP_SHARDS`] global
/// keys: it works on one shard for [`SWEEP_STEP`] (one row every 4-6 ms,
/// uniform from the seed, each held 0.5 ms), then moves to the next shard,
/// round the ring. Host `h` starts at shard `h * SWEEP_SHARDS / 3`, so
/// each shard passes from host `h + 1` to host `h` a third of a lap
/// later, idle in between. A lap is 24 x 40 ms = 960 ms, longer than the
/// forecaster's 500 ms horizon.
const SWEEP_SHARDS: u64 = 24;
const SWEEP_STEP: Duration = Duration::from_millis(40);
const SWEEP_RINGS: usize = 2;

/// Section 6's sweep rows per client (client `c` on host `c % 3`), for
/// `length` of replay: see [`SWEEP_SHARDS`].
fn sweep_rows(seed: u64, length: Duration) -> Vec<Vec<TraceRow>> {
    let hosts = HOSTS.len();
    let mut per_client = vec![Vec::new(); hosts * SWEEP_RINGS];
    let mut rng = seed ^ 0x5eed;
    let steps = (length.as_micros() / SWEEP_STEP.as_micros()) as u64;
    for h in 0..hosts {
        for ring in 0..SWEEP_RINGS {
            let client = h + hosts * ring;
            for step in 0..steps {
                let shard = (h as u64 * SWEEP_SHARDS / hosts as u64 + step) % SWEEP_SHARDS;
                let mut state = seed ^ (0x5eed << 40 | (ring as u64) << 32 | shard);
                let key_hash = splitmix64(&mut state);
                let step_start = SWEEP_STEP * step as u32;
                paced_rows(
                    &mut per_client[client],
                    step_start..step_start + SWEEP_STEP,
                    1,
                    &mut rng,
                    |_| key_hash,
                );
            }
        }
    }
    per_client
}

/// `FORELOCK_CLUSTER_PATTERNS=rotation,sweep`: section 6's patterns (both
/// by default).
const PATTERNS_ENV: &str = "FORELOCK_CLUSTER_PATTERNS";

/// Section 6: the synthetic patterns ([`rotation_rows`], [`sweep_rows`])
/// replayed on three fresh brokers per mode, prediction off and on as in
/// section 5. Beside all rows, the rows that were a host's first use of a
/// key in its phase or step (the node grant is elsewhere unless
/// prefetched) and the rows that used a key again (cached here): "a
/// predicted key close to cached" is the first uses' p50 over the again
/// rows' p50 of the same run.
fn section_synthetic(etcd: &Etcd, sizes: &Sizes, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let seed = match std::env::var(SYNTHETIC_SEED_ENV) {
        Ok(v) => v
            .parse::<u64>()
            .with_context(|| format!("{SYNTHETIC_SEED_ENV}={v}: not a u64"))?,
        Err(_) => 1,
    };
    let patterns: Vec<String> = std::env::var(PATTERNS_ENV)
        .map(|v| v.split(',').map(|p| p.trim().to_string()).collect())
        .unwrap_or_else(|_| vec!["rotation".to_string(), "sweep".to_string()]);
    for pattern in patterns {
        let (per_client, shape) = match pattern.as_str() {
            "rotation" => (
                rotation_rows(seed, sizes.rotation),
                format!(
                    "{ROTATION_PARTITIONS} partitions x {ROTATION_KEYS} keys rotating, {} ms phases",
                    ROTATION_PHASE.as_millis()
                ),
            ),
            "sweep" => (
                sweep_rows(seed, sizes.rotation),
                format!(
                    "{SWEEP_RINGS} rings x {SWEEP_SHARDS} shards swept, {} ms steps, hosts a third of a lap apart",
                    SWEEP_STEP.as_millis()
                ),
            ),
            other => bail!("{PATTERNS_ENV}: unknown pattern {other} (rotation, sweep)"),
        };
        let total: usize = per_client.iter().map(Vec::len).sum();
        let label = format!("{pattern} seed {seed}, {} s", sizes.rotation.as_secs_f64());
        for mode in trace_modes(&SYNTHETIC_MODES) {
            let run = trace_mode(etcd, &pattern, &mode, &per_client)?;
            let mode = &mode.name;
            let first_uses = run.prefetch_hits + run.first_uses_waited;
            let hit_rate = if first_uses > 0 {
                run.prefetch_hits as f64 / first_uses as f64
            } else {
                0.0
            };
            let again = run.again.p50();
            rows.push(run.latencies.row(
                "6 synthetic",
                &format!("{label}, prediction {mode}: all rows"),
                String::new(),
                format!(
                    "{total} rows, {shape}, 2 clients on each of 3 hosts; \
                     prefetch hit rate {:.1}% ({}/{first_uses} first uses of a node grant); \
                     {} unused prefetches cost other hosts {} waiting; predictors' CPU {:.1} s",
                    hit_rate * 100.0,
                    run.prefetch_hits,
                    run.prefetch_unused,
                    format_ns(run.prefetch_unused_wait_us.saturating_mul(1000)),
                    run.predictor_cpu.as_secs_f64(),
                ),
            ));
            rows.push(run.first_in_phase.row(
                "6 synthetic",
                &format!("{label}, prediction {mode}: first use"),
                ratio(run.first_in_phase.p50(), again, "again rows (cached)"),
                "a host's first use of a key in its phase or step".to_string(),
            ));
            rows.push(run.again.row(
                "6 synthetic",
                &format!("{label}, prediction {mode}: again"),
                String::new(),
                format!(
                    "the key again on the same host in the same phase or step (cached, \
                     unless taken meanwhile); {} of them off the fast path",
                    run.again_slow
                ),
            ));
        }
    }
    Ok(())
}

/// The modes of sections 5 and 6: `defaults`, unless
/// `FORELOCK_CLUSTER_TRACE_MODES=off:keep-alive:0,cpu:keep-alive:1` names
/// others (name:policy:predictors[:model]), e.g. predictors running beside
/// a broker that does not use their scores, to tell their CPU cost from
/// what their prefetches do.
fn trace_modes(defaults: &[(&str, &str, bool, Option<&str>)]) -> Vec<TraceMode> {
    std::env::var(TRACE_MODES_ENV)
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|m| {
                    let mut parts = m.split(':');
                    let name = parts.next()?.to_string();
                    let policy = parts.next()?.to_string();
                    let predict = parts.next()? == "1";
                    let model = parts.next().map(str::to_string);
                    Some(TraceMode {
                        name,
                        policy,
                        predict,
                        model,
                    })
                })
                .collect()
        })
        .unwrap_or_else(|| {
            defaults
                .iter()
                .map(|&(name, policy, predict, model)| TraceMode {
                    name: name.to_string(),
                    policy: policy.to_string(),
                    predict,
                    model: model.map(str::to_string),
                })
                .collect()
        })
}

/// One mode of section 5 on three fresh brokers (policy `policy`), with a
/// predictor beside each if `predict`.
fn trace_mode(
    etcd: &Etcd,
    section: &str,
    mode: &TraceMode,
    per_client: &[Vec<TraceRow>],
) -> anyhow::Result<TraceRun> {
    let (policy, predict) = (mode.policy.as_str(), mode.predict);
    let prefix = format!(
        "/forelock-bench-{}-{section}-{policy}-{}",
        std::process::id(),
        match (predict, &mode.model) {
            (false, _) => "alone".to_string(),
            (true, None) => "predicted".to_string(),
            (true, Some(model)) => model.clone(),
        }
    );
    // A key idle for 200 ms loses its slot, so that the forecaster can ask
    // for it again (the allocator prepares only keys without a slot; a
    // global key's node grant stays here when its slot goes).
    let allocator = format!("policy = \"{policy}\"\nkeep_alive_ms = 200");
    let hosts = HOSTS
        .iter()
        .map(|name| start_host(name, &etcd.url, &prefix, "", &allocator))
        .collect::<anyhow::Result<Vec<Host>>>()?;
    // Declared after the hosts: dropped (killed) first.
    let predictors = if predict {
        hosts
            .iter()
            .map(|host| start_predictor(host, mode.model.as_deref()))
            .collect::<anyhow::Result<Vec<(ChildGuard, u32)>>>()?
    } else {
        Vec::new()
    };
    let start = Instant::now();
    type Replayed = (Latencies, Latencies, Latencies, u64);
    let replay = |client: usize, rows: &[TraceRow]| -> anyhow::Result<Replayed> {
        let host = &hosts[client % hosts.len()];
        let connection = connect(host)?;
        let mut latencies = Latencies::new();
        let mut first_in_phase = Latencies::new();
        let mut again = Latencies::new();
        let mut again_slow = 0;
        for row in rows {
            let key = format!("global/{:016x}", row.key_hash);
            if let Some(at) = row.at
                && let Some(early) = at.checked_sub(start.elapsed())
            {
                std::thread::sleep(early);
            }
            let t0 = Instant::now();
            let guard = if row.shared {
                connection.lock_shared_timeout(&key, LOCK_PATIENCE)
            } else {
                connection.lock_timeout(&key, LOCK_PATIENCE)
            }
            .with_context(|| format!("host {}: lock {key}", host.name))?;
            let took = t0.elapsed();
            latencies.record(took);
            match row.kind {
                RowKind::Trace => {}
                RowKind::FirstInPhase => first_in_phase.record(took),
                RowKind::Again => {
                    again.record(took);
                    if !guard.fast_path() {
                        again_slow += 1;
                    }
                }
            }
            std::thread::sleep(row.hold);
            guard
                .release()
                .with_context(|| format!("host {}: release {key}", host.name))?;
        }
        latencies.elapsed = start.elapsed();
        Ok((latencies, first_in_phase, again, again_slow))
    };
    let results: Vec<anyhow::Result<Replayed>> = std::thread::scope(|scope| {
        let handles: Vec<_> = per_client
            .iter()
            .enumerate()
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(client, rows)| scope.spawn(move || replay(client, rows)))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("trace replay thread panicked"))
            .collect()
    });
    let mut run = TraceRun {
        latencies: Latencies::new(),
        first_in_phase: Latencies::new(),
        again: Latencies::new(),
        again_slow: 0,
        prefetch_hits: 0,
        first_uses_waited: 0,
        prefetch_unused: 0,
        prefetch_unused_wait_us: 0,
        predictor_cpu: predictors
            .iter()
            .filter_map(|&(_, pid)| cpu_time(pid))
            .sum(),
    };
    for result in results {
        let (latencies, first_in_phase, again, again_slow) = result?;
        run.again_slow += again_slow;
        for (into, from) in [
            (&mut run.latencies, &latencies),
            (&mut run.first_in_phase, &first_in_phase),
            (&mut run.again, &again),
        ] {
            into.histogram
                .add(&from.histogram)
                .context("merging histograms")?;
            into.elapsed = into.elapsed.max(latencies.elapsed);
        }
    }
    // cluster.json is rewritten every 500 ms: read it once more after that.
    std::thread::sleep(Duration::from_millis(700));
    for host in &hosts {
        let status = read_cluster_status(host)?;
        let count = |field: &str| status[field].as_u64().unwrap_or(0);
        run.prefetch_hits += count("prefetch_hits");
        run.first_uses_waited += count("first_uses_waited");
        run.prefetch_unused += count("prefetch_unused");
        run.prefetch_unused_wait_us += count("prefetch_unused_wait_us");
    }
    Ok(run)
}

fn read_cluster_status(host: &Host) -> anyhow::Result<serde_json::Value> {
    let path = host.runtime_dir.join("cluster.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The niceness of each host's `forelock-predictor`: the systemd unit's
/// (`systemd/forelock-predictor.service`, `Nice=5`: advisory work yields to
/// the broker and to applications), unless
/// `FORELOCK_CLUSTER_PREDICTOR_NICE` says otherwise (0 = the brokers' own).
const PREDICTOR_NICE_ENV: &str = "FORELOCK_CLUSTER_PREDICTOR_NICE";
const PREDICTOR_NICE: i32 = 5;
/// `FORELOCK_CLUSTER_PREDICTOR_CONFIG=<file>`: each predictor's
/// configuration (`forelock-predictor --config`); the defaults otherwise.
const PREDICTOR_CONFIG_ENV: &str = "FORELOCK_CLUSTER_PREDICTOR_CONFIG";

/// A `forelock-predictor` for `host`'s broker (beside this executable), at
/// the niceness of its systemd unit ([`PREDICTOR_NICE`]), and its pid.
fn start_predictor(host: &Host, model: Option<&str>) -> anyhow::Result<(ChildGuard, u32)> {
    let exe = std::env::current_exe().context("finding this program")?;
    let binary = exe.with_file_name("forelock-predictor");
    if !binary.is_file() {
        bail!(
            "prediction on needs {} (cargo build --release -p forelock-predictor)",
            binary.display()
        );
    }
    let mut command = Command::new(&binary);
    command.arg("--runtime-dir").arg(&host.runtime_dir);
    if let Some(model) = model {
        let config = host._dir.path().join("forelock-predictor.toml");
        std::fs::write(&config, format!("model = \"{model}\"\n"))
            .context("writing the predictor's configuration")?;
        command.arg("--config").arg(config);
    } else if let Some(config) = std::env::var_os(PREDICTOR_CONFIG_ENV) {
        command.arg("--config").arg(config);
    }
    command
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(
            std::fs::File::create(host._dir.path().join("forelock-predictor.log"))
                .context("predictor log")?,
        ));
    let nice = match std::env::var(PREDICTOR_NICE_ENV) {
        Ok(v) => v
            .parse::<i32>()
            .with_context(|| format!("{PREDICTOR_NICE_ENV}={v}: not a niceness"))?,
        Err(_) => PREDICTOR_NICE,
    };
    let renice = move || {
        // SAFETY: setpriority(2) on the calling process (who = 0) reads no
        // memory of ours.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec in the child; it calls
    // only setpriority(2), which is async-signal-safe, and allocates nothing.
    unsafe { command.pre_exec(renice) };
    let child = die_with_parent(&mut command)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id();
    Ok((ChildGuard::new(child), pid))
}

use forelock_cluster::agent::COUNTER_BITS as TOKEN_COUNTER_BITS;

/// One section of the run: it appends its rows.
type Section<'a> = dyn Fn(&mut Vec<Row>) -> anyhow::Result<()> + 'a;

/// `forelock bench --cluster [--quick]`.
pub fn run(quick: bool) -> anyhow::Result<()> {
    let sizes = Sizes::new(quick);
    let etcd = start_etcd()?;
    let prefix = format!("/forelock-bench-{}", std::process::id());
    let hosts = HOSTS
        .iter()
        .map(|name| start_host(name, &etcd.url, &prefix, "", KEEP_ALIVE))
        .collect::<anyhow::Result<Vec<Host>>>()?;
    let quiet = start_host(
        QUIET_HOST,
        &etcd.url,
        &prefix,
        NO_SPIN_WHILE_WAITING,
        KEEP_ALIVE,
    )?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let sections: [(&str, &Section); 6] = [
        ("1 cached", &|rows| section_cached(&hosts[0], &sizes, rows)),
        ("2 first", &|rows| {
            section_first(&hosts[0], &quiet, &etcd, &sizes, rows)
        }),
        ("3 transfer", &|rows| {
            section_transfer(&hosts[0], &hosts[1], &sizes, rows)
        }),
        ("4 contention", &|rows| {
            section_contention(&hosts, &sizes, rows)
        }),
        ("5 trace", &|rows| section_trace(&etcd, &sizes, rows)),
        ("6 synthetic", &|rows| {
            section_synthetic(&etcd, &sizes, rows)
        }),
    ];
    let only: Option<Vec<String>> = std::env::var(SECTIONS_ENV)
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    for (name, section) in sections {
        let number = name.split(' ').next().unwrap_or_default();
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|s| s == number))
        {
            continue;
        }
        if let Err(error) = section(&mut rows) {
            failures.push(format!("section {name}: {error:#}"));
        }
    }
    print!("{}", render(&etcd, &rows, &failures, quick));
    if !failures.is_empty() {
        bail!("{} section(s) failed", failures.len());
    }
    Ok(())
}

fn render(etcd: &Etcd, rows: &[Row], failures: &[String], quick: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "forelock bench --cluster{}: hosts a, b, c (and d, section 2 only) = forelockd on this machine (loopback, no namespaces), \
         one etcd member on 127.0.0.1 ({}), data dir on disk",
        if quick { " --quick" } else { "" },
        etcd.version.trim()
    );
    let _ = writeln!(
        out,
        "[cluster] {}; clients are threads of this process, one connection each",
        CLUSTER_SETTINGS.trim().replace('\n', ", ")
    );
    let header = [
        "section",
        "case",
        "n",
        "p50",
        "p99",
        "ops/s",
        "ratio (p50)",
        "note",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|row| {
            [
                row.section.to_string(),
                row.case.clone(),
                row.samples.to_string(),
                format_ns(row.p50_ns),
                format_ns(row.p99_ns),
                format!("{:.0}", row.ops_per_s),
                row.ratio.clone(),
                row.note.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line_out = |line: &[String]| {
        let mut text = String::new();
        for (i, (cell, width)) in line.iter().zip(widths).enumerate() {
            if i == 7 {
                text.push_str(cell);
            } else if (2..6).contains(&i) {
                let _ = write!(text, "{cell:>width$}  ");
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line_out(&header.map(String::from));
    for line in &cells {
        line_out(line);
    }
    let p50 = |case: &str| {
        rows.iter()
            .find(|row| row.case.starts_with(case))
            .map(|row| row.p50_ns)
    };
    let target = |name: &str, ours: Option<u64>, theirs: Option<u64>, within: f64| {
        if let (Some(ours), Some(theirs)) = (ours, theirs)
            && theirs > 0
        {
            let ratio = ours as f64 / theirs as f64;
            let verdict = if ratio <= within { "met" } else { "not met" };
            format!("target {name} (within {within}x): {ratio:.2}x, {verdict}\n")
        } else {
            String::new()
        }
    };
    out.push_str(&target(
        "cached global key vs prepared local key, p50",
        p50("global key, node grant held here"),
        p50("local key, prepared"),
        1.5,
    ));
    out.push_str(&target(
        "first acquisition vs etcd Lock RPC back-to-back, p50",
        p50("global key, first acquire (node grant)"),
        p50("etcd Lock RPC (etcd-client)"),
        1.0,
    ));
    out.push_str(&target(
        "first acquisition vs etcd Lock RPC, in turn, p50",
        p50("global key, first acquire, in turn"),
        p50("etcd Lock RPC, in turn"),
        1.0,
    ));
    if let (Some(first), Some(txn), Some(lock)) = (
        p50("global key, first acquire, in turn"),
        p50("node-grant txn alone, in turn"),
        p50("etcd Lock RPC, in turn"),
    ) && lock > 0
    {
        // A first acquisition is its etcd transaction plus the hops to and
        // from it (client -> broker -> agent -> broker -> client).
        let _ = writeln!(
            out,
            "first acquisition in turn = etcd work {:.2}x etcd Lock in turn + hops {:.2}x ({})",
            txn as f64 / lock as f64,
            first.saturating_sub(txn) as f64 / lock as f64,
            format_ns(first.saturating_sub(txn)),
        );
    }
    if failures.is_empty() {
        let _ = writeln!(out, "errors: 0");
    } else {
        for failure in failures {
            let _ = writeln!(out, "error: {failure}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// Which host takes each key in each window of `window` (a phase or a
    /// step), from the rows' start times.
    fn hosts_per_window(
        per_client: &[Vec<TraceRow>],
        window: Duration,
    ) -> HashMap<(u64, u128), HashSet<usize>> {
        let mut seen: HashMap<(u64, u128), HashSet<usize>> = HashMap::new();
        for (client, rows) in per_client.iter().enumerate() {
            for row in rows {
                let at = row.at.expect("synthetic rows are paced");
                seen.entry((row.key_hash, at.as_micros() / window.as_micros()))
                    .or_default()
                    .insert(client % HOSTS.len());
            }
        }
        seen
    }

    #[test]
    fn the_synthetic_patterns_are_the_same_for_a_seed_and_differ_between_seeds() {
        let length = Duration::from_secs(2);
        for generate in [rotation_rows, sweep_rows] {
            let keys = |seed| -> Vec<Vec<(u64, Option<Duration>)>> {
                generate(seed, length)
                    .iter()
                    .map(|rows| rows.iter().map(|r| (r.key_hash, r.at)).collect())
                    .collect()
            };
            assert_eq!(keys(1), keys(1));
            assert_ne!(keys(1), keys(2));
        }
    }

    #[test]
    fn in_the_rotation_no_key_is_taken_by_two_hosts_in_one_phase_and_each_host_takes_every_partition()
     {
        let per_client = rotation_rows(1, ROTATION_PHASE * 12);
        for ((key, phase), hosts) in hosts_per_window(&per_client, ROTATION_PHASE) {
            assert_eq!(
                hosts.len(),
                1,
                "key {key:x} in phase {phase}: hosts {hosts:?}"
            );
        }
        for h in 0..HOSTS.len() {
            let keys: HashSet<u64> = (0..ROTATION_CLIENTS_PER_HOST)
                .flat_map(|i| per_client[h + HOSTS.len() * i].iter().map(|r| r.key_hash))
                .collect();
            assert_eq!(keys.len() as u64, ROTATION_PARTITIONS * ROTATION_KEYS);
        }
    }

    #[test]
    fn in_the_sweep_each_shard_passes_to_the_next_host_a_third_of_a_lap_later() {
        let per_client = sweep_rows(1, SWEEP_STEP * SWEEP_SHARDS as u32 * 2);
        let seen = hosts_per_window(&per_client, SWEEP_STEP);
        for ((key, step), hosts) in &seen {
            assert_eq!(hosts.len(), 1, "key {key:x} in step {step}: {hosts:?}");
            let host = *hosts.iter().next().expect("one host");
            let third = u128::from(SWEEP_SHARDS) / HOSTS.len() as u128;
            // The host before it had the shard a third of a lap earlier.
            if *step >= third {
                let before = (host + 1) % HOSTS.len();
                assert_eq!(
                    seen.get(&(*key, step - third)),
                    Some(&HashSet::from([before])),
                    "key {key:x} in step {step}"
                );
            }
        }
        let first_uses = per_client
            .iter()
            .flatten()
            .filter(|r| r.kind == RowKind::FirstInPhase)
            .count();
        assert_eq!(
            first_uses,
            HOSTS.len() * SWEEP_RINGS * SWEEP_SHARDS as usize * 2
        );
    }
}
