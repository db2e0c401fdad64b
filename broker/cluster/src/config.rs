//! The `[cluster]` section of the broker's configuration.

use serde::{Deserialize, Serialize};

/// The `[cluster]` section. Its presence turns clustering on; every field but
/// `node` and `etcd` has a default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This host's name, unique in the cluster.
    pub node: String,
    /// etcd client endpoints, e.g. `http://10.78.0.11:2379`.
    pub etcd: Vec<String>,
    /// Prefix of every etcd key forelock writes.
    pub etcd_prefix: String,
    /// Keys that start with this prefix are global.
    pub key_prefix: String,
    /// UDP address the gossip (foca) binds; empty = no gossip.
    pub gossip_addr: String,
    /// Gossip peers to join at start.
    pub seeds: Vec<String>,
    /// TTL asked for the broker's etcd lease.
    pub lease_ttl_ms: u64,
    /// Wait after a predecessor's lease expired before granting.
    pub lock_delay_ms: u64,
    /// A used node grant is kept at least this long after a callback.
    pub min_hold_ms: u64,
    /// Bound on the rate difference between this host's monotonic clock and
    /// etcd's (0.05 = 5%).
    pub max_clock_drift: f64,
    /// Time the broker stops granting before its lease could have expired,
    /// beyond the drift allowance.
    pub fence_margin_ms: u64,
    /// With `https://` endpoints: the PEM file of the CA that signed etcd's
    /// server certificate (the only CA trusted for it).
    pub etcd_ca_file: String,
    /// etcd with `--client-cert-auth`: this broker's certificate and key
    /// (PEM), both or neither.
    pub etcd_cert_file: String,
    pub etcd_key_file: String,
    /// etcd with auth enabled: the user this broker authenticates as, and the
    /// file holding its password (one line; keep it readable by the broker's
    /// user only). Both or neither.
    pub etcd_user: String,
    pub etcd_password_file: String,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            node: String::new(),
            etcd: Vec::new(),
            etcd_prefix: "/forelock".into(),
            key_prefix: "global/".into(),
            gossip_addr: String::new(),
            seeds: Vec::new(),
            lease_ttl_ms: 10_000,
            lock_delay_ms: 2_000,
            min_hold_ms: 50,
            max_clock_drift: 0.05,
            fence_margin_ms: 1_000,
            etcd_ca_file: String::new(),
            etcd_cert_file: String::new(),
            etcd_key_file: String::new(),
            etcd_user: String::new(),
            etcd_password_file: String::new(),
        }
    }
}

/// A `[cluster]` section that cannot work, with the fix in its message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("cluster.node is empty: give this host a name unique in the cluster")]
    NoNode,
    #[error(
        "cluster.etcd is empty: list at least one etcd client URL, e.g. \"http://127.0.0.1:2379\""
    )]
    NoEtcd,
    #[error("cluster.key_prefix is empty: every key would be global; use e.g. \"global/\"")]
    NoKeyPrefix,
    #[error(
        "cluster.lease_ttl_ms = {ttl} leaves no time to grant: it must exceed fence_margin_ms ({margin}) plus the drift allowance; raise lease_ttl_ms or lower fence_margin_ms"
    )]
    LeaseTooShort { ttl: u64, margin: u64 },
    #[error("cluster.max_clock_drift = {0} must be in [0, 0.5)")]
    Drift(f64),
    #[error(
        "cluster.{field} = {value:?} is not an address: write IP:PORT, e.g. \"10.78.0.1:7946\""
    )]
    Address { field: &'static str, value: String },
    #[error(
        "cluster.etcd mixes http:// and https:// endpoints: one etcd cluster is served one way; list them all with the same scheme"
    )]
    MixedSchemes,
    #[error(
        "cluster.etcd lists https:// endpoints but cluster.etcd_ca_file is empty: set it to the PEM file of the CA that signed etcd's server certificate"
    )]
    NoCa,
    #[error(
        "cluster.{field} is set but cluster.etcd lists http:// endpoints: TLS needs https:// endpoints (etcd's --listen-client-urls with --cert-file); use https:// or remove cluster.{field}"
    )]
    TlsWithoutHttps { field: &'static str },
    #[error("cluster.{set} is set but cluster.{missing} is empty: give both (or neither)")]
    HalfPair {
        set: &'static str,
        missing: &'static str,
    },
}

impl ClusterConfig {
    /// Checks that the section can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.is_empty() {
            return Err(ConfigError::NoNode);
        }
        if self.etcd.is_empty() {
            return Err(ConfigError::NoEtcd);
        }
        if self.key_prefix.is_empty() {
            return Err(ConfigError::NoKeyPrefix);
        }
        if !(0.0..0.5).contains(&self.max_clock_drift) {
            return Err(ConfigError::Drift(self.max_clock_drift));
        }
        if !self.gossip_addr.is_empty() && self.gossip_addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::Address {
                field: "gossip_addr",
                value: self.gossip_addr.clone(),
            });
        }
        if let Some(bad) = self
            .seeds
            .iter()
            .find(|s| s.parse::<std::net::SocketAddr>().is_err())
        {
            return Err(ConfigError::Address {
                field: "seeds",
                value: bad.clone(),
            });
        }
        self.validate_access()?;
        if self.valid_for_ms(self.lease_ttl_ms) == 0 {
            return Err(ConfigError::LeaseTooShort {
                ttl: self.lease_ttl_ms,
                margin: self.fence_margin_ms,
            });
        }
        Ok(())
    }

    /// TLS and auth towards etcd: the fields that go together are all set
    /// or all empty, and TLS goes with https:// endpoints.
    fn validate_access(&self) -> Result<(), ConfigError> {
        for (a, b, a_name, b_name) in [
            (
                &self.etcd_cert_file,
                &self.etcd_key_file,
                "etcd_cert_file",
                "etcd_key_file",
            ),
            (
                &self.etcd_user,
                &self.etcd_password_file,
                "etcd_user",
                "etcd_password_file",
            ),
        ] {
            match (a.is_empty(), b.is_empty()) {
                (false, true) => {
                    return Err(ConfigError::HalfPair {
                        set: a_name,
                        missing: b_name,
                    });
                }
                (true, false) => {
                    return Err(ConfigError::HalfPair {
                        set: b_name,
                        missing: a_name,
                    });
                }
                _ => {}
            }
        }
        let https = self
            .etcd
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https > 0 && https < self.etcd.len() {
            return Err(ConfigError::MixedSchemes);
        }
        if https > 0 && self.etcd_ca_file.is_empty() {
            return Err(ConfigError::NoCa);
        }
        let tls_field = [
            ("etcd_ca_file", &self.etcd_ca_file),
            ("etcd_cert_file", &self.etcd_cert_file),
        ]
        .iter()
        .find_map(|(name, value)| (!value.is_empty()).then_some(*name));
        match tls_field {
            Some(field) if https == 0 => Err(ConfigError::TlsWithoutHttps { field }),
            _ => Ok(()),
        }
    }

    /// How long after sending a renewal that etcd answered with `ttl_ms` the
    /// broker may keep granting: `ttl * (1 - drift) - margin`, 0 if none.
    pub fn valid_for_ms(&self, ttl_ms: u64) -> u64 {
        let scaled = (ttl_ms as f64 * (1.0 - self.max_clock_drift)) as u64;
        scaled.saturating_sub(self.fence_margin_ms)
    }

    /// How long after sending a renewal that etcd answered with `ttl_ms`
    /// the lease surely lives at etcd, on this host's clock: `ttl * (1 -
    /// drift)`. Past it without a newer answer, the lease may have expired
    /// there: the agent fences (docs/cluster.md, "Leases and the
    /// self-fence").
    pub fn alive_for_ms(&self, ttl_ms: u64) -> u64 {
        (ttl_ms as f64 * (1.0 - self.max_clock_drift)) as u64
    }

    /// Whether `key` is global.
    pub fn is_global(&self, key: &[u8]) -> bool {
        key.starts_with(self.key_prefix.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> ClusterConfig {
        ClusterConfig {
            node: "h1".into(),
            etcd: vec!["http://127.0.0.1:2379".into()],
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn the_defaults_with_a_node_and_an_endpoint_are_valid() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn a_lease_shorter_than_the_margin_is_refused_with_the_fix() {
        let c = ClusterConfig {
            lease_ttl_ms: 1000,
            ..valid()
        };
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("raise lease_ttl_ms"), "{e}");
    }

    #[test]
    fn tls_and_auth_settings_that_cannot_work_are_refused_with_the_fix() {
        let tls = ClusterConfig {
            etcd: vec![
                "https://10.0.0.1:2379".into(),
                "https://10.0.0.2:2379".into(),
            ],
            etcd_ca_file: "/etc/forelock/ca.pem".into(),
            ..valid()
        };
        assert_eq!(tls.validate(), Ok(()));
        let cases = [
            (
                ClusterConfig {
                    etcd_ca_file: String::new(),
                    ..tls.clone()
                },
                ConfigError::NoCa,
            ),
            (
                ClusterConfig {
                    etcd: vec![
                        "https://10.0.0.1:2379".into(),
                        "http://10.0.0.2:2379".into(),
                    ],
                    ..tls.clone()
                },
                ConfigError::MixedSchemes,
            ),
            (
                ClusterConfig {
                    etcd_ca_file: "/etc/forelock/ca.pem".into(),
                    ..valid()
                },
                ConfigError::TlsWithoutHttps {
                    field: "etcd_ca_file",
                },
            ),
            (
                ClusterConfig {
                    etcd_cert_file: "/etc/forelock/me.pem".into(),
                    ..tls.clone()
                },
                ConfigError::HalfPair {
                    set: "etcd_cert_file",
                    missing: "etcd_key_file",
                },
            ),
            (
                ClusterConfig {
                    etcd_password_file: "/etc/forelock/password".into(),
                    ..valid()
                },
                ConfigError::HalfPair {
                    set: "etcd_password_file",
                    missing: "etcd_user",
                },
            ),
        ];
        for (config, expected) in cases {
            assert_eq!(config.validate(), Err(expected), "{config:?}");
        }
        // Auth without TLS is etcd's own choice to allow: accepted.
        let auth = ClusterConfig {
            etcd_user: "forelock".into(),
            etcd_password_file: "/etc/forelock/password".into(),
            ..valid()
        };
        assert_eq!(auth.validate(), Ok(()));
    }

    #[test]
    fn grants_stop_before_the_lease_can_expire() {
        let c = valid();
        // 10 s TTL, 5% drift, 1 s margin: 8.5 s.
        assert_eq!(c.valid_for_ms(10_000), 8_500);
        assert_eq!(c.valid_for_ms(500), 0);
    }

    #[test]
    fn the_lease_is_taken_for_alive_until_its_ttl_less_the_drift() {
        let c = valid();
        assert_eq!(c.alive_for_ms(10_000), 9_500);
        assert!(c.alive_for_ms(4_000) > c.valid_for_ms(4_000));
    }
}
