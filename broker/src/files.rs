//! The runtime directory: the single-instance lock, and creating or adopting
//! the table, event and score files.
//!
//! A table that validates is adopted as it is (held locks stay held); one that
//! does not is renamed aside (`table.invalid-<unix seconds>`, kept for
//! inspection, never deleted) and a fresh one created. New files are built
//! under a temporary name and renamed into place, so a reader never opens a
//! half-made file.

use anyhow::{Context, bail};
use memmap2::MmapMut;
use shm_layout::events::{EventsHeader, EventsView, events_file_size, init_events};
use shm_layout::scores::{ScoresHeader, ScoresView, init_scores, scores_file_size};
use shm_layout::table::{Geometry, Header, TableView, init_header};
use shm_layout::{EVENTS_FILE, PID_FILE, SCORES_FILE, TABLE_FILE};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// The mapped runtime files. The views point into the mappings, which live as
/// long as this struct (the views are declared first, so they drop first).
pub struct RuntimeFiles {
    pub table: TableView,
    pub events: EventsView,
    pub scores: ScoresView,
    /// True when the table was adopted from a previous broker.
    pub adopted: bool,
    pub dir: PathBuf,
    _table_map: MmapMut,
    _events_map: MmapMut,
    _scores_map: MmapMut,
    _instance_lock: File,
}

impl RuntimeFiles {
    pub fn open(config: &Config) -> anyhow::Result<RuntimeFiles> {
        let dir = config.runtime_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create runtime directory {}", dir.display()))?;
        let instance_lock = lock_instance(&dir)?;
        let geometry = Geometry::new(config.table.slots, config.table.clients)?;

        let (table_map, adopted) = open_table(&dir, &geometry)?;
        // SAFETY:
        // - the mapping is page-aligned and `table_map.len()` bytes long;
        // - it lives in `self._table_map` as long as the view (drop order);
        // - other processes write it only through atomics (forelock) or racily
        //   (a scribbler), and every field is valid for any bit pattern.
        let table = unsafe { TableView::new(table_map.as_ptr(), table_map.len()) }?;
        let rings = table.geometry().client_count + 1;
        let events_map = open_aux(
            &dir.join(EVENTS_FILE),
            events_file_size(rings, config.table.event_ring_capacity),
            |map| {
                // SAFETY: `map` is a fresh, exclusively owned, page-aligned
                // mapping of at least the header's size.
                let header = unsafe { &mut *(map.as_mut_ptr() as *mut EventsHeader) };
                init_events(header, rings, config.table.event_ring_capacity);
            },
            // SAFETY: page-aligned mapping of `len` bytes, alive for the call.
            |ptr, len| unsafe { EventsView::new(ptr, len) }.map(|v| v.ring_count() == rings),
        )?;
        // SAFETY: as for the table: page-aligned, owned by self, atomics only.
        let events = unsafe { EventsView::new(events_map.as_ptr(), events_map.len()) }?;
        let scores_map = open_aux(
            &dir.join(SCORES_FILE),
            scores_file_size(config.table.score_capacity),
            |map| {
                // SAFETY: fresh, exclusively owned, page-aligned, large enough.
                let header = unsafe { &mut *(map.as_mut_ptr() as *mut ScoresHeader) };
                init_scores(header, config.table.score_capacity);
            },
            // SAFETY: page-aligned mapping of `len` bytes, alive for the call.
            |ptr, len| unsafe { ScoresView::new(ptr, len) }.map(|_| true),
        )?;
        // SAFETY: as for the table.
        let scores = unsafe { ScoresView::new(scores_map.as_ptr(), scores_map.len()) }?;
        Ok(RuntimeFiles {
            table,
            events,
            scores,
            adopted,
            dir,
            _table_map: table_map,
            _events_map: events_map,
            _scores_map: scores_map,
            _instance_lock: instance_lock,
        })
    }
}

/// Take `forelockd.lock` with a non-blocking exclusive flock, and write our pid
/// in it. Held until the process exits.
fn lock_instance(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(PID_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a valid, open fd has no memory-safety preconditions.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let other = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another forelockd (pid {}) already serves {}: stop it first, or give this one \
             another --runtime-dir",
            other.trim(),
            dir.display()
        );
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

fn map_file(file: &File) -> anyhow::Result<MmapMut> {
    // SAFETY: the file is a regular file we opened read-write; other processes
    // may change it concurrently, which is why every access through the mapping
    // goes through atomics in shm-layout's views (never plain references to
    // non-atomic data that others write).
    Ok(unsafe { MmapMut::map_mut(file) }?)
}

fn open_table(dir: &Path, geometry: &Geometry) -> anyhow::Result<(MmapMut, bool)> {
    let path = dir.join(TABLE_FILE);
    if let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) {
        let map = map_file(&file)?;
        // SAFETY: page-aligned mapping of `map.len()` bytes alive for the call.
        match unsafe { TableView::new(map.as_ptr(), map.len()) } {
            Ok(view) => {
                if view.geometry() != *geometry {
                    tracing::warn!(
                        slots = view.geometry().slot_count,
                        clients = view.geometry().client_count,
                        "adopting the existing table with its own geometry, not the configured one \
                         (held locks matter more); remove {} while forelockd is stopped to resize",
                        path.display()
                    );
                }
                return Ok((map, true));
            }
            Err(e) => {
                let aside = set_aside(&path)?;
                tracing::error!(error = %e, kept_as = %aside.display(), "existing table is not valid; creating a new one");
            }
        }
    }
    let map = create_file(&path, geometry.file_size, |map| {
        // SAFETY: fresh, exclusively owned, page-aligned mapping of
        // file_size >= HEADER_SIZE bytes, all zero.
        let header = unsafe { &mut *(map.as_mut_ptr() as *mut Header) };
        init_header(header, geometry);
    })?;
    Ok((map, false))
}

/// Open an advisory file (events, scores) if it is valid and the right size,
/// else create it anew.
fn open_aux(
    path: &Path,
    size: usize,
    init: impl FnOnce(&mut MmapMut),
    valid: impl FnOnce(*const u8, usize) -> Result<bool, shm_layout::LayoutError>,
) -> anyhow::Result<MmapMut> {
    if let Ok(file) = OpenOptions::new().read(true).write(true).open(path) {
        let map = map_file(&file)?;
        if map.len() == size && matches!(valid(map.as_ptr(), map.len()), Ok(true)) {
            return Ok(map);
        }
        tracing::info!(path = %path.display(), "recreating advisory file (invalid or resized)");
    }
    create_file(path, size, init)
}

fn create_file(
    path: &Path,
    size: usize,
    init: impl FnOnce(&mut MmapMut),
) -> anyhow::Result<MmapMut> {
    let tmp = path.with_extension("new");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o666)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    // The umask may have narrowed the mode; clients of other users need rw.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    file.set_len(size as u64).with_context(|| {
        format!(
            "cannot size {} to {size} bytes (is the runtime dir's filesystem full?)",
            tmp.display()
        )
    })?;
    let mut map = map_file(&file)?;
    init(&mut map);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    Ok(map)
}

fn set_aside(path: &Path) -> anyhow::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = path.with_extension(format!("invalid-{secs}"));
    std::fs::rename(path, &aside)?;
    Ok(aside)
}
