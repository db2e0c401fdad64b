//! Three real etcd members (Debian `etcd-server` 3.4), one per namespace.

use super::net::{Member, Net};
use super::{ETCD, ETCDCTL, run, wait_until};
use crate::TempDir;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Heartbeat and election timeout, in ms: 10x apart, and long enough that a
/// loaded 2-core machine's pauses do not start elections by themselves.
pub const HEARTBEAT_MS: u64 = 150;
pub const ELECTION_MS: u64 = 1500;

/// How long the cluster may take to become healthy (a loaded machine).
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

struct EtcdMember {
    member: Member,
    child: Option<Child>,
}

/// Three etcd members in the namespaces `e1..e3` of a [`Net`]; killed and
/// their data removed on drop.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    data: TempDir,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Start the three members and wait until all are healthy.
    pub fn start(net: &Net) -> Result<EtcdCluster, String> {
        let members = net.etcd_members();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:2380", m.name, m.addr))
            .collect::<Vec<_>>()
            .join(",");
        // etcd fsyncs its WAL: on tmpfs that costs nothing.
        let base = std::path::Path::new("/dev/shm");
        let data = if base.is_dir() {
            let d = base.join(format!("fl-etcd-{}", net.prefix));
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            TempDir(d)
        } else {
            TempDir::new("etcd")
        };
        let mut cluster = EtcdCluster {
            members: members
                .into_iter()
                .map(|member| EtcdMember {
                    member,
                    child: None,
                })
                .collect(),
            data,
            initial_cluster,
        };
        for i in 0..3 {
            cluster.spawn(i)?;
        }
        if !cluster.wait_healthy(HEALTHY_WITHIN) {
            return Err(format!(
                "etcd did not become healthy within {HEALTHY_WITHIN:?}:\n{}",
                cluster.logs()
            ));
        }
        Ok(cluster)
    }

    fn index(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.member.name == name)
            .unwrap_or_else(|| panic!("no etcd member {name}"))
    }

    fn log_path(&self, i: usize) -> std::path::PathBuf {
        self.data
            .path()
            .join(format!("{}.log", self.members[i].member.name))
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let m = self.members[i].member.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .map_err(|e| e.to_string())?;
        let peer = format!("http://{}:2380", m.addr);
        let client = format!("http://{}:2379", m.addr);
        let dir = self.data.path().join(&m.name);
        // setpriv --pdeathsig: the member dies with the test process even
        // if the test is killed before its drop runs.
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "ip", "netns", "exec", &m.ns, ETCD])
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "forelock-harness"])
            .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
            .args(["--election-timeout", &ELECTION_MS.to_string()])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {ETCD}: {e}"))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}:2379", m.member.addr))
            .collect()
    }

    /// `etcdctl` run in `from`'s namespace against `endpoints` (all if
    /// empty), with short dial and command timeouts.
    pub fn etcdctl(&self, net: &Net, from: &str, endpoints: &[String]) -> Command {
        let eps = if endpoints.is_empty() {
            self.endpoints()
        } else {
            endpoints.to_vec()
        };
        let mut c = net.command(from, ETCDCTL);
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", eps.join(",")))
            .args(["--dial-timeout=2s", "--command-timeout=3s"]);
        c
    }

    /// Whether every running member answers `endpoint health` (asked from
    /// each member's own namespace).
    pub fn healthy(&self) -> bool {
        self.members.iter().all(|m| {
            m.child.is_none() || {
                let ep = format!("http://{}:2379", m.member.addr);
                Command::new("ip")
                    .args(["netns", "exec", &m.member.ns, ETCDCTL])
                    .env("ETCDCTL_API", "3")
                    .arg(format!("--endpoints={ep}"))
                    .args(["--dial-timeout=2s", "--command-timeout=3s"])
                    .args(["endpoint", "health"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            }
        })
    }

    pub fn wait_healthy(&self, limit: Duration) -> bool {
        wait_until(limit, || self.healthy())
    }

    /// The member the running members agree is the leader, if they agree.
    pub fn leader(&self) -> Option<String> {
        let mut seen: Option<u64> = None;
        let mut ids = Vec::new();
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let ep = format!("http://{}:2379", m.member.addr);
            let out = run(Command::new("ip")
                .args(["netns", "exec", &m.member.ns, ETCDCTL])
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={ep}"))
                .args(["--dial-timeout=2s", "--command-timeout=3s"])
                .args(["endpoint", "status", "-w", "json"]))
            .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let status = &v.get(0)?["Status"];
            let leader = status["leader"].as_u64()?;
            let me = status["header"]["member_id"].as_u64()?;
            if leader == 0 || seen.is_some_and(|s| s != leader) {
                return None;
            }
            seen = Some(leader);
            ids.push((me, m.member.name.clone()));
        }
        let leader = seen?;
        ids.into_iter()
            .find(|(id, _)| *id == leader)
            .map(|(_, n)| n)
    }

    /// Wait for an agreed leader.
    pub fn wait_leader(&self, limit: Duration) -> Option<String> {
        let mut found = None;
        wait_until(limit, || {
            found = self.leader();
            found.is_some()
        });
        found
    }

    /// SIGKILL member `name` (`e1`..`e3`) and reap it.
    pub fn kill(&mut self, name: &str) {
        let i = self.index(name);
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `name` again on its data directory.
    pub fn restart(&mut self, name: &str) -> Result<(), String> {
        let i = self.index(name);
        assert!(self.members[i].child.is_none(), "{name} is running");
        self.spawn(i)
    }

    pub fn is_running(&self, name: &str) -> bool {
        self.members[self.index(name)].child.is_some()
    }

    /// The members' logs.
    pub fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                format!(
                    "--- etcd {} ---\n{}",
                    self.members[i].member.name,
                    std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::env::var("FORELOCK_CLUSTER_KEEP_LOGS").is_ok_and(|v| v == "1") {
            eprintln!("{}", self.logs());
        }
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
