//! The peers forelock is compared with, each a [`SystemEntry`]: what a user
//! would otherwise run to lock something on one host.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::AtomicU32;

use anyhow::Context;
use memmap2::MmapMut;

use super::system::SystemEntry;

mod etcd;
mod file_locks;
mod futex;
mod no_lock;
mod pthread;
mod redis;
mod std_mutex;
mod unix_socket;

/// Every peer, in the order the table lists them.
pub fn entries() -> Vec<SystemEntry> {
    vec![
        std_mutex::ENTRY,
        futex::ENTRY,
        pthread::ENTRY,
        unix_socket::ENTRY,
        file_locks::FLOCK_ENTRY,
        file_locks::OFD_ENTRY,
        redis::ENTRY,
        etcd::ENTRY,
        no_lock::ENTRY,
    ]
}

/// A file mapped MAP_SHARED into this process: every process that maps the
/// same file sees the same bytes (shared memory through the page cache).
pub struct SharedMap {
    map: MmapMut,
}

impl SharedMap {
    /// Creates (or truncates) `path` to `len` zero bytes and maps it.
    pub fn create(path: &Path, len: usize) -> anyhow::Result<SharedMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.set_len(len as u64)
            .with_context(|| format!("sizing {} to {len} bytes", path.display()))?;
        SharedMap::map(&file, path)
    }

    /// Maps an existing file made by [`SharedMap::create`].
    pub fn open(path: &Path) -> anyhow::Result<SharedMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        SharedMap::map(&file, path)
    }

    fn map(file: &File, path: &Path) -> anyhow::Result<SharedMap> {
        // SAFETY:
        // - the file is private to one bench run (a fresh temporary directory);
        //   no process truncates it while mapped, so the mapping stays valid;
        // - other processes change the bytes concurrently, which is why this
        //   module only reads and writes them through atomics or through
        //   pthread functions made for process-shared memory.
        let map = unsafe { MmapMut::map_mut(file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        Ok(SharedMap { map })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// The mapping as 32-bit atomic words (trailing bytes ignored).
    pub fn words_u32(&self) -> &[AtomicU32] {
        let words = self.map.len() / std::mem::size_of::<AtomicU32>();
        let base = self.map.as_ptr().cast::<AtomicU32>();
        debug_assert!(base.is_aligned(), "mappings are page aligned");
        // SAFETY:
        // - `base` is page aligned, so aligned for AtomicU32, and `words`
        //   words fit in the mapping, which lives as long as `&self`;
        // - every access to these bytes, here and in other processes, is
        //   atomic (AtomicU32 has the layout of u32), so there is no data race.
        unsafe { std::slice::from_raw_parts(base, words) }
    }

    /// The mapping as 64-bit atomic words (trailing bytes ignored).
    pub fn words_u64(&self) -> &[std::sync::atomic::AtomicU64] {
        use std::sync::atomic::AtomicU64;
        let words = self.map.len() / std::mem::size_of::<AtomicU64>();
        let base = self.map.as_ptr().cast::<AtomicU64>();
        debug_assert!(base.is_aligned(), "mappings are page aligned");
        // SAFETY:
        // - `base` is page aligned, so aligned for AtomicU64, and `words`
        //   words fit in the mapping, which lives as long as `&self`;
        // - every access to these bytes, here and in other processes, is
        //   atomic, so there is no data race.
        unsafe { std::slice::from_raw_parts(base, words) }
    }
}
