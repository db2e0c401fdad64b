//! A host: a namespace in which a broker runs, with its own runtime
//! directory. Clients reach it over the Unix socket in that directory, so
//! client processes need not enter the namespace.

use super::LIBFAKETIME;
use super::net::{HOSTS, Net};
use crate::{Broker, TempDir};
use forelock_cluster::ClusterConfig;
use std::path::{Path, PathBuf};

/// How to start a host's broker.
#[derive(Clone, Debug, Default)]
pub struct HostOptions {
    /// The `[cluster]` section; `None` starts the single-host broker.
    pub cluster: Option<ClusterConfig>,
    /// Broker configuration before the `[cluster]` section (e.g. an
    /// `[allocator]` section).
    pub extra_toml: String,
    /// Run the broker under libfaketime with a timestamp file that
    /// [`Host::jump_wall_clock`] rewrites (`CLOCK_MONOTONIC` stays real).
    pub faketime: bool,
}

/// A `[cluster]` section for host `node` of `net`, against `etcd`
/// endpoints, with gossip on port 7946 and the other hosts as seeds. The
/// times suit tests: a 4 s lease (etcd raises shorter ones on a 1.5 s
/// election timeout), 1 s lock-delay, 1 s fence margin.
pub fn cluster_config(net: &Net, node: &str, etcd: &[String]) -> ClusterConfig {
    ClusterConfig {
        node: node.into(),
        etcd: etcd.to_vec(),
        gossip_addr: format!("{}:7946", net.member(node).addr),
        seeds: HOSTS
            .iter()
            .filter(|h| **h != node)
            .map(|h| format!("{}:7946", net.member(h).addr))
            .collect(),
        lease_ttl_ms: 4_000,
        lock_delay_ms: 1_000,
        min_hold_ms: 50,
        max_clock_drift: 0.05,
        fence_margin_ms: 1_000,
        ..ClusterConfig::default()
    }
}

/// The TOML a host's broker is started with.
pub fn config_toml(options: &HostOptions) -> String {
    #[derive(serde::Serialize)]
    struct Section<'a> {
        cluster: &'a ClusterConfig,
    }
    let mut text = options.extra_toml.clone();
    if let Some(c) = &options.cluster {
        text.push('\n');
        text.push_str(&toml::to_string(&Section { cluster: c }).expect("[cluster] as TOML"));
    }
    text
}

/// A broker in the namespace of host `name`; killed on drop.
pub struct Host {
    /// First: dropped (killed) before its directory is removed.
    pub broker: Broker,
    pub name: String,
    pub ns: String,
    dir: TempDir,
    clock_file: Option<PathBuf>,
    pub options: HostOptions,
}

impl Host {
    /// Start `exe` (the broker under test) in host `name`'s namespace with
    /// `options`, and wait until it is ready.
    pub fn start(net: &Net, name: &str, exe: &Path, options: HostOptions) -> Host {
        if let Some(c) = &options.cluster {
            c.validate().unwrap_or_else(|e| {
                panic!("the harness wrote a [cluster] section that cannot work: {e}")
            });
        }
        let ns = net.member(name).ns.clone();
        let dir = TempDir::new(&format!("host-{}-{name}", net.prefix));
        let config = config_toml(&options);
        let clock_file = options.faketime.then(|| dir.path().join("faketime.rc"));
        let mut env: Vec<(&str, String)> = Vec::new();
        if let Some(f) = &clock_file {
            std::fs::write(f, "+0\n").unwrap();
            env.push(("LD_PRELOAD", LIBFAKETIME.into()));
            env.push(("FAKETIME_TIMESTAMP_FILE", f.display().to_string()));
            env.push(("FAKETIME_NO_CACHE", "1".into()));
            env.push(("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()));
        }
        // The brokers' log filter (the harness's default is `info`), e.g.
        // `info,forelock::failover=debug,forelock::grant_timing=debug` to
        // see where a failover's time goes (docs/cluster.md).
        if let Ok(filter) = std::env::var("FORELOCK_CLUSTER_BROKER_LOG") {
            env.push(("FORELOCK_LOG", filter));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let broker = Broker::launch_wrapped(
            &[
                "setpriv",
                "--pdeathsig",
                "KILL",
                "ip",
                "netns",
                "exec",
                ns.as_str(),
            ],
            exe,
            dir.path(),
            &config,
            &env,
        );
        Host {
            name: name.into(),
            ns,
            dir,
            clock_file,
            broker,
            options,
        }
    }

    /// The runtime directory: clients connect here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.broker.pid()
    }

    /// SIGKILL the broker.
    pub fn kill9(&mut self) {
        self.broker.kill9();
    }

    /// Start the broker again (after [`Host::kill9`], or kill it first).
    pub fn restart(&mut self) {
        if self.broker.child.is_some() {
            self.broker.kill9();
        }
        self.broker.restart_stopped();
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// SIGSTOP the broker, and wait (bounded) until it is stopped.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
        assert!(
            super::wait_until(std::time::Duration::from_secs(10), || self.state() == 'T'),
            "the broker {} did not stop on SIGSTOP",
            self.pid()
        );
    }

    /// SIGCONT the broker.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// The broker's state letter from /proc (`T` when stopped).
    pub fn state(&self) -> char {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next())
            })
            .unwrap_or('?')
    }

    /// Move the broker's wall clock: `offset` as libfaketime reads it,
    /// relative to the real time (`"-2h"`, `"+90s"`, `"+0"`). Only for a
    /// host started with [`HostOptions::faketime`].
    pub fn jump_wall_clock(&self, offset: &str) {
        let f = self
            .clock_file
            .as_ref()
            .expect("jump_wall_clock: start the host with HostOptions { faketime: true, .. }");
        std::fs::write(f, format!("{offset}\n")).unwrap();
    }

    /// The environment under which the broker runs its clock (libfaketime),
    /// for a probe that must see the same wall clock.
    pub fn clock_env(&self) -> Vec<(String, String)> {
        match &self.clock_file {
            None => Vec::new(),
            Some(f) => vec![
                ("LD_PRELOAD".into(), LIBFAKETIME.into()),
                ("FAKETIME_TIMESTAMP_FILE".into(), f.display().to_string()),
                ("FAKETIME_NO_CACHE".into(), "1".into()),
                ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ],
        }
    }

    /// Whether the broker process has libfaketime mapped.
    pub fn has_faketime_loaded(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
            .is_ok_and(|m| m.contains("libfaketime"))
    }

    pub fn log(&self) -> String {
        self.broker.log()
    }

    /// How many times the broker's cluster agent has fenced itself (lost
    /// its lease), from its `cluster.json` (rewritten every 500 ms);
    /// `None` before the first one is written.
    pub fn fences(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir().join("cluster.json")).ok()?;
        let status: serde_json::Value = serde_json::from_str(&text).ok()?;
        status["fences"].as_u64()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::env::var("FORELOCK_CLUSTER_KEEP_LOGS").is_ok_and(|v| v == "1") {
            eprintln!("--- broker {} ---\n{}", self.name, self.log());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_has_a_cluster_section_the_agent_parses_back() {
        let cluster = ClusterConfig {
            node: "h2".into(),
            etcd: vec!["http://10.1.2.11:2379".into()],
            lease_ttl_ms: 4_000,
            seeds: vec!["10.1.2.1:7946".into()],
            ..ClusterConfig::default()
        };
        let text = config_toml(&HostOptions {
            cluster: Some(cluster.clone()),
            extra_toml: "[allocator]\npolicy = \"none\"\n".into(),
            faketime: false,
        });
        assert!(text.contains("\n[cluster]\n"), "{text}");
        assert!(text.contains("node = \"h2\""), "{text}");
        assert!(text.contains("lease_ttl_ms = 4000"), "{text}");
        #[derive(serde::Deserialize)]
        struct Back {
            cluster: ClusterConfig,
        }
        // (The other sections are ignored here: no deny_unknown_fields.)
        let back: Back = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back.cluster, cluster);
    }

    #[test]
    fn without_a_cluster_section_the_config_is_the_extra_toml_alone() {
        let text = config_toml(&HostOptions::default());
        assert!(!text.contains("cluster"), "{text}");
    }
}
