//! One real etcd member (Debian's etcd-server) on loopback, for the tests of
//! global keys that need an etcd but no network faults. The multi-host
//! harness (three members in network namespaces) is separate.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running single-member etcd, killed and its data removed on drop.
pub struct LocalEtcd {
    child: Child,
    pub url: String,
    dir: std::path::PathBuf,
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether Debian's etcd is installed. Where it is not, says `SKIP` and
/// why (the caller returns), or fails the test with FORELOCK_REQUIRE_CLUSTER
/// set (CI).
pub fn etcd_installed() -> bool {
    if Command::new("etcd").arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("FORELOCK_REQUIRE_CLUSTER").is_none(),
        "etcd is not installed: run .ci/install.sh (Debian's etcd-server)"
    );
    eprintln!("SKIP: etcd is not installed (apt-get install etcd-server)");
    false
}

/// A loopback port free now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl LocalEtcd {
    /// Starts etcd, or returns `None` (with a SKIP message) when it is not
    /// installed. With FORELOCK_REQUIRE_CLUSTER set (CI) a missing etcd
    /// fails instead.
    pub fn start() -> Option<LocalEtcd> {
        LocalEtcd::start_serving("http", &[], |url| {
            etcdctl(url, &["endpoint", "health"]).is_some()
        })
    }

    /// [`LocalEtcd::start`] for clients on `scheme` (`http` or `https`),
    /// with `extra` arguments (TLS files, auth settings); healthy once
    /// `healthy(url)` says so.
    pub fn start_serving(
        scheme: &str,
        extra: &[std::ffi::OsString],
        healthy: impl Fn(&str) -> bool,
    ) -> Option<LocalEtcd> {
        if !etcd_installed() {
            return None;
        }
        let (client, peer) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("fl-etcd-{}-{client}", std::process::id()));
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let etcd = LocalEtcd { child, url, dir };
        let end = Instant::now() + crate::PATIENCE;
        while !healthy(&etcd.url) {
            assert!(Instant::now() < end, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(etcd)
    }
}

/// Runs `etcdctl --endpoints url ARGS` (API v3); its stdout if it succeeded.
pub fn etcdctl(url: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", url, "--command-timeout", "2s"])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `[cluster]` section of a broker named `node` on the etcd at `url`,
/// under a prefix of this test process: a 4 s lease, so that a revoked or
/// lost lease shows within seconds.
pub fn cluster_config(node: &str, url: &str) -> String {
    format!(
        "[cluster]\nnode = \"{node}\"\netcd = [\"{url}\"]\netcd_prefix = \"/fl-{pid}\"\n\
         lease_ttl_ms = 4000\nlock_delay_ms = 200\nfence_margin_ms = 1000\nmin_hold_ms = 5\n",
        pid = std::process::id()
    )
}

/// The broker's `cluster.json` in `dir`, parsed (bounded wait for it).
pub fn cluster_status(dir: &std::path::Path) -> serde_json::Value {
    let end = Instant::now() + crate::PATIENCE;
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join("cluster.json"))
            && let Ok(v) = serde_json::from_str(&text)
        {
            return v;
        }
        assert!(Instant::now() < end, "no cluster.json in {}", dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Revoke, behind its back, the etcd lease of the broker on `dir`, and wait
/// until that broker has fenced once more (its holds of global keys are then
/// lost).
pub fn revoke_the_lease_of(dir: &std::path::Path, url: &str) {
    let fences = || cluster_status(dir)["fences"].as_u64().unwrap_or(0);
    let before = fences();
    // cluster.json is rewritten every 500 ms: the lease there may be none yet
    // (id "0") though a lock was granted under one, or one revoked already.
    let end = Instant::now() + crate::PATIENCE;
    loop {
        let id = cluster_status(dir)["lease"]["id"]
            .as_str()
            .expect("cluster.json names its lease")
            .to_string();
        if id != "0" && etcdctl(url, &["lease", "revoke", &id]).is_some() {
            break;
        }
        assert!(
            Instant::now() < end,
            "no lease of the broker in {} could be revoked",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    while fences() == before {
        assert!(
            Instant::now() < end + crate::PATIENCE,
            "the broker in {} never noticed its lease was gone",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
