//! `forelockd`, the forelock broker: it owns the lock table, serves the slow
//! path (unprepared and contended keys) on an io_uring event loop, hands locks
//! off in FIFO order, releases the locks of clients that die, and prepares
//! keys ahead of requests.
//!
//! | module | job |
//! |---|---|
//! | [`config`] | the TOML configuration and its embedded defaults |
//! | [`files`] | the runtime directory: creating or adopting the mapped files |
//! | [`locks`] | where a lock is granted, queued, handed off, released for the dead |
//! | [`allocator`] | the preparation policy, pure: which keys to prepare, reclaim, evict |
//! | [`allocator_glue`] | runs the preparation policy every tick |
//! | [`cluster_glue`] | the cluster agent's link and status file (global keys, docs/cluster.md) |
//! | [`event_loop`] | io_uring: socket, pidfds, timers, signals, futex wakes |
//! | [`metrics`] | latency histograms |
//!
//! The binary is a thin `main` over [`event_loop::EventLoop`].

pub mod allocator;
pub mod allocator_glue;
pub mod cluster_glue;
pub mod config;
pub mod event_loop;
pub mod files;
pub mod ledger;
pub mod locks;
pub mod metrics;
