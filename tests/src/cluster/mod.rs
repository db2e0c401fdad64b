//! The multi-host harness (docs/cluster.md, "Running the multi-host tests").
//!
//! One machine plays a cluster: a bridge and network namespaces made with
//! `ip` ([`Net`]), three real etcd members in three of them
//! ([`EtcdCluster`]), a broker in each host namespace ([`Host`]), faults
//! from nftables rules and links set down inside a namespace ([`Net`]'s
//! fault methods), and the fenced-resource checker ([`fenced`]) that holders
//! on every host read-modify-write through.
//!
//! Everything is torn down on drop, after a panic too: processes in the
//! namespaces, the namespaces (with their nftables tables and veths), the
//! bridge. Names are unique per instance (pid and a counter), and a
//! process-wide lock serializes the cluster tests of one test binary (they
//! are heavy on a 2-core machine).
//!
//! Environment:
//! - `FORELOCK_REQUIRE_CLUSTER=1`: fail, instead of skipping, where the
//!   harness cannot run (not root, no `ip netns`, no etcd). CI sets it.
//! - `FORELOCK_CLUSTER_ROUNDS=N`: rounds of each fault (default 2).
//! - `FORELOCK_CLUSTER_KEEP_LOGS=1`: print the etcd and broker logs at the end.

pub mod etcd;
pub mod fenced;
pub mod host;
pub mod net;

pub use etcd::EtcdCluster;
pub use host::{Host, HostOptions};
pub use net::{Direction, Member, Net};

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// etcd's server binary (Debian `etcd-server`).
pub const ETCD: &str = "/usr/bin/etcd";
/// etcd's client (Debian `etcd-client`).
pub const ETCDCTL: &str = "etcdctl";
/// libfaketime (Debian `faketime`).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Whether a harness that cannot run must fail (CI) rather than skip.
pub fn required() -> bool {
    std::env::var("FORELOCK_REQUIRE_CLUSTER").is_ok_and(|v| v == "1")
}

/// Rounds of each fault: `FORELOCK_CLUSTER_ROUNDS`, default 2.
pub fn rounds() -> u32 {
    std::env::var("FORELOCK_CLUSTER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// Skip (print why, return) or, with `FORELOCK_REQUIRE_CLUSTER=1`, fail.
pub fn skip(test: &str, why: &str) {
    assert!(
        !required(),
        "{test}: the multi-host harness cannot run: {why} (FORELOCK_REQUIRE_CLUSTER=1 makes this a failure)"
    );
    eprintln!(
        "SKIPPED {test}: {why}; run as root on a machine with iproute2, nftables and etcd-server to run it"
    );
}

/// Why the harness cannot run here, if it cannot: not root, or a tool
/// missing. (Whether namespaces can be made is found out by [`Net::new`].)
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    for (tool, version, package) in [
        ("ip", "-V", "iproute2"),
        ("nft", "--version", "nftables"),
        (ETCD, "--version", "etcd-server"),
        (ETCDCTL, "version", "etcd-client"),
        ("setpriv", "--version", "util-linux"),
    ] {
        let found = Command::new(tool)
            .arg(version)
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is missing (Debian package {package})"));
        }
    }
    None
}

/// Run `command`, returning its output; an error names the command.
pub fn run(command: &mut Command) -> Result<Output, String> {
    let out = command
        .output()
        .map_err(|e| format!("{command:?}: cannot start: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{command:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// Wait until `done()` or `limit` passes; `true` if done.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
