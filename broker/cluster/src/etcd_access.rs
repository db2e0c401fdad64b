//! How the agent proves itself to an etcd that asks: TLS (the CA that signed
//! etcd's certificate, and a client certificate for `--client-cert-auth`) and
//! etcd's own auth (a user and its password). Read from the files the
//! `[cluster]` section names, once, when the broker starts: a file that is
//! missing, unreadable or not PEM stops the start with its name and the fix.
//! A certificate renewed on disk is taken at the broker's next restart.

use std::path::Path;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::config::ClusterConfig;

/// A credential file that cannot be used, with the setting that names it.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "cannot read cluster.{field} {path:?}: {cause}; fix the path or the file's permissions"
    )]
    Unreadable {
        field: &'static str,
        path: String,
        cause: std::io::Error,
    },
    #[error(
        "cluster.{field} {path:?} holds no PEM block (\"-----BEGIN ...\"): give the PEM file, not DER or a bundle in another format"
    )]
    NotPem { field: &'static str, path: String },
    #[error(
        "cluster.etcd_password_file {path:?} is empty: write the etcd user's password on its first line"
    )]
    EmptyPassword { path: String },
}

/// What the agent presents to etcd; the default presents nothing (plain
/// `http://`, no auth).
#[derive(Clone, Default)]
pub struct EtcdAccess {
    tls: Option<TlsOptions>,
    user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    /// Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl EtcdAccess {
    /// Reads the files `config` names (a validated section: the fields that
    /// go together are set together).
    pub fn load(config: &ClusterConfig) -> Result<EtcdAccess, AccessError> {
        let tls = if config.etcd_ca_file.is_empty() {
            None
        } else {
            let ca = read_pem("etcd_ca_file", &config.etcd_ca_file)?;
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            if !config.etcd_cert_file.is_empty() {
                let cert = read_pem("etcd_cert_file", &config.etcd_cert_file)?;
                let key = read_pem("etcd_key_file", &config.etcd_key_file)?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            Some(tls)
        };
        let user = if config.etcd_user.is_empty() {
            None
        } else {
            let path = &config.etcd_password_file;
            warn_if_others_may_read(path);
            let text = read("etcd_password_file", path)?;
            let password = String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            if password.is_empty() {
                return Err(AccessError::EmptyPassword { path: path.clone() });
            }
            Some((config.etcd_user.clone(), password))
        };
        Ok(EtcdAccess { tls, user })
    }

    /// `options` with TLS and the user added, where configured.
    pub fn apply(&self, mut options: ConnectOptions) -> ConnectOptions {
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        if let Some((name, password)) = &self.user {
            // etcd's token expires when unused for its TTL (300 s by
            // default), and the lease's keep-alive stream does not use it:
            // an idle broker's next transaction must authenticate again.
            // Without the refresh, a broker idle past the TTL granted no
            // global key again (test: etcd_tls.rs, `--auth-token-ttl 2`).
            options = options
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        options
    }
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, AccessError> {
    std::fs::read(path).map_err(|cause| AccessError::Unreadable {
        field,
        path: path.to_string(),
        cause,
    })
}

fn read_pem(field: &'static str, path: &str) -> Result<Vec<u8>, AccessError> {
    let bytes = read(field, path)?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(AccessError::NotPem {
            field,
            path: path.to_string(),
        });
    }
    Ok(bytes)
}

/// A password file others can read is a leak waiting: say so (the broker
/// still starts, as etcdctl and etcd do with such files).
fn warn_if_others_may_read(path: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = Path::new(path).metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path,
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "cluster.etcd_password_file is readable by others than its owner: chmod 600 it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_in(dir: &Path) -> ClusterConfig {
        ClusterConfig {
            node: "h1".into(),
            etcd: vec!["https://127.0.0.1:2379".into()],
            etcd_ca_file: dir.join("ca.pem").display().to_string(),
            etcd_user: "forelock".into(),
            etcd_password_file: dir.join("password").display().to_string(),
            ..ClusterConfig::default()
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fl-access-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_missing_ca_file_is_named_with_its_setting() {
        let dir = scratch("missing");
        let e = EtcdAccess::load(&config_in(&dir)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("cluster.etcd_ca_file") && text.contains("ca.pem"),
            "{text}"
        );
    }

    #[test]
    fn a_ca_file_that_is_not_pem_is_refused() {
        let dir = scratch("der");
        std::fs::write(dir.join("ca.pem"), [0x30u8, 0x82, 0x01, 0x0a]).unwrap();
        let e = EtcdAccess::load(&config_in(&dir)).unwrap_err();
        assert!(
            matches!(
                e,
                AccessError::NotPem {
                    field: "etcd_ca_file",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn the_password_is_the_first_line_and_never_printed() {
        let dir = scratch("password");
        std::fs::write(
            dir.join("ca.pem"),
            "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(dir.join("password"), "").unwrap();
        let e = EtcdAccess::load(&config_in(&dir)).unwrap_err();
        assert!(matches!(e, AccessError::EmptyPassword { .. }), "{e}");
        std::fs::write(dir.join("password"), "s3cret\n").unwrap();
        let access = EtcdAccess::load(&config_in(&dir)).unwrap();
        assert_eq!(
            access.user,
            Some(("forelock".to_string(), "s3cret".to_string()))
        );
        let shown = format!("{access:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("forelock"),
            "{shown}"
        );
    }
}
