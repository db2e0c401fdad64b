//! The broker's side of the cluster agent (`forelock-cluster`): the link the
//! grant engine's node gate talks through, and the status file that
//! `forelock status` reads.

use crate::locks::{ClusterLink, LockManager};
use crate::metrics::ClusterGauges;
use forelock_cluster::{Agent, ClusterConfig, Command};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The status file in the runtime directory: JSON, rewritten every tick.
pub const STATUS_FILE: &str = "cluster.json";

/// The node gate's link to the running agent.
pub struct AgentLink(pub Rc<Agent>);

impl ClusterLink for AgentLink {
    fn is_global(&self, key: &[u8]) -> bool {
        self.0.config.is_global(key)
    }
    fn send(&mut self, command: Command) {
        self.0.send(command);
    }
    fn lease_valid(&self, epoch: u64) -> bool {
        self.0.lease.valid(epoch, shm_layout::monotonic_ns())
    }
    fn safe_until_ns(&self, epoch: u64) -> u64 {
        let lease = self.0.lease.get();
        if lease.epoch == epoch && epoch != 0 {
            lease.valid_until_ns
        } else {
            0
        }
    }
    fn min_hold_ms(&self) -> u64 {
        self.0.config.min_hold_ms
    }
}

/// Starts the agent and installs its link in `manager`.
pub fn start(
    config: &ClusterConfig,
    manager: &mut LockManager,
    table: &shm_layout::table::TableView,
) -> anyhow::Result<Rc<Agent>> {
    let agent = Rc::new(Agent::start(config.clone())?);
    manager.set_cluster(table, Box::new(AgentLink(agent.clone())));
    tracing::info!(node = %config.node, etcd = ?config.etcd, prefix = %config.key_prefix, "cluster agent started");
    Ok(agent)
}

/// Writes `cluster.json` (atomically: a temporary file renamed over it);
/// the same state's figures for Prometheus.
pub fn write_status(dir: &Path, agent: &Agent, manager: &LockManager) -> ClusterGauges {
    let lease = agent.lease.get();
    let now = shm_layout::monotonic_ns();
    let status = agent
        .status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let counts = manager.node_counts().unwrap_or_default();
    let mut keys: Vec<(String, &str, Option<&String>)> = status
        .keys
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                *v,
                status.holders.get(k),
            )
        })
        .collect();
    keys.sort();
    let json = serde_json::json!({
        "node": agent.config.node,
        "etcd": agent.config.etcd,
        "connected": status.connected,
        "last_error": status.last_error,
        "lease": {
            "id": format!("{:x}", lease.id),
            "epoch": lease.epoch,
            "safe_for_ms": lease.valid_until_ns.saturating_sub(now) / 1_000_000,
        },
        "fences": status.fences,
        "members": status.members.iter().map(|(n, a, up)| serde_json::json!({"node": n, "addr": a, "up": up})).collect::<Vec<_>>(),
        "hot": status.hot,
        "key_prefix": agent.config.key_prefix,
        "keys": keys.iter().map(|(k, v, h)| serde_json::json!({"key": k, "state": v, "holder": h})).collect::<Vec<_>>(),
        "node_grants": counts.held,
        "wanted": counts.wanted,
        "lost_holds": counts.lost_holds,
        "prefetch_hits": counts.prefetch_hits,
        "prefetch_unused": counts.prefetch_unused,
        "prefetch_unused_wait_us": counts.prefetch_unused_wait_us,
        "first_uses_waited": counts.first_uses_waited,
    });
    let path: PathBuf = dir.join(STATUS_FILE);
    let tmp = dir.join(".cluster.json.tmp");
    if std::fs::write(&tmp, json.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
    let up = status.members.iter().filter(|(_, _, up)| *up).count() as u64;
    ClusterGauges {
        connected: status.connected,
        safe_for_ms: lease.valid_until_ns.saturating_sub(now) / 1_000_000,
        fences: status.fences,
        node_grants: counts.held as u64,
        wanted: counts.wanted as u64,
        lost_holds: counts.lost_holds as u64,
        prefetch_hits: counts.prefetch_hits,
        first_uses_waited: counts.first_uses_waited,
        prefetch_unused: counts.prefetch_unused,
        prefetch_unused_wait_us: counts.prefetch_unused_wait_us,
        members_up: up,
        members_down: status.members.len() as u64 - up,
    }
}
