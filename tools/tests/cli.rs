//! `forelock status`, `locks`, `run` and `hist` against a real forelockd.
//! Behaviour only, never timing.

mod support;
use forelock_tests::etcd::{free_port, revoke_the_lease_of};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use support::*;

const SMALL: &str = "[table]\nslots = 64\nclients = 16\n";

/// `forelock run KEY -- sh -c 'echo $FORELOCK_TOKEN; read x'`: a holder
/// that prints its token and holds until its stdin closes.
struct Holder {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    token: u64,
}

impl Holder {
    fn start(dir: &std::path::Path, extra: &[&str], key: &str) -> Holder {
        let mut child = Command::new(cli_exe())
            .arg("run")
            .args(extra)
            .arg(key)
            .args(["--", "sh", "-c", "echo \"$FORELOCK_TOKEN\"; read x || true"])
            .env("FORELOCK_RUNTIME_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start forelock run");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let token = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the command saw no FORELOCK_TOKEN: {line:?}"));
        Holder {
            stdin: child.stdin.take(),
            child,
            token,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Let the command finish; forelock's exit code.
    fn finish(mut self) -> i32 {
        drop(self.stdin.take());
        let child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("spawn true"),
        );
        wait_output(child).status.code().expect("exited")
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn status_reports_a_running_broker_its_capacity_and_counters() {
    let dir = TempDir::new("status");
    let broker = Broker::start(dir.path(), SMALL);
    let out = forelock(dir.path(), &["run", "warm-up", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let s = json(dir.path(), &["status", "--json"]);
    assert_eq!(s["broker"]["alive"], true, "{s}");
    assert_eq!(s["broker"]["pid"], broker.pid());
    assert_eq!(s["broker"]["epoch"], 1);
    assert_eq!(s["table"]["slots_capacity"], 64);
    assert_eq!(s["table"]["clients_capacity"], 16);
    assert_eq!(s["forecaster"]["alive"], false, "no forecaster was started");
    let grants =
        s["counters"]["hits"].as_u64().unwrap() + s["counters"]["misses"].as_u64().unwrap();
    assert!(grants >= 1, "the warm-up grant is counted: {s}");

    let text = forelock(dir.path(), &["status"]);
    assert_eq!(text.status.code(), Some(0));
    let text = stdout(&text);
    assert!(
        text.contains(&format!("running, pid {}", broker.pid())),
        "{text}"
    );
    assert!(text.contains("64 capacity"), "{text}");
}

#[test]
fn status_after_the_broker_died_says_not_running_and_exits_3() {
    let dir = TempDir::new("status-dead");
    let mut broker = Broker::start(dir.path(), SMALL);
    broker.kill9();
    let out = forelock(dir.path(), &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(stdout(&out).contains("NOT RUNNING"), "{}", stdout(&out));
}

#[test]
fn commands_without_a_broker_name_the_directory_and_the_fix() {
    let dir = TempDir::new("nobroker");
    for args in [&["status"][..], &["locks"], &["hist"]] {
        let out = forelock(dir.path(), args);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains("not running"), "{args:?}: {err}");
        assert!(
            err.contains(&dir.path().display().to_string()),
            "{args:?}: {err}"
        );
    }
    let out = forelock(dir.path(), &["run", "k", "--", "true"]);
    assert_eq!(out.status.code(), Some(69), "EX_UNAVAILABLE like flock(1)");
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
}

#[test]
fn a_table_of_another_version_is_refused_with_the_path_and_what_to_do() {
    let dir = TempDir::new("version");
    let mut broker = Broker::start(dir.path(), SMALL);
    broker.kill9();
    // Rewrite the version word (offset 12) as a future format.
    let table = dir.path().join("table");
    let mut bytes = std::fs::read(&table).unwrap();
    bytes[12..16].copy_from_slice(&99u32.to_ne_bytes());
    std::fs::write(&table, bytes).unwrap();
    let out = forelock(dir.path(), &["status"]);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("version 99"), "{err}");
    assert!(err.contains(&table.display().to_string()), "{err}");
    assert!(err.contains("same forelock release"), "{err}");
}

#[test]
fn locks_shows_the_holder_pid_token_and_queued_waiters() {
    let dir = TempDir::new("locks");
    let _broker = Broker::start(dir.path(), SMALL);
    let holder = Holder::start(dir.path(), &[], "orders:1");
    let row = lock_row(dir.path(), "orders:1").expect("orders:1 has a row");
    assert_eq!(row["mode"], "exclusive", "{row}");
    assert_eq!(row["holder_pids"][0], holder.pid(), "{row}");
    assert_eq!(row["token"], holder.token, "{row}");
    assert_eq!(row["waiter_count"], 0);
    assert_eq!(row["waiters"], serde_json::json!([]));

    let waiter = queue_waiter(dir.path(), "orders:1", false, 1);
    let text = stdout(&forelock(dir.path(), &["locks"]));
    assert!(text.contains("orders:1"), "{text}");
    assert!(text.contains(&holder.pid().to_string()), "{text}");

    assert_eq!(holder.finish(), 0);
    assert_eq!(
        wait_output(waiter).status.code(),
        Some(0),
        "the waiter got the lock"
    );
    let row = lock_row(dir.path(), "orders:1").expect("still keyed");
    assert_eq!(row["mode"], "free", "{row}");
}

#[test]
fn shared_runs_hold_together_and_locks_lists_both_pids() {
    let dir = TempDir::new("shared");
    let _broker = Broker::start(dir.path(), SMALL);
    let a = Holder::start(dir.path(), &["-s"], "config");
    let b = Holder::start(dir.path(), &["--shared"], "config");
    let row = lock_row(dir.path(), "config").unwrap();
    assert_eq!(row["mode"], "shared", "{row}");
    let pids: Vec<u64> = row["holder_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert!(
        pids.contains(&u64::from(a.pid())) && pids.contains(&u64::from(b.pid())),
        "{row}"
    );
    let out = forelock(dir.path(), &["run", "-n", "config", "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exclusive refused while shared held"
    );
    assert_eq!(a.finish(), 0);
    assert_eq!(b.finish(), 0);
}

#[test]
fn run_follows_flock_exit_codes() {
    let dir = TempDir::new("run-codes");
    let _broker = Broker::start(dir.path(), SMALL);
    let d = dir.path();
    let code = |args: &[&str]| forelock(d, args).status.code();
    assert_eq!(
        code(&["run", "k", "--", "sh", "-c", "exit 7"]),
        Some(7),
        "exit status passed through"
    );
    assert_eq!(
        code(&["run", "k", "--", "sh", "-c", "kill -TERM $$"]),
        Some(128 + 15),
        "killed by SIGTERM: 128+15"
    );
    assert_eq!(
        code(&["run", "k", "--", "/nonexistent/command"]),
        Some(69),
        "cannot execute: EX_UNAVAILABLE"
    );

    let holder = Holder::start(d, &[], "k");
    assert_eq!(
        code(&["run", "-n", "k", "--", "true"]),
        Some(1),
        "conflict: default code 1"
    );
    assert_eq!(
        code(&["run", "--nonblock", "-E", "42", "k", "--", "true"]),
        Some(42),
        "-E sets the conflict code"
    );
    assert_eq!(
        code(&["run", "-w", "0.2", "k", "--", "true"]),
        Some(1),
        "a timeout exits with the conflict code"
    );
    assert_eq!(
        code(&[
            "run",
            "-w",
            "0.2",
            "--conflict-exit-code",
            "9",
            "k",
            "--",
            "true"
        ]),
        Some(9)
    );
    assert_eq!(holder.finish(), 0);
    assert_eq!(
        code(&["run", "-n", "k", "--", "true"]),
        Some(0),
        "free again once the command exited"
    );
}

#[test]
fn fencing_tokens_in_the_environment_increase_run_after_run() {
    let dir = TempDir::new("tokens");
    let _broker = Broker::start(dir.path(), SMALL);
    let token = || {
        let out = forelock(
            dir.path(),
            &["run", "t", "--", "sh", "-c", "echo $FORELOCK_TOKEN"],
        );
        stdout(&out).trim().parse::<u64>().expect("a token")
    };
    let first = token();
    let second = token();
    assert!(second > first, "{first} then {second}");
}

/// `forelock run KEY -- sh -c 'echo $$; exec sleep 600'`: the running
/// `forelock` and the pid of the command it holds the lock for.
fn run_sleeper(dir: &std::path::Path, key: &str) -> (std::process::Child, u32) {
    let mut child = Command::new(cli_exe())
        .args(["run", key, "--", "sh", "-c", "echo $$; exec sleep 600"])
        .env("FORELOCK_RUNTIME_DIR", dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().parse().unwrap())
}

#[test]
fn the_lock_is_released_when_the_command_is_killed() {
    let dir = TempDir::new("killed");
    let _broker = Broker::start(dir.path(), SMALL);
    let (child, command_pid) = run_sleeper(dir.path(), "victim");
    // SAFETY: kill takes plain integers; the pid is our grandchild, alive
    // (it is sleeping), so it was not reused.
    unsafe { libc::kill(command_pid as i32, libc::SIGKILL) };
    assert_eq!(wait_output(child).status.code(), Some(128 + 9));
    let out = forelock(dir.path(), &["run", "-n", "victim", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn signals_sent_to_forelock_reach_the_command_and_the_lock_is_released() {
    let dir = TempDir::new("forward");
    let _broker = Broker::start(dir.path(), SMALL);
    let mut child = Command::new(cli_exe())
        .args(["run", "fw", "--", "sh", "-c", "echo ready; exec sleep 600"])
        .env("FORELOCK_RUNTIME_DIR", dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // SAFETY: kill takes plain integers; the child is ours and unreaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_output(child).status.code(), Some(128 + 15));
    assert_eq!(
        forelock(dir.path(), &["run", "-n", "fw", "--", "true"])
            .status
            .code(),
        Some(0)
    );
}

#[test]
fn hist_prints_percentiles_and_writes_interval_logs_and_a_plot() {
    let dir = TempDir::new("hist");
    let _broker = Broker::start(dir.path(), "[allocator]\npolicy = \"none\"\n");
    for i in 0..5 {
        let out = forelock(dir.path(), &["run", &format!("h{i}"), "--", "true"]);
        assert_eq!(out.status.code(), Some(0));
    }
    let log = dir.path().join("histograms.hlog");
    eventually("the broker logs an acquire-slow interval", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Tag=acquire-slow"))
    });
    let out_dir = dir.path().join("out");
    let out = forelock(dir.path(), &["hist", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("acquire-slow"), "{text}");
    assert!(text.contains("p99"), "{text}");
    let png = std::fs::read(out_dir.join("hist.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "hist.png is a PNG");
    let dumped = std::fs::read_to_string(out_dir.join("acquire-slow.hlog")).unwrap();
    assert!(dumped.contains("#[BaseTime:"), "{dumped}");
    assert!(
        dumped.lines().any(|l| l.starts_with("Tag=acquire-slow,")),
        "{dumped}"
    );
}

#[test]
fn the_prometheus_endpoint_serves_counters_and_latency_quantiles() {
    let dir = TempDir::new("prom");
    // A free port now; another process could take it before the broker
    // binds it, which would fail this test loudly, not wrongly.
    let port = free_port();
    let config = format!("{SMALL}[metrics]\nprometheus_listen = \"127.0.0.1:{port}\"\n");
    let broker = Broker::start(dir.path(), &config);
    assert_eq!(
        forelock(dir.path(), &["run", "p", "--", "true"])
            .status
            .code(),
        Some(0)
    );
    let body = http_get(port).unwrap_or_else(|e| panic!("GET /metrics: {e}\n{}", broker.log()));
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("# TYPE forelock_clients gauge"), "{body}");
    assert!(body.contains("forelock_slots_capacity 64"), "{body}");
    assert!(
        body.contains("forelock_latency_seconds{path=\"acquire-slow\",quantile=\"0.99\"}"),
        "{body}"
    );
}

fn http_get(port: u16) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(PATIENCE))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

#[test]
fn killing_forelock_run_releases_the_lock_and_kills_the_command() {
    let dir = TempDir::new("run-killed");
    let _broker = Broker::start(dir.path(), SMALL);
    let (mut child, command_pid) = run_sleeper(dir.path(), "orphan");
    child.kill().unwrap(); // SIGKILL to forelock itself
    child.wait().unwrap();
    eventually("the command dies with its lock holder", || {
        // Gone, or a zombie waiting for whoever inherited it.
        std::fs::read_to_string(format!("/proc/{command_pid}/stat")).map_or(true, |stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
    });
    eventually("the broker releases the dead holder's lock", || {
        forelock(dir.path(), &["run", "-n", "orphan", "--", "true"])
            .status
            .code()
            == Some(0)
    });
}

/// `forelock run [-s] KEY -- true`, queued behind a holder: its pid, once
/// `locks` counts `n` waiters on KEY.
fn queue_waiter(dir: &std::path::Path, key: &str, shared: bool, n: u32) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(cli_exe());
    cmd.arg("run");
    if shared {
        cmd.arg("-s");
    }
    // FIFO: the waiter queues in the broker, whose queue `forelock locks`
    // lists (an exclusive waiter on a key held on the fast path would sleep
    // in the slot instead, seen only as contention).
    cmd.args([key, "--", "true"])
        .env("FORELOCK_RUNTIME_DIR", dir)
        .env("FORELOCK_FIFO", "1");
    // A test that fails must not leave a waiter blocked forever on a broker
    // it killed (it would hold the test run's output pipe open): the waiter
    // dies with the test's thread.
    let die_with_test = || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and reads
        // no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and calls only prctl(2),
    // which is async-signal-safe, and allocates nothing.
    unsafe { cmd.pre_exec(die_with_test) };
    let child = cmd.spawn().unwrap();
    eventually(&format!("waiter {n} queues on {key}"), || {
        lock_row(dir, key).is_some_and(|r| r["waiter_count"] == n)
    });
    child
}

#[test]
fn locks_lists_the_waiters_pids_in_queue_order() {
    let dir = TempDir::new("locks-waiters");
    let _broker = Broker::start(dir.path(), SMALL);
    let holder = Holder::start(dir.path(), &[], "orders:2");
    let first = queue_waiter(dir.path(), "orders:2", false, 1);
    let second = queue_waiter(dir.path(), "orders:2", true, 2);
    let (p1, p2) = (first.id(), second.id());

    let row = lock_row(dir.path(), "orders:2").expect("orders:2 has a row");
    assert_eq!(row["holder_pids"][0], holder.pid(), "{row}");
    assert_eq!(
        row["waiters"],
        serde_json::json!([{"pid": p1, "shared": false}, {"pid": p2, "shared": true}]),
        "head of the queue first: {row}"
    );
    assert_eq!(row["waiter_count"], 2, "{row}");

    let out = forelock(dir.path(), &["locks"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("2 (pids {p1},{p2}*)")), "{text}");

    assert_eq!(holder.finish(), 0);
    for waiter in [first, second] {
        assert_eq!(
            wait_output(waiter).status.code(),
            Some(0),
            "granted in turn"
        );
    }
    let row = lock_row(dir.path(), "orders:2").expect("still keyed");
    assert_eq!(row["waiters"], serde_json::json!([]), "{row}");
}

#[test]
fn locks_with_a_stopped_broker_prints_the_table_and_the_waiter_count() {
    let dir = TempDir::new("locks-stopped");
    let broker = Broker::start(dir.path(), SMALL);
    let holder = Holder::start(dir.path(), &[], "busy");
    let waiter = queue_waiter(dir.path(), "busy", false, 1);
    let pid = broker.pid() as i32;
    // SAFETY: kill takes plain integers; the broker is our unreaped child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let started = std::time::Instant::now();
    let out = forelock(dir.path(), &["locks"]);
    let text_result = (out.status.code(), stdout(&out));
    let json_out = forelock(dir.path(), &["locks", "--json"]);
    let elapsed = started.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };

    let (code, text) = text_result;
    assert_eq!(code, Some(0), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("busy"))
        .unwrap_or_else(|| panic!("no row for busy:\n{text}"));
    assert!(line.contains(&holder.pid().to_string()), "{text}");
    assert!(text.contains("waiters shown as a count only"), "{text}");
    assert!(text.contains("did not answer"), "{text}");
    assert_eq!(json_out.status.code(), Some(0), "{}", stderr(&json_out));
    let rows: serde_json::Value = serde_json::from_slice(&json_out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "busy")
        .expect("busy has a row");
    assert_eq!(row["waiter_count"], 1, "{row}");
    assert!(row["waiters"].is_null(), "unknown, not empty: {row}");
    assert!(
        stderr(&json_out).contains("did not answer"),
        "{}",
        stderr(&json_out)
    );
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "a stopped broker must not hang `forelock locks`: {elapsed:?}"
    );

    assert_eq!(holder.finish(), 0);
    assert_eq!(wait_output(waiter).status.code(), Some(0));
}

#[test]
fn a_stopped_broker_is_reported_as_not_responding() {
    let dir = TempDir::new("stopped");
    let broker = Broker::start(dir.path(), SMALL);
    let pid = broker.pid() as i32;
    // SAFETY: kill takes plain integers; the broker is our unreaped child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        let out = forelock(dir.path(), &["status"]);
        last = stdout(&out);
        if out.status.code() == Some(3) && last.contains("NOT RESPONDING") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        last.contains("NOT RESPONDING"),
        "a stale heartbeat with a live pid is NOT RESPONDING:\n{last}"
    );
    eventually("the broker answers again after SIGCONT", || {
        forelock(dir.path(), &["status"]).status.code() == Some(0)
    });
}

#[test]
fn hist_has_wait_hold_and_handoff_after_contention() {
    let dir = TempDir::new("hist-contended");
    let _broker = Broker::start(dir.path(), "[allocator]\npolicy = \"none\"\n");
    let holder = Holder::start(dir.path(), &[], "busy");
    let waiter = Command::new(cli_exe())
        .args(["run", "busy", "--", "true"])
        .env("FORELOCK_RUNTIME_DIR", dir.path())
        .spawn()
        .unwrap();
    eventually("the waiter queues", || {
        lock_row(dir.path(), "busy").is_some_and(|r| r["waiter_count"] == 1)
    });
    assert_eq!(holder.finish(), 0);
    assert_eq!(wait_output(waiter).status.code(), Some(0));
    let log = dir.path().join("histograms.hlog");
    eventually("wait, hold and handoff intervals are logged", || {
        std::fs::read_to_string(&log).is_ok_and(|t| {
            ["Tag=wait,", "Tag=hold,", "Tag=handoff,"]
                .iter()
                .all(|tag| t.contains(tag))
        })
    });
}

/// `forelock bench --languages`: the Rust and C rows carry figures (C needs
/// gcc and the C library built beside the CLI; required when
/// FORELOCK_REQUIRE_ALL_LANGUAGES is set, as in CI), and every row is either
/// a figure or says what is missing.
#[test]
fn bench_languages_measures_rust_and_c_beside_python() {
    let out = Command::new(cli_exe())
        .args(["bench", "--languages", "--quick"])
        .output()
        .expect("run forelock bench --languages");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figure = |name: &str| {
        text.lines().find(|l| l.starts_with(name)).and_then(|l| {
            l[name.len()..]
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
    };
    assert!(
        figure("forelock (Rust)").is_some_and(|ns| ns > 0.0),
        "{text}"
    );
    if std::env::var_os("FORELOCK_REQUIRE_ALL_LANGUAGES").is_some() {
        assert!(figure("forelock (C ABI)").is_some(), "{text}");
    }
    for line in text
        .lines()
        .skip(2)
        .filter(|l| l.starts_with("forelock (") || l.contains("(Python)"))
    {
        let value = line
            .split_whitespace()
            .find(|w| w.parse::<f64>().is_ok() || *w == "n/a");
        assert!(
            value.is_some(),
            "a row with neither a figure nor a reason: {line}"
        );
    }
}

/// `forelock ARGS -- sh -c SCRIPT` on `dir`, once SCRIPT has said "held";
/// its stdout, to read the rest from.
fn start_held(
    dir: &std::path::Path,
    args: &[&str],
    script: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(cli_exe())
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("FORELOCK_RUNTIME_DIR", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start forelock");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "held");
    (child, out)
}

/// A broker with `[cluster]` on a real etcd of its own (`None`, the test
/// skipped, where etcd is not installed). Fields drop in order: the broker
/// stops before its directory goes, and etcd last.
struct GlobalBroker {
    _broker: Broker,
    dir: TempDir,
    etcd: forelock_tests::etcd::LocalEtcd,
}

impl GlobalBroker {
    fn start(name: &str) -> Option<GlobalBroker> {
        let etcd = forelock_tests::etcd::LocalEtcd::start()?;
        let dir = TempDir::new(name);
        let config = forelock_tests::etcd::cluster_config("a", &etcd.url);
        Some(GlobalBroker {
            _broker: Broker::start(dir.path(), &config),
            dir,
            etcd,
        })
    }
}

/// `forelock run global/KEY -- COMMAND` whose broker loses the node grant
/// under it (its etcd lease revoked behind its back): the command must not
/// run on as if it held the lock. It gets SIGTERM (the default of
/// `--on-lost`), and forelock exits 75 (EX_TEMPFAIL) whatever the command's
/// own status.
#[test]
fn run_stops_the_command_and_exits_75_when_its_global_hold_is_lost() {
    let Some(global) = GlobalBroker::start("run-lost") else {
        return;
    };
    let (dir, etcd) = (&global.dir, &global.etcd);
    let (child, mut out) = start_held(
        dir.path(),
        &["run", "global/job"],
        "trap 'echo stopped; exit 0' TERM; echo held; while :; do sleep 0.05; done",
    );
    revoke_the_lease_of(dir.path(), &etcd.url);
    let status = wait_output(child);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "stopped", "the command got SIGTERM");
    assert_eq!(status.status.code(), Some(75), "{}", stderr(&status));
    assert!(
        stderr(&status).contains("lost"),
        "forelock says why: {}",
        stderr(&status)
    );

    // With `--on-lost none` the command runs on and is told by the code
    // alone; the key is this host's again once its new lease is up.
    let (mut child, mut out) = start_held(
        dir.path(),
        &["run", "-w", "15", "--on-lost", "none", "global/job"],
        "trap 'echo signalled' TERM; echo held; read x; echo finished",
    );
    revoke_the_lease_of(dir.path(), &etcd.url);
    // Past five of forelock run's checks (one every 100 ms): the command
    // must still be running.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "--on-lost none stopped it"
    );
    drop(child.stdin.take());
    let status = wait_output(child);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "finished", "no signal with --on-lost none");
    assert_eq!(status.status.code(), Some(75), "{}", stderr(&status));
}

/// `forelock lock --pid PID global/KEY` whose node grant is lost while PID
/// runs: `forelock unlock` says so and exits 75, as `forelock run` does.
#[test]
fn unlock_exits_75_when_the_global_hold_was_lost() {
    let Some(global) = GlobalBroker::start("unlock-lost") else {
        return;
    };
    let (dir, etcd) = (&global.dir, &global.etcd);
    let me = std::process::id().to_string();
    let held = forelock(dir.path(), &["lock", "--pid", &me, "global/shell"]);
    assert_eq!(held.status.code(), Some(0), "{}", stderr(&held));
    revoke_the_lease_of(dir.path(), &etcd.url);
    let out = forelock(dir.path(), &["unlock", "--pid", &me, "global/shell"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("lost"), "{}", stderr(&out));
    // The hold is gone: a second unlock finds nothing.
    let out = forelock(dir.path(), &["unlock", "--pid", &me, "global/shell"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

/// A global key waited for while the broker cannot reach etcd: `forelock
/// run` says why it waits (the broker's last etcd error) instead of waiting
/// in silence, and `-w` still ends with the conflict code.
#[test]
fn run_says_why_a_global_key_waits_when_etcd_is_unreachable() {
    // Nothing listens there: connections are refused.
    let url = format!("http://127.0.0.1:{}", free_port());
    let dir = TempDir::new("run-no-etcd");
    let _broker = Broker::start(dir.path(), &forelock_tests::etcd::cluster_config("a", &url));
    let out = forelock(dir.path(), &["run", "-w", "4", "global/x", "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("grants no global key") && said.contains("onnect"),
        "forelock run says why it waits: {said}"
    );
    // A local key is not held up, and nothing is said about it.
    let out = forelock(dir.path(), &["run", "-w", "4", "local/x", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

/// The Prometheus text of a broker with `[cluster]`: whether it grants global
/// keys now (the gauge an operator alerts on), its fences and node grants.
#[test]
fn the_prometheus_endpoint_says_whether_global_keys_are_granted() {
    let metrics = |body: &str, line: &str| body.lines().any(|l| l == line);
    let serve = |name: &str, etcd_url: &str, check: &dyn Fn(&std::path::Path, u16)| {
        let (dir, port) = (TempDir::new(name), free_port());
        let config = format!(
            "{}[metrics]\nprometheus_listen = \"127.0.0.1:{port}\"\n",
            forelock_tests::etcd::cluster_config("a", etcd_url)
        );
        let _broker = Broker::start(dir.path(), &config);
        check(dir.path(), port);
    };
    // An etcd nobody serves: not granting, said as soon as the status is.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    serve("prom-no-etcd", &nobody, &|_, port| {
        eventually("forelock_cluster_granting 0", || {
            let body = http_get(port).unwrap();
            metrics(&body, "forelock_cluster_granting 0")
                && metrics(&body, "forelock_cluster_etcd_connected 0")
        });
    });
    let Some(etcd) = forelock_tests::etcd::LocalEtcd::start() else {
        return;
    };
    serve("prom-etcd", &etcd.url, &|dir, port| {
        let holder = Holder::start(dir, &[], "global/p");
        eventually("granting, the held key's node grant here", || {
            let body = http_get(port).unwrap();
            metrics(&body, "forelock_cluster_granting 1")
                && metrics(&body, "forelock_cluster_node_grants 1")
                && metrics(&body, "forelock_cluster_fences_total 0")
        });
        assert_eq!(holder.finish(), 0);
    });
}

/// `forelock run` whose broker lost its hold (the runtime directory was
/// wiped and a new broker made a fresh table: another process may take the
/// key now): the command gets SIGTERM and forelock exits 75, as for a
/// global key's lost node grant.
#[test]
fn run_stops_the_command_when_a_new_broker_forgot_the_hold() {
    let dir = TempDir::new("run-forgotten");
    let mut broker = Broker::start(dir.path(), SMALL);
    let (child, mut out) = start_held(
        dir.path(),
        &["run", "job"],
        "trap 'echo stopped; exit 0' TERM; echo held; while :; do sleep 0.05; done",
    );
    broker.kill9();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            std::fs::remove_file(path).unwrap(); // all but the test's configuration
        }
    }
    broker.restart_stopped();
    let status = wait_output(child);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "stopped", "the command got SIGTERM");
    assert_eq!(status.status.code(), Some(75), "{}", stderr(&status));
    let other = forelock(dir.path(), &["run", "-n", "job", "--", "true"]);
    assert_eq!(other.status.code(), Some(0), "{}", stderr(&other));
}
