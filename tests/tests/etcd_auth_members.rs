//! The lease's keep-alive through every member of a three-member etcd
//! with auth on, when one member is down as the agent starts: with auth,
//! making a client of an endpoint authenticates through it, which fails
//! while its member is down. The keep-alive retries that until the member
//! is up (broker/cluster/src/keepalive.rs, `Dial`), so the endpoint gets
//! its keep-alive, and its health tracking, once the member is back.
//!
//! Skips with a message when `etcd` is not installed, unless
//! FORELOCK_REQUIRE_CLUSTER=1 (CI), where it fails instead.

use forelock_cluster::{Agent, ClusterConfig, Command, Event};
use forelock_tests::etcd::{etcd_installed, etcdctl, free_port};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Three etcd members on loopback, killed and their data removed on drop.
struct Members {
    children: Vec<Option<Child>>,
    clients: Vec<String>,
    peers: Vec<String>,
    dir: PathBuf,
}

impl Drop for Members {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.stop(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Members {
    fn start() -> Option<Members> {
        if !etcd_installed() {
            return None;
        }
        let url = |_| format!("http://127.0.0.1:{}", free_port());
        let mut m = Members {
            children: vec![None, None, None],
            clients: (0..3).map(url).collect(),
            peers: (0..3).map(url).collect(),
            dir: std::env::temp_dir().join(format!("fl-etcd3-{}", std::process::id())),
        };
        for i in 0..3 {
            m.run(i);
        }
        m.wait_healthy(&m.clients.join(","));
        Some(m)
    }

    /// Starts member `i` (again, on its data if it ran before).
    fn run(&mut self, i: usize) {
        let cluster: Vec<String> = (0..3).map(|j| format!("m{j}={}", self.peers[j])).collect();
        let child = std::process::Command::new("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.join(format!("m{i}")))
            .args(["--listen-client-urls", &self.clients[i]])
            .args(["--advertise-client-urls", &self.clients[i]])
            .args(["--listen-peer-urls", &self.peers[i]])
            .args(["--initial-advertise-peer-urls", &self.peers[i]])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.children[i] = Some(child);
    }

    fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_healthy(&self, endpoints: &str) {
        let end = Instant::now() + Duration::from_secs(60);
        while etcdctl(endpoints, &["endpoint", "health", "--user", "root:root-pw"]).is_none()
            && etcdctl(endpoints, &["endpoint", "health"]).is_none()
        {
            assert!(Instant::now() < end, "etcd members {endpoints} not healthy");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn a_member_down_at_start_gets_its_keep_alive_once_it_is_up_with_auth_on() {
    let Some(mut etcd) = Members::start() else {
        return;
    };
    for step in [
        &["user", "add", "root:root-pw"][..],
        &["auth", "enable"][..],
    ] {
        etcdctl(&etcd.clients[0], step).unwrap_or_else(|| panic!("etcdctl {step:?}"));
    }
    etcd.stop(2);
    let password = etcd.dir.join("password");
    std::fs::write(&password, "root-pw\n").unwrap();
    let a = Agent::start(ClusterConfig {
        node: "a".into(),
        etcd: etcd.clients.clone(),
        etcd_prefix: format!("/fl-test-{}", std::process::id()),
        lease_ttl_ms: 5_000,
        etcd_user: "root".into(),
        etcd_password_file: password.to_string_lossy().into_owned(),
        ..ClusterConfig::default()
    })
    .unwrap();
    let through = |a: &Agent| a.status.lock().unwrap().renewed_through.clone();
    let end = Instant::now() + Duration::from_secs(30);
    while !through(&a).contains(&etcd.clients[0]) || !through(&a).contains(&etcd.clients[1]) {
        assert!(Instant::now() < end, "no renewal through the members up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!through(&a).contains(&etcd.clients[2]), "{:?}", through(&a));
    // The agent works with the member down.
    let key = b"global/auth-members".to_vec();
    a.send(Command::Want {
        key: key.clone(),
        shared: false,
        prefetch: false,
    });
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(Event::Granted { .. }) = a.drain().into_iter().next() {
            break;
        }
        assert!(Instant::now() < end, "no grant with one member down");
        std::thread::sleep(Duration::from_millis(10));
    }
    etcd.run(2);
    let end = Instant::now() + Duration::from_secs(60);
    while !through(&a).contains(&etcd.clients[2]) {
        assert!(
            Instant::now() < end,
            "no renewal through the member started again: {:?}",
            through(&a)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
