//! Who a broker is on the gossip: its node name, the address peers reach it
//! at, and a boot id that grows with every start, so that a restarted broker
//! is a new identity that wins over its previous one at the same address
//! (foca's `Identity::win_addr_conflict`) and rejoins at once instead of
//! being ignored as a member already declared down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A broker's identity on the gossip. foca keys its member list by
/// [`NodeId::addr`]: one entry per address, the newest boot winning.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct NodeId {
    /// The `[cluster] node` name.
    pub(crate) node: String,
    /// The address the broker's gossip socket is bound to.
    pub(crate) addr: SocketAddr,
    /// Microseconds since the Unix epoch at start (made unique within a
    /// process), plus one per automatic rejoin (see [`NodeId::renew`]).
    pub(crate) boot: u64,
}

impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}#{}", self.node, self.addr, self.boot)
    }
}

impl NodeId {
    /// The identity of a broker starting now.
    pub(crate) fn starting_now(node: String, addr: SocketAddr) -> NodeId {
        NodeId {
            node,
            addr,
            boot: next_boot_id(),
        }
    }

    /// A stand-in for a seed whose name and boot we do not know yet. foca
    /// accepts an `Announce` addressed to any identity with its own address,
    /// so this is enough to join through a seed; the seed's reply carries
    /// its real identity.
    pub(crate) fn seed(addr: SocketAddr) -> NodeId {
        NodeId {
            node: String::new(),
            addr,
            boot: 0,
        }
    }
}

/// Wall-clock microseconds, but never the same value twice in one process
/// and never smaller than the last one handed out. Across processes it relies
/// on the wall clock moving forward between a broker's stop and its restart
/// (a restart after the clock was set back by more than the broker's downtime
/// would start with a boot id that loses to its own previous identity, and
/// rejoin only when the others forget that one: foca's `remove_down_after`).
fn next_boot_id() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    // Relaxed is enough: the counter orders nothing but itself.
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last.saturating_add(1));
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(found) => last = found,
        }
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    /// Declared down by the others (a pause, a partition), a broker comes
    /// back at once as boot + 1, which wins over the identity they buried.
    fn renew(&self) -> Option<NodeId> {
        Some(NodeId {
            node: self.node.clone(),
            addr: self.addr,
            boot: self.boot.checked_add(1)?,
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Two identities at one address: the later boot wins; equal boots (two
    /// brokers misconfigured with one address, or a forged packet) are
    /// ordered by name so that every member picks the same winner.
    fn win_addr_conflict(&self, adversary: &NodeId) -> bool {
        (self.boot, &self.node) > (adversary.boot, &adversary.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn boot_ids_handed_out_in_one_process_strictly_increase() {
        let mut last = next_boot_id();
        for _ in 0..1000 {
            let next = next_boot_id();
            assert!(next > last, "{next} after {last}");
            last = next;
        }
    }

    #[test]
    fn a_restarted_broker_wins_over_its_previous_identity() {
        let addr: SocketAddr = "127.0.0.1:7946".parse().unwrap();
        let before = NodeId::starting_now("h1".into(), addr);
        let after = NodeId::starting_now("h1".into(), addr);
        assert!(after.win_addr_conflict(&before));
        assert!(!before.win_addr_conflict(&after));
        let renewed = before.renew().unwrap();
        assert!(renewed.win_addr_conflict(&before));
        assert_eq!(renewed.addr(), before.addr());
    }

    #[test]
    fn equal_boots_at_one_address_have_one_winner() {
        let addr: SocketAddr = "127.0.0.1:7946".parse().unwrap();
        let a = NodeId {
            node: "a".into(),
            addr,
            boot: 7,
        };
        let b = NodeId {
            node: "b".into(),
            addr,
            boot: 7,
        };
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
    }
}
