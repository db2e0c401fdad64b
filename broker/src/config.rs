//! The broker's configuration: a TOML file, every option optional; what is not
//! given comes from [`DEFAULT_CONFIG`], which is embedded in the binary and
//! printed by `forelockd --print-config`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The embedded defaults, documented. `forelockd` with no `--config` serves
/// with exactly these.
pub const DEFAULT_CONFIG: &str = include_str!("../forelockd.toml");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the runtime files; empty = [`shm_layout::default_runtime_dir`].
    pub runtime_dir: String,
    pub access: AccessConfig,
    pub table: TableConfig,
    pub allocator: AllocatorConfig,
    pub broker: BrokerConfig,
    pub metrics: MetricsConfig,
    /// Global keys across hosts (docs/cluster.md). Absent: a single-host
    /// broker, the embedded default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<forelock_cluster::ClusterConfig>,
}

/// Who may use the broker: the members of one group (docs/security.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Group name (or number) whose members may connect and map the files;
    /// empty = the broker's own primary group.
    pub group: String,
    /// Mode of `table`, `events`, `scores` and `broker.sock` (octal as a
    /// string). The runtime directory gets the matching search bits (0750
    /// for the default 0660).
    pub mode: String,
    /// Client records one uid may hold at once; 0 = half of `table.clients`.
    pub max_clients_per_uid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub slots: u32,
    pub clients: u32,
    pub event_ring_capacity: u32,
    pub score_capacity: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Never prepare: every lock goes through the broker.
    None,
    /// Keep a key prepared for `keep_alive_ms` after its last use.
    KeepAlive,
    /// Prepare what the forecaster scores above the (adaptive) threshold.
    Forecast,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AllocatorConfig {
    pub policy: Policy,
    pub keep_alive_ms: u64,
    pub tick_ms: u64,
    /// Keyed slots the allocator looks at per tick: a larger table is swept
    /// over several ticks, so a tick's pause is bounded (issue 12).
    pub sweep_slots: u32,
    pub threshold: f32,
    pub target_waste: f32,
    /// "forecast" only: prepare the contention state (slot kept, waiter queue
    /// reserved) of keys whose P(contended within the horizon) is at least
    /// this; 0 = off.
    pub contention_threshold: f32,
    /// Waiters the queue of a key predicted contended has room for.
    pub contention_waiters: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FutexWake {
    /// Plain futex(FUTEX_WAKE) syscall.
    Syscall,
    /// IORING_OP_FUTEX_WAKE submitted on the event loop's ring.
    IoUring,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub futex_wake: FutexWake,
    pub uring_entries: u32,
    /// Microseconds the event loop polls for work before it sleeps.
    pub spin_us: u64,
    /// The same while a request waits in a queue behind a local holder (a
    /// release is coming; not while it waits for a node grant from etcd).
    pub spin_waiters_us: u64,
    /// Replaced by `access.mode` and `access.group`: still parsed, so that
    /// an old configuration fails with an error naming the new options
    /// instead of "unknown field".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
    /// Most connections open at once from one uid (SO_PEERCRED), root
    /// included; connections past it are closed at once.
    pub max_connections_per_uid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus text endpoint, e.g. "127.0.0.1:9464"; empty = off.
    pub prometheus_listen: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn default_config() -> Config {
        toml::from_str(DEFAULT_CONFIG).expect("the embedded default configuration parses")
    }

    /// Load `path` over the defaults: keys missing from the file keep their
    /// default values.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut merged: toml::Table = toml::from_str(DEFAULT_CONFIG).expect("defaults parse");
        let overlay: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        merge(&mut merged, overlay);
        let config: Config =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.into(),
                    message: e.to_string(),
                })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.into(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.cluster {
            c.validate().map_err(|e| e.to_string())?;
        }
        shm_layout::table::Geometry::new(self.table.slots, self.table.clients)
            .map_err(|e| e.to_string())?;
        let cap = self.table.event_ring_capacity;
        if !cap.is_power_of_two() || !(2..=1 << 20).contains(&cap) {
            return Err(format!(
                "table.event_ring_capacity = {cap}: must be a power of two from 2 to 1048576"
            ));
        }
        if self.table.score_capacity == 0 {
            return Err("table.score_capacity must be at least 1".into());
        }
        if self.allocator.tick_ms == 0 {
            return Err("allocator.tick_ms must be at least 1".into());
        }
        if self.allocator.sweep_slots == 0 {
            return Err(
                "allocator.sweep_slots must be at least 1 (keyed slots the allocator looks at \
                 per tick; the default is 4096)"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.allocator.threshold) {
            return Err("allocator.threshold must be within 0..=1".into());
        }
        if !(0.0..=1.0).contains(&self.allocator.contention_threshold) {
            return Err(format!(
                "allocator.contention_threshold = {}: must be within 0..=1 (0 turns contention \
                 preparation off)",
                self.allocator.contention_threshold
            ));
        }
        if !(1..=4096).contains(&self.allocator.contention_waiters) {
            return Err(format!(
                "allocator.contention_waiters = {}: must be from 1 to 4096",
                self.allocator.contention_waiters
            ));
        }
        // A reservation lasts as long as its slot: bound what every slot
        // reserving at once would hold (about 24 bytes a waiter).
        let reserved = u64::from(self.allocator.contention_waiters) * u64::from(self.table.slots);
        if reserved > MAX_RESERVED_WAITERS {
            return Err(format!(
                "allocator.contention_waiters = {} with table.slots = {}: {reserved} waiters \
                 could be reserved at once, more than {MAX_RESERVED_WAITERS}; lower \
                 contention_waiters (a deeper queue still grows on demand)",
                self.allocator.contention_waiters, self.table.slots
            ));
        }
        if self.broker.max_connections_per_uid == 0 {
            return Err(
                "broker.max_connections_per_uid must be at least 1 (every client needs a \
                 connection)"
                    .into(),
            );
        }
        if let Some(old) = &self.broker.socket_mode {
            return Err(format!(
                "broker.socket_mode = {old:?} is no longer supported: it was replaced by \
                 [access] mode (the mode of broker.sock and of the table, events and scores \
                 files; default \"0660\") and [access] group (who may use the broker; default \
                 the broker's own group). Remove broker.socket_mode and set those instead; \
                 other users can no longer be given access (docs/security.md)"
            ));
        }
        parse_access_mode(&self.access.mode)?;
        Ok(())
    }

    pub fn runtime_dir(&self) -> PathBuf {
        if self.runtime_dir.is_empty() {
            shm_layout::default_runtime_dir()
        } else {
            PathBuf::from(&self.runtime_dir)
        }
    }

    /// Mode of `broker.sock`: `access.mode`.
    pub fn socket_mode(&self) -> u32 {
        self.file_mode()
    }

    /// Mode of `table`, `events` and `scores`: `access.mode` (validated).
    pub fn file_mode(&self) -> u32 {
        parse_access_mode(&self.access.mode).unwrap_or(0o660)
    }

    /// Mode of the runtime directory: the owner's rwx, and r-x for the group
    /// (and others) wherever `access.mode` gives them anything. Never write
    /// for them: a process that could write the directory could replace the
    /// table or bind its own `broker.sock` (docs/security.md).
    pub fn dir_mode(&self) -> u32 {
        let mode = self.file_mode();
        let mut dir = 0o700;
        if mode & 0o060 != 0 {
            dir |= 0o050;
        }
        if mode & 0o006 != 0 {
            dir |= 0o005;
        }
        dir
    }
}

/// `access.mode`: octal; the owner reads and writes; nobody executes; other
/// users never write (they could truncate or scribble the table).
fn parse_access_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| format!("access.mode = {text:?}: give an octal mode like \"0660\""))?;
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "access.mode = {text:?}: the broker's own user must read and write its files (0600)"
        ));
    }
    if mode & !0o666 != 0 {
        return Err(format!(
            "access.mode = {text:?}: only read and write bits (the files are not programs)"
        ));
    }
    if mode & 0o002 != 0 {
        return Err(format!(
            "access.mode = {text:?}: other users may not write the table (anyone could \
             truncate it or take any lock); give the users who need forelock a group and set \
             access.group to it, with access.mode = \"0660\""
        ));
    }
    Ok(mode)
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Bound on `allocator.contention_waiters * table.slots` (about 100 MB of
/// reserved queue room if every slot were prepared for contention).
const MAX_RESERVED_WAITERS: u64 = 1 << 22;

#[cfg(test)]
mod tests {
    use super::*;

    /// The commented `[cluster]` example in the embedded defaults is a
    /// configuration that works once uncommented.
    #[test]
    fn the_commented_cluster_example_parses_and_validates() {
        let start = DEFAULT_CONFIG
            .find("# [cluster]")
            .expect("the defaults show a [cluster] example");
        let uncommented: String = DEFAULT_CONFIG[start..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let text = format!("{}\n{uncommented}", &DEFAULT_CONFIG[..start]);
        let c = Config::from_toml(&text, Path::new("example.toml")).expect("parses");
        let cluster = c.cluster.expect("the example has [cluster]");
        assert_eq!(cluster.node, "h1");
        assert!(cluster.is_global(b"global/x"));
    }

    #[test]
    fn the_embedded_defaults_parse_and_validate() {
        let c = Config::default_config();
        c.validate().unwrap();
        assert_eq!(c.allocator.policy, Policy::KeepAlive);
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let c = Config::from_toml("[table]\nslots = 64\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.table.slots, 64);
        assert_eq!(c.table.clients, Config::default_config().table.clients);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_problem() {
        let e = Config::from_toml("[table]\nslotz = 64\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("slotz"), "{e}");
        let e = Config::from_toml("[table]\nevent_ring_capacity = 3\n", Path::new("x.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        let e = Config::from_toml(
            "[allocator]\ncontention_threshold = 1.5\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("contention_threshold"), "{e}");
        let e = Config::from_toml(
            "[table]\nslots = 65536\n[allocator]\ncontention_waiters = 4096\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("lower contention_waiters"), "{e}");
    }

    #[test]
    fn the_default_access_is_the_group_with_0660_files_and_a_0750_dir() {
        let c = Config::default_config();
        assert_eq!(c.access.group, "");
        assert_eq!(c.file_mode(), 0o660);
        assert_eq!(c.socket_mode(), 0o660);
        assert_eq!(c.dir_mode(), 0o750);
        let c = Config::from_toml("[access]\nmode = \"0600\"\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.dir_mode(), 0o700);
    }

    #[test]
    fn the_old_socket_mode_names_its_replacement() {
        let e = Config::from_toml("[broker]\nsocket_mode = \"0666\"\n", Path::new("x.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("[access] mode"), "{e}");
        assert!(e.to_string().contains("[access] group"), "{e}");
    }

    #[test]
    fn an_access_mode_that_lets_other_users_write_is_refused() {
        let e = Config::from_toml("[access]\nmode = \"0666\"\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("other users may not write"), "{e}");
        let e = Config::from_toml("[access]\nmode = \"0460\"\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("0600"), "{e}");
        let e = Config::from_toml("[access]\nmode = \"0770\"\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("read and write bits"), "{e}");
    }

    #[test]
    fn print_config_round_trips_without_the_old_option() {
        let c = Config::default_config();
        let text = toml::to_string_pretty(&c).unwrap();
        assert!(!text.contains("socket_mode"), "{text}");
        assert_eq!(Config::from_toml(&text, Path::new("x.toml")).unwrap(), c);
    }
}
