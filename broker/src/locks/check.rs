//! The explorer's hold on the manager (tests only): a fork at a branch
//! point, a digest of the state that decides its future, and the engine's
//! own invariants.

use super::LockManager;
use super::engine::Holder;

impl LockManager {
    /// A copy of this manager with its ledger on the heap: a branch point of
    /// the explorer (the table is copied by the caller). A clustered manager
    /// is forked with [`LockManager::fork_with_link`].
    #[cfg(any(test, feature = "model"))]
    pub fn fork(&self) -> LockManager {
        assert!(
            self.nodes.is_none(),
            "a clustered manager forks with its link's copy (fork_with_link)"
        );
        self.fork_inner(None)
    }

    /// A copy of this clustered manager whose node gate talks to `link` (the
    /// copy of the scripted agent that the explorer's branch point made).
    #[cfg(any(test, feature = "model"))]
    pub fn fork_with_link(&self, link: Box<dyn super::nodes::ClusterLink>) -> LockManager {
        self.fork_inner(Some(link))
    }

    fn fork_inner(&self, link: Option<Box<dyn super::nodes::ClusterLink>>) -> LockManager {
        LockManager {
            policy: self.policy,
            epoch: self.epoch,
            ledger: self.ledger.clone_to_heap(),
            dir: self.dir.clone(),
            registry: self.registry.clone(),
            waiting: self.waiting.clone(),
            predicted: self.predicted.clone(),
            now_ms: self.now_ms,
            nodes: match (&self.nodes, link) {
                (Some(n), Some(link)) => Some(n.fork(link)),
                (None, None) => None,
                _ => panic!("a link is given exactly when the manager is clustered"),
            },
        }
    }

    /// A hash of everything that decides this manager's future behaviour
    /// (the explorer's visited set; the table and ledger are hashed apart).
    #[cfg(any(test, feature = "model"))]
    pub fn digest(&self, h: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        for st in &self.dir.slots {
            st.key.hash(h);
            st.managed.hash(h);
            format!("{:?}", st.holder).hash(h);
            for w in &st.queue {
                (w.client, w.conn, w.cell, w.shared, w.request).hash(h);
            }
            (st.issued, st.base, st.last_counter, st.fast_grant).hash(h);
        }
        for c in &self.registry.clients {
            (c.active, c.pid, c.uid).hash(h);
        }
        let mut waiting: Vec<_> = self.waiting.iter().collect();
        waiting.sort();
        waiting.hash(h);
        let mut died: Vec<_> = self.dir.died_keys.iter().collect();
        died.sort();
        died.hash(h);
        if let Some(n) = &self.nodes {
            n.digest(h);
        }
    }

    /// The engine's own invariants, checked by the explorer after every step:
    /// - no waiter starves while its key is free (a queue's head is served
    ///   whenever the holder allows it);
    /// - every queued waiter is in the connection map, and nothing else is;
    /// - the ledger records exactly the holds the manager knows of managed
    ///   slots (so a restart rebuilds the same holders), and flags
    ///   `on_fast_path` exactly the records of prepared slots' `fast_grant`;
    /// - no client that is not active holds or waits for anything;
    /// - the tick's list of keyed slots names exactly the slots with a key.
    #[cfg(any(test, feature = "model"))]
    pub fn check(&self) -> Result<(), String> {
        let mut queued = 0;
        let mut keyed = self.dir.next_keyed(0);
        for (s, st) in self.dir.slots.iter().enumerate() {
            if st.key.is_some() != (keyed == Some(s as u32)) {
                return Err(format!(
                    "slot {s}: keyed {} but the keyed list's next is {keyed:?}",
                    st.key.is_some()
                ));
            }
            if st.key.is_some() {
                keyed = self.dir.next_keyed(s as u32 + 1);
            }
            if let Some(head) = st.queue.front()
                && st.holder.admits(head.shared)
            {
                // A global key's head may wait for its node grant, which
                // must then be here (not admitting yet: a callback, a
                // release under way) or asked for.
                if self.slot_admits(s as u32, head.shared) {
                    return Err(format!(
                        "slot {s}: waiter {head:?} starves behind {:?}",
                        st.holder
                    ));
                }
                if let (Some(n), Some(k)) = (&self.nodes, &st.key)
                    && !n.is_coming(k)
                {
                    return Err(format!(
                        "slot {s}: waiter {head:?} waits for a node grant nobody asked for"
                    ));
                }
            }
            for w in &st.queue {
                queued += 1;
                if self.waiting.get(&w.conn) != Some(&(s as u32)) {
                    return Err(format!(
                        "slot {s}: waiter {w:?} missing from the connection map"
                    ));
                }
                if !self.registry.clients[w.client as usize].active {
                    return Err(format!("slot {s}: waiter {w:?} of an inactive client"));
                }
            }
        }
        if queued != self.waiting.len() {
            return Err(format!(
                "{} waiters mapped, {queued} queued",
                self.waiting.len()
            ));
        }
        for (c, cs) in self.registry.clients.iter().enumerate() {
            let c = c as u32;
            let mut recorded: Vec<(u32, u64)> = self
                .ledger
                .holds(c)
                .filter(|(_, h)| !h.on_fast_path)
                .map(|(_, h)| (h.slot, h.token))
                .collect();
            let mut fast_recorded: Vec<(u32, u64)> = self
                .ledger
                .holds(c)
                .filter(|(_, h)| h.on_fast_path)
                .map(|(_, h)| (h.slot, h.token))
                .collect();
            if !cs.active {
                if !recorded.is_empty()
                    || !fast_recorded.is_empty()
                    || self.ledger.client(c).is_some()
                {
                    return Err(format!("inactive client {c} still in the ledger"));
                }
                continue;
            }
            let mut held: Vec<(u32, u64)> = Vec::new();
            for (s, st) in self.dir.slots.iter().enumerate() {
                match &st.holder {
                    Holder::Exclusive { client, token, .. } if *client == c => {
                        held.push((s as u32, *token))
                    }
                    Holder::Shared(v) => held.extend(
                        v.iter()
                            .filter(|(h, _)| *h == c)
                            .map(|&(_, t)| (s as u32, t)),
                    ),
                    _ => {}
                }
            }
            let mut fast_granted: Vec<(u32, u64)> = Vec::new();
            for (s, st) in self.dir.slots.iter().enumerate() {
                if let Some((client, token)) = st.fast_grant {
                    if st.managed {
                        return Err(format!("slot {s}: managed with a fast-path record"));
                    }
                    if client == c {
                        fast_granted.push((s as u32, token));
                    }
                }
            }
            fast_recorded.sort();
            fast_granted.sort();
            if fast_recorded != fast_granted {
                return Err(format!(
                    "client {c}: ledger fast-path records {fast_recorded:?}, manager {fast_granted:?}"
                ));
            }
            recorded.sort();
            held.sort();
            if recorded != held {
                return Err(format!(
                    "client {c}: ledger holds {recorded:?}, manager {held:?}"
                ));
            }
        }
        Ok(())
    }
}
