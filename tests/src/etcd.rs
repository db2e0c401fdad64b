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

fn free_port() -> u16 {
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
        if Command::new("etcd").arg("--version").output().is_err() {
            assert!(
                std::env::var_os("FORELOCK_REQUIRE_CLUSTER").is_none(),
                "etcd is not installed: run .ci/install.sh (Debian's etcd-server)"
            );
            eprintln!("SKIP: etcd is not installed (apt-get install etcd-server)");
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
