//! What can be tested of the systemd integration without systemd as PID 1:
//! the notify protocol against a NOTIFY_SOCKET this test listens on, and
//! `systemd-analyze verify` on the unit files.

mod support;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Instant;
use support::*;

/// Read notify datagrams until every one of `wanted` has arrived (bounded).
fn await_messages(socket: &UnixDatagram, wanted: &[&str]) -> Vec<String> {
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    while !wanted
        .iter()
        .all(|w| seen.iter().any(|m| m.lines().any(|l| l == *w)))
    {
        assert!(
            Instant::now() < deadline,
            "never received {wanted:?}; got {seen:?}"
        );
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notify message ({e}); got so far {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    seen
}

#[test]
fn forelockd_notifies_ready_watchdog_and_stopping() {
    let dir = TempDir::new("notify");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let path_text = path.to_str().unwrap().to_owned();
    // 200 ms: forelockd pings every half of it.
    let mut broker = Broker::start_with(
        dir.path(),
        "[table]\nslots = 64\nclients = 8\n",
        &[("NOTIFY_SOCKET", &path_text), ("WATCHDOG_USEC", "200000")],
    );
    await_messages(&socket, &["READY=1", "WATCHDOG=1"]);
    let child = broker.child.take().unwrap();
    // SAFETY: kill takes plain integers; the child is ours and unreaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    await_messages(&socket, &["STOPPING=1"]);
    let out = wait_output(child);
    assert!(
        out.status.success(),
        "SIGTERM is a clean stop: {:?}",
        out.status
    );
}

#[test]
fn without_a_watchdog_forelockd_sends_ready_and_no_watchdog_ping() {
    let dir = TempDir::new("notify-nowd");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let path_text = path.to_str().unwrap().to_owned();
    let mut broker = Broker::start_with(
        dir.path(),
        "[table]\nslots = 64\nclients = 8\n",
        &[("NOTIFY_SOCKET", &path_text)],
    );
    let seen = await_messages(&socket, &["READY=1"]);
    let child = broker.child.take().unwrap();
    // SAFETY: kill takes plain integers; the child is ours and unreaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let rest = await_messages(&socket, &["STOPPING=1"]);
    let _ = wait_output(child);
    assert!(
        !seen.iter().chain(&rest).any(|m| m.contains("WATCHDOG=1")),
        "no WATCHDOG_USEC, no pings: {seen:?} {rest:?}"
    );
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tools/ sits in the workspace")
        .to_owned()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (apt-get install systemd): the unit \
             files were not verified"
        );
        return;
    };
    let dir = TempDir::new("units");
    // verify checks that ExecStart exists: point it at binaries that do.
    let broker = broker_exe();
    let predictor = Path::new(cli_exe()).with_file_name("forelock-predictor");
    let predictor = if predictor.is_file() {
        predictor
    } else {
        PathBuf::from("/bin/true")
    };
    let units = [
        ("forelockd.service", "/usr/local/bin/forelockd", broker),
        (
            "forelock-predictor.service",
            "/usr/local/bin/forelock-predictor",
            predictor,
        ),
    ];
    let mut paths = Vec::new();
    for (name, installed, built) in &units {
        let text = std::fs::read_to_string(repo_root().join("systemd").join(name)).unwrap();
        assert!(text.contains(installed), "{name} runs {installed}");
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace(installed, built.to_str().unwrap())).unwrap();
        paths.push(path);
    }
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .args(&paths)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Unknown or misspelt directives are only warnings: refuse those too.
    let about_ours: Vec<&str> = err.lines().filter(|l| l.contains("forelock")).collect();
    assert!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze verify complained:\n{err}"
    );
}
