//! The runtime directory: who may enter it, the single-instance lock, and
//! creating or adopting the table, event and score files.
//!
//! A table that validates is adopted as it is (held locks stay held); one that
//! does not is renamed aside (`table.invalid-<unix seconds>`, kept for
//! inspection, never deleted) and a fresh one created. New files are built
//! under a temporary name and renamed into place, so a reader never opens a
//! half-made file.
//!
//! Trust (docs/security.md):
//! - the directory must belong to the broker's uid and not be writable by
//!   other users; it gets mode `access.mode`'s search bits (0750) and the
//!   access group;
//! - every file is opened relative to the directory's fd with `O_NOFOLLOW`
//!   (a symlink at `forelockd.lock`, `table`, `events` or `scores` is refused,
//!   never followed), must be a regular file of the broker's uid, and gets the
//!   access group and `access.mode`; new files are created with `O_EXCL` after
//!   a stale `*.new` is unlinked (unlink does not follow symlinks);
//! - a SIGBUS in one of the broker's shared mappings (another process
//!   truncated the file) is caught: the mapping is replaced by private zero
//!   memory, the broker keeps running and says so in its log
//!   ([`RuntimeFiles::table_damaged`]).

use anyhow::{Context, bail};
use memmap2::MmapMut;
use shm_layout::events::{EventsHeader, EventsView, events_file_size, init_events};
use shm_layout::scores::{ScoresHeader, ScoresView, init_scores, scores_file_size};
use shm_layout::table::{Geometry, Header, TableView, init_header};
use shm_layout::{EVENTS_FILE, PID_FILE, SCORES_FILE, TABLE_FILE};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::config::Config;

/// The mapped runtime files. The views point into the mappings, which live as
/// long as this struct (the views are declared first, so they drop first;
/// then the SIGBUS registrations, then the mappings).
pub struct RuntimeFiles {
    pub table: TableView,
    pub events: EventsView,
    pub scores: ScoresView,
    /// True when the table was adopted from a previous broker.
    pub adopted: bool,
    pub dir: PathBuf,
    _watch: DamageWatch,
    table_guard: MappingGuard,
    _events_guard: MappingGuard,
    _scores_guard: MappingGuard,
    _table_map: MmapMut,
    _events_map: MmapMut,
    _scores_map: MmapMut,
    _instance_lock: File,
}

impl RuntimeFiles {
    pub fn open(config: &Config) -> anyhow::Result<RuntimeFiles> {
        let dir = config.runtime_dir();
        let access = Access::from_config(config)?;
        let dir_fd = prepare_dir(&dir, &access)?;
        if !in_memory(&dir_fd) {
            tracing::warn!(
                runtime_dir = %dir.display(),
                "the runtime directory is not on tmpfs: the lock table is a shared mapping of a \
                 file there, and on a disk filesystem its pages are written back, during which a \
                 client's lock-word store may wait for the disk (milliseconds under disk load). \
                 Give the broker a directory on tmpfs (--runtime-dir, runtime_dir or \
                 FORELOCK_RUNTIME_DIR; /dev/shm is tmpfs, and so is /run under systemd), or \
                 mount tmpfs on this one"
            );
        }
        let runtime = RuntimeDir {
            fd: dir_fd,
            path: &dir,
            access: &access,
        };
        let instance_lock = lock_instance(&runtime)?;
        let geometry = Geometry::new(config.table.slots, config.table.clients)?;
        install_sigbus_handler()?;

        let (table_map, adopted) = open_table(&runtime, &geometry)?;
        let table_guard = MappingGuard::register(table_map.as_ptr(), table_map.len())?;
        // SAFETY:
        // - the mapping is page-aligned and `table_map.len()` bytes long;
        // - it lives in `self._table_map` as long as the view (drop order);
        // - other processes write it only through atomics (forelock) or racily
        //   (a scribbler), and every field is valid for any bit pattern; one
        //   that truncates it makes the SIGBUS handler put zeros in its place.
        let table = unsafe { TableView::new(table_map.as_ptr(), table_map.len()) }?;
        let rings = table.geometry().client_count + 1;
        let events_map = open_aux(
            &runtime,
            EVENTS_FILE,
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
        let events_guard = MappingGuard::register(events_map.as_ptr(), events_map.len())?;
        // SAFETY: as for the table: page-aligned, owned by self, atomics only.
        let events = unsafe { EventsView::new(events_map.as_ptr(), events_map.len()) }?;
        let scores_map = open_aux(
            &runtime,
            SCORES_FILE,
            scores_file_size(config.table.score_capacity),
            |map| {
                // SAFETY: fresh, exclusively owned, page-aligned, large enough.
                let header = unsafe { &mut *(map.as_mut_ptr() as *mut ScoresHeader) };
                init_scores(header, config.table.score_capacity);
            },
            // SAFETY: page-aligned mapping of `len` bytes, alive for the call.
            |ptr, len| unsafe { ScoresView::new(ptr, len) }.map(|_| true),
        )?;
        let scores_guard = MappingGuard::register(scores_map.as_ptr(), scores_map.len())?;
        // SAFETY: as for the table.
        let scores = unsafe { ScoresView::new(scores_map.as_ptr(), scores_map.len()) }?;
        let watch = DamageWatch::start(
            &dir,
            [
                (table_guard.index, TABLE_FILE),
                (events_guard.index, EVENTS_FILE),
                (scores_guard.index, SCORES_FILE),
            ],
        );
        Ok(RuntimeFiles {
            table,
            events,
            scores,
            adopted,
            dir,
            _watch: watch,
            table_guard,
            _events_guard: events_guard,
            _scores_guard: scores_guard,
            _table_map: table_map,
            _events_map: events_map,
            _scores_map: scores_map,
            _instance_lock: instance_lock,
        })
    }

    /// Whether another process truncated the table file under this broker:
    /// its mapping now holds private zeros, no client can use the table, and
    /// only a restart (which sets the file aside and creates a new one)
    /// brings service back. Logged once by a watcher thread when it happens;
    /// the event loop may also check it each tick (to stop preparing slots,
    /// or to exit so that systemd restarts the broker).
    pub fn table_damaged(&self) -> bool {
        self.table_guard.damaged()
    }
}

/// `[access]`, resolved: the group's id and the modes.
struct Access {
    gid: u32,
    file_mode: u32,
    dir_mode: u32,
    group_name: String,
}

impl Access {
    fn from_config(config: &Config) -> anyhow::Result<Access> {
        let gid = resolve_group(&config.access.group)?;
        let mut dir_mode = config.dir_mode();
        // The event loop binds broker.sock in the broker's own group; when
        // that is not the access group, the set-group-ID bit on the directory
        // gives the socket (and any file made later) the directory's group.
        if gid != effective_gid() {
            dir_mode |= libc::S_ISGID;
        }
        let group_name = if config.access.group.is_empty() {
            format!("gid {gid} (the broker's own group)")
        } else {
            format!("{:?} (gid {gid})", config.access.group)
        };
        Ok(Access {
            gid,
            file_mode: config.file_mode(),
            dir_mode,
            group_name,
        })
    }

    /// `forelockd.lock`: the group may read the pid, nobody else writes it.
    fn pid_file_mode(&self) -> u32 {
        (self.file_mode & 0o444) | 0o200
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn effective_gid() -> u32 {
    // SAFETY: getegid has no preconditions and cannot fail.
    unsafe { libc::getegid() }
}

/// `access.group` to a gid: empty = ours, a number as it is, else a name.
fn resolve_group(name: &str) -> anyhow::Result<u32> {
    if name.is_empty() {
        return Ok(effective_gid());
    }
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c_name = CString::new(name).context("access.group contains a NUL byte")?;
    let mut buffer: Vec<libc::c_char> = vec![0; 4096];
    // Bounded: the buffer doubles up to 1 MiB (a group with a huge member list).
    while buffer.len() <= 1 << 20 {
        // SAFETY: `group` is plain data; all-zero is a valid value.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the name is a
        // NUL-terminated string, `group` and `result` are writable, and the
        // buffer is writable for `buffer.len()` bytes.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE {
            buffer.resize(buffer.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc))
                .with_context(|| format!("cannot look up access.group {name:?}"));
        }
        if result.is_null() {
            bail!(
                "access.group = {name:?}: no such group; create it (`groupadd --system {name}`) \
                 and add the users who may take locks, or leave access.group empty for the \
                 broker's own group"
            );
        }
        return Ok(group.gr_gid);
    }
    bail!("access.group = {name:?}: its entry is larger than 1 MiB")
}

/// The runtime directory, opened: every file is reached relative to its fd.
struct RuntimeDir<'a> {
    fd: File,
    path: &'a Path,
    access: &'a Access,
}

impl RuntimeDir<'_> {
    fn path_of(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

fn c_name(name: &str) -> CString {
    CString::new(name).expect("runtime file names have no NUL byte")
}

/// `openat(dir, name, flags, mode)`.
fn open_at(dir: RawFd, name: &CString, flags: libc::c_int, mode: u32) -> std::io::Result<File> {
    // SAFETY: `name` is NUL-terminated and outlives the call; openat takes
    // the mode as a variadic unsigned int.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat returned a new fd that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Whether the open directory `dir` is on a filesystem kept in memory only
/// (tmpfs or ramfs), whose pages are never written back to a disk.
fn in_memory(dir: &File) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `dir` is an open fd for the call; fstatfs writes one `statfs`
    // through the pointer, which points to room for exactly one.
    let rc = unsafe { libc::fstatfs(dir.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return true; // cannot tell: no warning
    }
    // SAFETY: fstatfs returned 0, so it wrote the whole `statfs`.
    let st = unsafe { st.assume_init() };
    // ramfs's magic (linux/magic.h), which the libc crate does not name.
    const RAMFS_MAGIC: libc::__fsword_t = 0x8584_58f6;
    matches!(st.f_type, libc::TMPFS_MAGIC | RAMFS_MAGIC)
}

/// Create the directory (0700, then the access mode) if it is missing, open
/// it, and check and set its owner, group and mode.
fn prepare_dir(dir: &Path, access: &Access) -> anyhow::Result<File> {
    if let Err(e) = std::fs::symlink_metadata(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e)
                .with_context(|| format!("cannot inspect runtime directory {}", dir.display()));
        }
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create runtime directory {}", dir.display()));
            }
        }
    }
    let c_path = CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("runtime directory {} contains a NUL byte", dir.display()))?;
    // The directory itself may be reached through a symlink (/var/run); what
    // matters is who owns the directory it names, checked on the open fd.
    let fd = open_at(
        libc::AT_FDCWD,
        &c_path,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .with_context(|| format!("cannot open runtime directory {}", dir.display()))?;
    let meta = fd.metadata()?;
    let uid = effective_uid();
    if meta.uid() != uid {
        bail!(
            "runtime directory {} is owned by uid {}, not by this broker's uid {uid}: another \
             user made it (a broker of theirs, or someone squatting the path to read or replace \
             the lock table). Give this broker a directory of its own (--runtime-dir, \
             runtime_dir, FORELOCK_RUNTIME_DIR), or remove that one if it is stale",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o002 != 0 {
        bail!(
            "runtime directory {} is writable by other users (mode {:04o}): any of them could \
             replace the table or the socket. Remove it (forelockd creates its own) or `chmod \
             o-w` it, or give this broker another directory",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    if meta.gid() != access.gid {
        std::os::unix::fs::fchown(&fd, None, Some(access.gid)).with_context(|| {
            format!(
                "cannot give runtime directory {} to access group {}: run forelockd as root or \
                 as a member of that group (under systemd: Group= in its unit)",
                dir.display(),
                access.group_name
            )
        })?;
    }
    if meta.mode() & 0o7777 != access.dir_mode {
        fd.set_permissions(PermissionsExt::from_mode(access.dir_mode))
            .with_context(|| {
                format!(
                    "cannot set the mode of runtime directory {} to {:04o} (under systemd with \
                     RestrictSUIDSGID=yes, make the unit's Group= the access group, so that no \
                     set-group-ID bit is needed)",
                    dir.display(),
                    access.dir_mode
                )
            })?;
        tracing::info!(
            dir = %dir.display(),
            from = format!("{:04o}", meta.mode() & 0o7777),
            to = format!("{:04o}", access.dir_mode),
            "runtime directory mode set for [access]"
        );
    }
    Ok(fd)
}

fn symlink_refused(path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is a symbolic link: forelockd never follows one in its runtime directory (whoever \
         made it could point it at any file). Remove it (forelockd recreates its files) and find \
         out who made it",
        path.display()
    )
}

/// Open `name` read-write without following a symlink (and with O_CREAT if
/// `create_mode` is given); then check that it is our regular file, and give
/// it the access group and `mode`. `None`: it does not exist.
fn open_existing(
    dir: &RuntimeDir<'_>,
    name: &str,
    create_mode: Option<u32>,
    mode: u32,
) -> anyhow::Result<Option<File>> {
    let path = dir.path_of(name);
    let mut flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    if create_mode.is_some() {
        flags |= libc::O_CREAT;
    }
    let file = match open_at(
        dir.fd.as_raw_fd(),
        &c_name(name),
        flags,
        create_mode.unwrap_or(0),
    ) {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(symlink_refused(&path)),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        bail!(
            "{} is not a regular file ({:?}): forelockd only uses its own regular files; \
             remove it",
            path.display(),
            meta.file_type()
        );
    }
    let uid = effective_uid();
    if meta.uid() != uid {
        bail!(
            "{} is owned by uid {}, not by this broker's uid {uid}: forelockd only adopts its \
             own files. Remove it while forelockd is stopped (held locks are lost), and find out \
             who made it",
            path.display(),
            meta.uid()
        );
    }
    secure(&file, &path, dir.access, mode, &meta)?;
    Ok(Some(file))
}

/// Give `file` the access group and `mode` (an older broker made them 0666).
fn secure(
    file: &File,
    path: &Path,
    access: &Access,
    mode: u32,
    meta: &std::fs::Metadata,
) -> anyhow::Result<()> {
    if meta.gid() != access.gid {
        std::os::unix::fs::fchown(file, None, Some(access.gid)).with_context(|| {
            format!(
                "cannot give {} to access group {}",
                path.display(),
                access.group_name
            )
        })?;
    }
    if meta.mode() & 0o7777 != mode {
        file.set_permissions(PermissionsExt::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {} to {mode:04o}", path.display()))?;
    }
    Ok(())
}

/// Take `forelockd.lock` with a non-blocking exclusive flock, and write our pid
/// in it. Held until the process exits.
fn lock_instance(dir: &RuntimeDir<'_>) -> anyhow::Result<File> {
    let path = dir.path_of(PID_FILE);
    let mode = dir.access.pid_file_mode();
    let mut file = open_existing(dir, PID_FILE, Some(0o600), mode)?
        .with_context(|| format!("{} vanished while opening it", path.display()))?;
    // SAFETY: flock on a valid, open fd has no memory-safety preconditions.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut other = String::new();
        let _ = file.read_to_string(&mut other);
        bail!(
            "another forelockd (pid {}) already serves {}: stop it first, or give this one \
             another --runtime-dir",
            other.trim(),
            dir.path.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

fn map_file(file: &File) -> anyhow::Result<MmapMut> {
    // SAFETY: the file is a regular file we opened read-write; other processes
    // may change it concurrently, which is why every access through the mapping
    // goes through atomics in shm-layout's views (never plain references to
    // non-atomic data that others write). One that shrinks it makes our
    // accesses fault; the SIGBUS handler registered for the mapping
    // (MappingGuard) replaces it with zeros.
    Ok(unsafe { MmapMut::map_mut(file) }?)
}

fn open_table(dir: &RuntimeDir<'_>, geometry: &Geometry) -> anyhow::Result<(MmapMut, bool)> {
    let path = dir.path_of(TABLE_FILE);
    if let Some(file) = open_existing(dir, TABLE_FILE, None, dir.access.file_mode)? {
        let len = file.metadata()?.len();
        // An empty file cannot be mapped at all: someone truncated it.
        let problem = if len == 0 {
            "the file is empty (truncated by another process?)".to_string()
        } else {
            let map = map_file(&file)?;
            // SAFETY: page-aligned mapping of `map.len()` bytes alive for the call.
            match unsafe { TableView::new(map.as_ptr(), map.len()) } {
                Ok(view) => {
                    if view.geometry() != *geometry {
                        tracing::warn!(
                            slots = view.geometry().slot_count,
                            clients = view.geometry().client_count,
                            "adopting the existing table with its own geometry, not the \
                             configured one (held locks matter more); remove {} while forelockd \
                             is stopped to resize",
                            path.display()
                        );
                    }
                    return Ok((map, true));
                }
                Err(e) => e.to_string(),
            }
        };
        let aside = set_aside(dir, TABLE_FILE)?;
        tracing::error!(error = %problem, kept_as = %aside.display(), "existing table is not valid; creating a new one");
    }
    let map = create_file(dir, TABLE_FILE, geometry.file_size, |map| {
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
    dir: &RuntimeDir<'_>,
    name: &str,
    size: usize,
    init: impl FnOnce(&mut MmapMut),
    valid: impl FnOnce(*const u8, usize) -> Result<bool, shm_layout::LayoutError>,
) -> anyhow::Result<MmapMut> {
    if let Some(file) = open_existing(dir, name, None, dir.access.file_mode)? {
        if file.metadata()?.len() == size as u64 {
            let map = map_file(&file)?;
            if matches!(valid(map.as_ptr(), map.len()), Ok(true)) {
                return Ok(map);
            }
        }
        tracing::info!(path = %dir.path_of(name).display(), "recreating advisory file (invalid or resized)");
    }
    create_file(dir, name, size, init)
}

/// Build `name` as `name.new` (created with O_EXCL after unlinking whatever
/// was there, so a planted symlink is removed, never followed), then rename
/// it into place.
fn create_file(
    dir: &RuntimeDir<'_>,
    name: &str,
    size: usize,
    init: impl FnOnce(&mut MmapMut),
) -> anyhow::Result<MmapMut> {
    let tmp_name = format!("{name}.new");
    let tmp = dir.path_of(&tmp_name);
    let c_tmp = c_name(&tmp_name);
    // SAFETY: `c_tmp` is NUL-terminated and outlives the call; unlinkat
    // removes the name itself, whatever it is, and follows no symlink.
    if unsafe { libc::unlinkat(dir.fd.as_raw_fd(), c_tmp.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e).with_context(|| format!("cannot remove the stale {}", tmp.display()));
        }
    }
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let file = open_at(dir.fd.as_raw_fd(), &c_tmp, flags, 0o600)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    secure(
        &file,
        &tmp,
        dir.access,
        dir.access.file_mode,
        &file.metadata()?,
    )?;
    file.set_len(size as u64).with_context(|| {
        format!(
            "cannot size {} to {size} bytes (is the runtime dir's filesystem full?)",
            tmp.display()
        )
    })?;
    let mut map = map_file(&file)?;
    init(&mut map);
    rename_at(dir, &tmp_name, name)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    Ok(map)
}

/// `renameat` within the runtime directory (replaces `to`; follows nothing).
fn rename_at(dir: &RuntimeDir<'_>, from: &str, to: &str) -> std::io::Result<()> {
    let (c_from, c_to) = (c_name(from), c_name(to));
    let fd = dir.fd.as_raw_fd();
    // SAFETY: both names are NUL-terminated and outlive the call.
    if unsafe { libc::renameat(fd, c_from.as_ptr(), fd, c_to.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn set_aside(dir: &RuntimeDir<'_>, name: &str) -> anyhow::Result<PathBuf> {
    let aside = format!("{name}.invalid-{}", unix_seconds());
    rename_at(dir, name, &aside)
        .with_context(|| format!("cannot set {} aside", dir.path_of(name).display()))?;
    Ok(dir.path_of(&aside))
}

// ---- SIGBUS: a shared file truncated under us ------------------------------
//
// Whoever may write a runtime file may also truncate it (tmpfs files cannot
// be sealed); the next access of ours past the new end raises SIGBUS, which
// would kill the broker. As Wayland compositors do for clients' shm pools,
// the handler checks whether the faulting address lies in one of our
// registered shared mappings; if so it maps private anonymous zero memory
// over that whole mapping (MAP_FIXED: same address, same length, so every
// pointer into it stays valid) and marks the mapping damaged; the faulting
// instruction then runs again on the zeros. Any other SIGBUS goes to the
// handler that was there before ours, or kills the process as it would have.

/// Registration slots for shared mappings (the broker has three; tests that
/// open several runtime directories at once need a few more).
const MAPPING_SLOTS: usize = 32;
/// `len` of a slot being filled in: the handler skips it.
const FILLING: usize = usize::MAX;

struct Region {
    /// 0 = free, FILLING = being registered, else the mapping's length.
    len: AtomicUsize,
    start: AtomicUsize,
    damaged: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only to initialise REGIONS
const FREE_REGION: Region = Region {
    len: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    damaged: AtomicBool::new(false),
};
static REGIONS: [Region; MAPPING_SLOTS] = [FREE_REGION; MAPPING_SLOTS];

/// The SIGBUS action before ours, to pass on faults that are not ours.
static PREVIOUS_ACTION: std::sync::OnceLock<libc::sigaction> = std::sync::OnceLock::new();

/// A shared mapping registered with the SIGBUS handler; unregistered on drop
/// (drop it before the mapping is unmapped).
pub struct MappingGuard {
    index: usize,
}

impl MappingGuard {
    /// Register `[start, start + len)`, a shared mapping of a file others may
    /// truncate. Installs the handler if it is not yet.
    pub fn register(start: *const u8, len: usize) -> anyhow::Result<MappingGuard> {
        install_sigbus_handler()?;
        anyhow::ensure!(
            len != 0 && len != FILLING,
            "cannot register a mapping of {len} bytes"
        );
        for (index, region) in REGIONS.iter().enumerate() {
            if region
                .len
                .compare_exchange(0, FILLING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                region.start.store(start as usize, Ordering::Relaxed);
                region.damaged.store(false, Ordering::Relaxed);
                // SYNC POINT: pairs with the Acquire load of `len` in
                // `repair_mapping`: a handler that sees the length sees the start.
                region.len.store(len, Ordering::Release);
                return Ok(MappingGuard { index });
            }
        }
        bail!("more than {MAPPING_SLOTS} shared mappings registered for SIGBUS recovery")
    }

    /// Whether the file under this mapping was truncated (the mapping now
    /// holds private zeros).
    pub fn damaged(&self) -> bool {
        // SYNC POINT: pairs with the Release store in `repair_mapping`.
        REGIONS[self.index].damaged.load(Ordering::Acquire)
    }
}

impl Drop for MappingGuard {
    fn drop(&mut self) {
        let region = &REGIONS[self.index];
        region.len.store(FILLING, Ordering::Relaxed);
        region.damaged.store(false, Ordering::Relaxed);
        region.start.store(0, Ordering::Relaxed);
        // SYNC POINT: pairs with the Acquire CAS in `register`.
        region.len.store(0, Ordering::Release);
    }
}

/// Whether any registered mapping of this process was damaged: for callers
/// without a [`RuntimeFiles`] at hand.
pub fn any_mapping_damaged() -> bool {
    REGIONS
        .iter()
        .any(|r| r.len.load(Ordering::Acquire) != 0 && r.damaged.load(Ordering::Acquire))
}

/// Install the SIGBUS handler once per process.
fn install_sigbus_handler() -> anyhow::Result<()> {
    static INSTALLED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    // SAFETY: sigaction is plain data; all-zero is a valid value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: sigemptyset writes the set it is given, which is ours.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: as above.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both structs are valid for the call; the handler is an
    // `extern "C" fn(c_int, *mut siginfo_t, *mut c_void)` as SA_SIGINFO wants.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, &mut previous) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot install the SIGBUS handler");
    }
    let _ = PREVIOUS_ACTION.set(previous);
    *installed = true;
    Ok(())
}

/// If `address` lies in a registered mapping, put zeros over the whole
/// mapping and mark it damaged. Async-signal-safe: atomics and mmap only.
fn repair_mapping(address: usize) -> bool {
    for region in &REGIONS {
        // SYNC POINT: pairs with the Release store in `MappingGuard::register`.
        let len = region.len.load(Ordering::Acquire);
        if len == 0 || len == FILLING {
            continue;
        }
        let start = region.start.load(Ordering::Relaxed);
        if address < start || address - start >= len {
            continue;
        }
        // SAFETY:
        // - `[start, start + len)` is a whole mapping of this process (it was
        //   registered by its owner, who unregisters it before unmapping);
        // - MAP_FIXED replaces it in place with fresh private zero pages of
        //   the same size and protection, so every pointer into it stays
        //   valid, only the contents change (to zeros, which every field of
        //   the shm-layout views accepts);
        // - mmap is a plain system call, safe in a signal handler.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return false;
        }
        // SYNC POINT: pairs with the Acquire load in `MappingGuard::damaged`.
        region.damaged.store(true, Ordering::Release);
        return true;
    }
    false
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid, aligned siginfo_t
    // that lives until the handler returns.
    let info_ref = unsafe { &*info };
    // SAFETY: for SIGBUS the union holds the faulting address (si_addr).
    let address = unsafe { info_ref.si_addr() } as usize;
    if repair_mapping(address) {
        return;
    }
    let previous = PREVIOUS_ACTION.get();
    match previous.map(|p| (p.sa_sigaction, p.sa_flags)) {
        Some((handler, flags)) if handler != libc::SIG_DFL && handler != libc::SIG_IGN => {
            if flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature; we pass
                // on exactly what the kernel gave us.
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                handler(signal, info, context);
            } else {
                // SAFETY: a plain handler has this signature.
                let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                handler(signal);
            }
        }
        _ => {
            // The default action: die of SIGBUS (with a core), as without us.
            // SAFETY: signal() with SIG_DFL and raise() are async-signal-safe
            // and take plain integers; SIGBUS stays blocked until we return,
            // then the raised one is delivered with the default action.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
            // SAFETY: as above.
            unsafe { libc::raise(libc::SIGBUS) };
        }
    }
}

/// A thread that logs, once per file, that another process truncated a
/// runtime file, and sets the damaged table aside so that no client maps a
/// file this broker no longer serves. Stops when dropped.
struct DamageWatch {
    stop: Arc<AtomicBool>,
}

impl DamageWatch {
    fn start(dir: &Path, regions: [(usize, &'static str); 3]) -> DamageWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let dir = dir.to_owned();
        // The thread starts with every asynchronous signal blocked: it is
        // spawned before the event loop blocks SIGTERM and SIGINT for its
        // signalfd, and a thread with them unblocked would take them (and
        // die of them) instead.
        let restore = block_async_signals();
        let spawned = std::thread::Builder::new()
            .name("forelockd-sigbus-watch".into())
            .spawn(move || {
                let mut reported = [false; 3];
                // Bounded per iteration; ends with the broker.
                while !stopped.load(Ordering::Relaxed) {
                    for (i, (index, name)) in regions.iter().enumerate() {
                        // SYNC POINT: pairs with the Release store in `repair_mapping`.
                        if !reported[i] && REGIONS[*index].damaged.load(Ordering::Acquire) {
                            reported[i] = true;
                            report_damage(&dir, name);
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            });
        restore_signals(restore);
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the thread that reports truncated runtime files");
        }
        DamageWatch { stop }
    }
}

/// Block every signal but the synchronous faults in this thread; returns the
/// mask to restore.
fn block_async_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; all-zero is a valid value.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigfillset writes the set it is given, which is ours.
    unsafe { libc::sigfillset(&mut all) };
    for fault in [libc::SIGBUS, libc::SIGSEGV, libc::SIGFPE, libc::SIGILL] {
        // SAFETY: as above; `fault` is a valid signal number.
        unsafe { libc::sigdelset(&mut all, fault) };
    }
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are valid for the call; this changes only this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) };
    old
}

fn restore_signals(old: libc::sigset_t) {
    // SAFETY: `old` is a mask pthread_sigmask returned; this thread's only.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
}

impl Drop for DamageWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn report_damage(dir: &Path, name: &str) {
    let path = dir.join(name);
    // Move the damaged file out of the way: a client must not map a file
    // this broker no longer shares with it (and may be refilled by anyone).
    let aside = dir.join(format!("{name}.truncated-{}", unix_seconds()));
    let moved = std::fs::rename(&path, &aside);
    let kept_as = match &moved {
        Ok(()) => aside.display().to_string(),
        Err(e) => format!("not moved aside: {e}"),
    };
    if name == TABLE_FILE {
        tracing::error!(
            path = %path.display(),
            %kept_as,
            "the lock table file was truncated by another process (a user who may write it: \
             the [access] group, or root). forelockd caught the fault, replaced its own mapping \
             with private zeroed memory and keeps running, but the table's contents are gone: \
             clients that still map it get SIGBUS when they next touch it (forelockd then \
             releases what they held) and new clients find no table. Restart forelockd \
             (`systemctl restart forelockd`): it creates a new table, and locks held now are \
             forgotten. Then find out who truncated it (docs/security.md)"
        );
    } else {
        tracing::error!(
            path = %path.display(),
            %kept_as,
            "a runtime file was truncated by another process (a user who may write it: the \
             [access] group, or root). forelockd caught the fault and keeps running on private \
             zeroed memory for it; clients and the predictor that still map it get SIGBUS when \
             they next touch it. Restart forelockd to recreate it, and find out who truncated it"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    #[test]
    fn a_runtime_dir_on_tmpfs_is_in_memory_and_one_elsewhere_is_not() {
        assert!(!super::in_memory(&File::open("/proc").unwrap()), "procfs");
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        if mounts
            .lines()
            .any(|l| l.starts_with("tmpfs /dev/shm tmpfs "))
        {
            assert!(super::in_memory(&File::open("/dev/shm").unwrap()));
        }
    }
}
