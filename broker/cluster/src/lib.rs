//! The cluster agent: how a broker holds global keys across hosts.
//!
//! etcd is the authority (see `docs/cluster.md`): one key per waiting host
//! under the lock's prefix, attached to the host's lease; the lowest create
//! revision holds; each host watches its predecessor. This crate talks to
//! etcd and to the other brokers (gossip) on a thread of its own; the broker's
//! grant engine sees only [`Command`]s going out and [`Event`]s coming back.

pub mod config;
pub mod gossip;

pub use config::ClusterConfig;
pub mod agent;
pub mod etcd_access;
pub mod etcd_lock;
pub mod keepalive;
pub mod watches;

pub use agent::{Agent, Command, Event, Lease};
