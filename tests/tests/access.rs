//! Trust boundaries ("Never two holders", defects 5 and 8): who may open the
//! runtime files and the socket, what the broker and the clients refuse to
//! follow or trust, and that a truncated table does not kill the broker.
//!
//! The tests run as root; "another user" is `nobody` (uid 65534, group
//! `nogroup` 65534), reached with `setpriv` in the child process.

mod support;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::*;

const NOBODY: u32 = 65534;
const KEEP_ALIVE: &str = "[allocator]\npolicy = \"keep-alive\"\nkeep_alive_ms = 2000\n";

/// `program args` run as uid/gid 65534 with no supplementary groups.
fn as_nobody(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        &NOBODY.to_string(),
        "--regid",
        &NOBODY.to_string(),
        "--clear-groups",
        "--",
        program,
    ])
    .args(args);
    c
}

/// Whether `nobody` may open `path` read-write (`exec 3<>PATH` in a shell).
fn nobody_can_open_read_write(path: &Path) -> bool {
    as_nobody("sh", &["-c", "exec 3<>\"$0\"", path.to_str().unwrap()])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Run `forelockd-under-test` on `dir` until it exits (bounded); its output.
fn broker_that_should_exit(dir: &Path) -> Output {
    let child = Command::new(broker_exe())
        .arg("--runtime-dir")
        .arg(dir)
        .env("FORELOCK_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // SAFETY: waitpid with WNOHANG|WNOWAIT on our own child only peeks.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid for writes; the pid is our unreaped child.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read after waitid filled `info`.
        if rc == 0 && unsafe { info.si_pid() } != 0 {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: kill takes plain integers; the child is ours and unreaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let out = child.wait_with_output().unwrap();
            panic!(
                "forelockd served {} instead of refusing it:\n{}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn assert_refused(out: &Output, wanted: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "forelockd exited 0:\n{err}");
    for w in wanted {
        assert!(err.contains(w), "the error should say {w:?}:\n{err}");
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn the_runtime_files_and_socket_are_not_open_to_other_users() {
    let dir = TempDir::new("modes");
    let _b = Broker::start(dir.path(), KEEP_ALIVE);
    for name in [
        shm_layout::TABLE_FILE,
        shm_layout::EVENTS_FILE,
        shm_layout::SCORES_FILE,
        shm_layout::SOCKET_FILE,
    ] {
        let m = mode(&dir.path().join(name));
        assert_eq!(m & 0o007, 0, "{name} has mode {m:o}: others have access");
        assert_eq!(m & 0o660, 0o660, "{name} has mode {m:o}");
    }
    let m = mode(dir.path());
    assert_eq!(m & 0o002, 0, "runtime dir has mode {m:o}");
    assert_eq!(
        m & 0o005,
        0,
        "runtime dir has mode {m:o}: others can reach it"
    );
}

#[test]
fn a_process_of_another_uid_cannot_open_the_table_or_the_socket() {
    let dir = TempDir::new("otheruid");
    // /tmp/fl-... is 0755: nobody could reach the files if their modes let it.
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let _b = Broker::start(dir.path(), KEEP_ALIVE);
    for name in [
        shm_layout::TABLE_FILE,
        shm_layout::EVENTS_FILE,
        shm_layout::SCORES_FILE,
    ] {
        assert!(
            !nobody_can_open_read_write(&dir.path().join(name)),
            "uid {NOBODY} opened {name} read-write"
        );
    }
    // A real client as nobody: it must fail, and say so (not run and lock).
    let out = as_nobody(
        worker_exe(),
        &[
            "--dir",
            dir.path().to_str().unwrap(),
            "hold",
            "k",
            "--hold-ms",
            "0",
        ],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("ERR"),
        "a client of uid {NOBODY} (not in the broker's group) took a lock: {text:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ermission denied"),
        "the error names the cause: {text:?}"
    );
}

#[test]
fn a_member_of_the_access_group_takes_locks() {
    let dir = TempDir::new("group");
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let _b = Broker::start(
        dir.path(),
        &format!("{KEEP_ALIVE}[access]\ngroup = \"nogroup\"\n"),
    );
    let meta = std::fs::metadata(dir.path().join(shm_layout::TABLE_FILE)).unwrap();
    assert_eq!(meta.gid(), NOBODY, "the table belongs to the access group");
    let meta = std::fs::metadata(dir.path().join(shm_layout::SOCKET_FILE)).unwrap();
    assert_eq!(meta.gid(), NOBODY, "the socket belongs to the access group");
    let out = as_nobody(
        worker_exe(),
        &[
            "--dir",
            dir.path().to_str().unwrap(),
            "hold",
            "k",
            "--hold-ms",
            "0",
        ],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HELD"),
        "a member of the access group could not lock: {text:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn truncating_the_table_does_not_kill_the_broker() {
    // Guarantee: the broker survives (its mapping of the table is replaced by
    // private zero memory), says in its log that the table was truncated and
    // what to do, and stops cleanly; a restart sets the damaged table aside
    // and serves new clients.
    let dir = TempDir::new("truncate");
    let mut b = Broker::start(dir.path(), KEEP_ALIVE);
    let mut w = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
    parse_held(&w.next_line("HELD"));
    w.wait();
    let table = dir.path().join(shm_layout::TABLE_FILE);
    let status = Command::new("truncate")
        .args(["-s", "0"])
        .arg(&table)
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + PATIENCE;
    while !b.log().contains("truncated") {
        assert!(
            b.is_running(),
            "forelockd died when its table was truncated:\n{}",
            b.log()
        );
        assert!(
            Instant::now() < deadline,
            "forelockd never said its table was truncated:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // It keeps running its event loop for a while (ticks touch the table).
    std::thread::sleep(Duration::from_millis(300));
    assert!(b.is_running(), "forelockd died later:\n{}", b.log());
    assert!(
        b.terminate().success(),
        "clean exit on SIGTERM:\n{}",
        b.log()
    );
    let mut b = Broker::start(dir.path(), KEEP_ALIVE);
    let mut w = Worker::spawn(dir.path(), &["hold", "fresh", "--hold-ms", "0"]);
    parse_held(&w.next_line("HELD"));
    assert!(b.terminate().success());
}

#[test]
fn a_runtime_dir_owned_by_another_uid_is_refused() {
    let dir = TempDir::new("foreign");
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let out = broker_that_should_exit(dir.path());
    assert_refused(&out, &["owned by uid 65534"]);
    assert!(!dir.path().join(shm_layout::TABLE_FILE).exists());
}

#[test]
fn a_world_writable_runtime_dir_is_refused() {
    let dir = TempDir::new("worldw");
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o1777)).unwrap();
    let out = broker_that_should_exit(dir.path());
    assert_refused(&out, &["writable by other users"]);
}

/// A file outside the runtime dir that a symlink inside it points at.
fn victim(dir: &TempDir) -> std::path::PathBuf {
    let victim = dir.path().with_extension("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::set_permissions(&victim, PermissionsExt::from_mode(0o600)).unwrap();
    victim
}

fn assert_untouched(victim: &Path) {
    assert_eq!(
        std::fs::read_to_string(victim).unwrap(),
        "precious",
        "forelockd wrote through a symlink"
    );
    assert_eq!(mode(victim), 0o600, "forelockd chmodded through a symlink");
    let _ = std::fs::remove_file(victim);
}

#[test]
fn a_symlinked_table_new_is_not_followed() {
    let dir = TempDir::new("symnew");
    let victim = victim(&dir);
    std::os::unix::fs::symlink(&victim, dir.path().join("table.new")).unwrap();
    let b = Broker::start(dir.path(), KEEP_ALIVE);
    drop(b);
    assert_untouched(&victim);
}

#[test]
fn a_symlinked_lock_file_is_not_followed() {
    let dir = TempDir::new("symlock");
    let victim = victim(&dir);
    std::os::unix::fs::symlink(&victim, dir.path().join(shm_layout::PID_FILE)).unwrap();
    let out = broker_that_should_exit(dir.path());
    assert_untouched(&victim);
    assert_refused(&out, &["symbolic link"]);
}

#[test]
fn a_symlinked_table_is_not_followed_by_the_broker() {
    let dir = TempDir::new("symtable");
    let victim = victim(&dir);
    std::os::unix::fs::symlink(&victim, dir.path().join(shm_layout::TABLE_FILE)).unwrap();
    let out = broker_that_should_exit(dir.path());
    assert_untouched(&victim);
    assert_refused(&out, &["symbolic link", "table"]);
}

fn client_error(dir: &Path) -> String {
    let mut w = Worker::spawn(dir, &["hold", "k", "--hold-ms", "0"]);
    w.next_line("ERR")
}

#[test]
fn a_symlinked_table_is_not_followed_by_clients() {
    let dir = TempDir::new("symclient");
    let _b = Broker::start(dir.path(), KEEP_ALIVE);
    let table = dir.path().join(shm_layout::TABLE_FILE);
    let real = dir.path().join("table.real");
    std::fs::rename(&table, &real).unwrap();
    std::os::unix::fs::symlink(&real, &table).unwrap();
    let line = client_error(dir.path());
    assert!(
        line.starts_with("ERR") && line.contains("symbolic link"),
        "{line}"
    );
}

#[test]
fn clients_refuse_a_world_writable_table_or_one_of_another_owner() {
    let dir = TempDir::new("clientmode");
    let _b = Broker::start(dir.path(), KEEP_ALIVE);
    let table = dir.path().join(shm_layout::TABLE_FILE);
    std::fs::set_permissions(&table, PermissionsExt::from_mode(0o666)).unwrap();
    let line = client_error(dir.path());
    assert!(
        line.starts_with("ERR") && line.contains("writable by other users"),
        "{line}"
    );
    std::fs::set_permissions(&table, PermissionsExt::from_mode(0o660)).unwrap();
    std::os::unix::fs::chown(&table, Some(NOBODY), None).unwrap();
    let line = client_error(dir.path());
    assert!(
        line.starts_with("ERR") && line.contains("owned by uid 65534"),
        "{line}"
    );
}

/// Defect 5: one process of one uid registered every client record, so the
/// next client of anyone got `TooManyClients`. Now a uid may hold at most
/// `access.max_clients_per_uid` records (default: half of them). Before the
/// fix (no quota) the test process took all four records and the other
/// uid's worker was refused.
#[test]
fn one_uid_cannot_take_every_client_record() {
    let dir = TempDir::new("records-quota");
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let _b = Broker::start(
        dir.path(),
        &format!("{KEEP_ALIVE}[table]\nclients = 4\n[access]\ngroup = \"nogroup\"\n"),
    );
    let mut mine = Vec::new();
    let refusal = loop {
        match forelock::Client::connect_to(dir.path()) {
            Ok(c) => mine.push(c),
            Err(e) => break e,
        }
        assert!(mine.len() <= 4, "one uid registered every record");
    };
    assert_eq!(mine.len(), 2, "half the records per uid by default");
    assert!(
        matches!(refusal, forelock::Error::TooManyClients { ref message } if message.contains("max_clients_per_uid")),
        "{refusal}"
    );
    let out = as_nobody(
        worker_exe(),
        &[
            "--dir",
            dir.path().to_str().unwrap(),
            "hold",
            "k",
            "--hold-ms",
            "0",
        ],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HELD"),
        "another uid still gets a record: {text:?}"
    );
    // A Client dropped gives its record back at once (Bye).
    mine.pop();
    mine.push(forelock::Client::connect_to(dir.path()).unwrap());
}
