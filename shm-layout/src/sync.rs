//! The one place this workspace takes its atomics from.
//!
//! Under `--cfg loom` the types come from loom, so the lock-word transitions in
//! [`crate::lockword`] can be model-checked on heap memory. Loom cannot check the
//! `#[repr(C)]` structs in a real shared mapping (its atomics have another layout),
//! so those always use `core` atomics: see [`shm`].

#[cfg(not(loom))]
pub use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// Atomics for `#[repr(C)]` types that live in shared memory. Always the real
/// ones: their size and alignment are part of the file format.
pub mod shm {
    pub use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
}
