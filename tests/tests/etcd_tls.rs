//! A broker against an etcd that asks for TLS, a client certificate and a
//! user with a password, as a production etcd does: a real etcd on loopback
//! with certificates made by `openssl` for the test, auth enabled, and a
//! user whose role may only read and write under the broker's etcd prefix
//! (the least privilege docs/cluster.md tells operators to give).

mod support;

use forelock_tests::etcd::LocalEtcd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Runs `openssl ARGS` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed (.ci/install.sh)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// P-256, in `dir`: ca.pem, server.pem/server.key, client.pem/client.key.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=forelock-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    for (name, cn, ext) in [
        (
            "server",
            "etcd",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        ),
        ("client", "forelock", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extfile), ext).unwrap();
        let mut req = vec!["req"];
        req.extend(ec);
        let subject = format!("/CN={cn}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        );
    }
}

/// A single etcd member serving https with client-certificate auth (and,
/// after [`TlsEtcd::enable_auth`], users), killed on drop.
struct TlsEtcd {
    etcd: LocalEtcd,
    certs: PathBuf,
}

impl TlsEtcd {
    fn start(dir: &Path) -> Option<TlsEtcd> {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        make_certificates(&certs);
        let file = |name: &str| certs.join(name).into_os_string();
        let extra = [
            "--cert-file".into(),
            file("server.pem"),
            "--key-file".into(),
            file("server.key"),
            "--trusted-ca-file".into(),
            file("ca.pem"),
            "--client-cert-auth".into(),
            // An idle broker's auth token expires within the test (default
            // 300 s): it must authenticate again, not stop granting.
            "--auth-token-ttl".into(),
            "2".into(),
        ];
        let etcd = LocalEtcd::start_serving("https", &extra, |url| {
            ctl(url, &certs, None, &["endpoint", "health"]).is_ok()
        })?;
        Some(TlsEtcd { etcd, certs })
    }

    /// `etcdctl` over TLS with the client certificate, as `user` if given.
    fn ctl(&self, user: Option<&str>, args: &[&str]) -> Result<String, String> {
        ctl(&self.etcd.url, &self.certs, user, args)
    }

    /// Auth on: `root`, and `forelock` whose role may read and write
    /// `prefix` only.
    fn enable_auth(&self, prefix: &str, password: &str) {
        let steps: [&[&str]; 6] = [
            &["user", "add", "root:root-password"],
            &["role", "add", "forelock"],
            &[
                "role",
                "grant-permission",
                "forelock",
                "--prefix=true",
                "readwrite",
                prefix,
            ],
            &["user", "add", &format!("forelock:{password}")],
            &["user", "grant-role", "forelock", "forelock"],
            &["auth", "enable"],
        ];
        for step in steps {
            self.ctl(None, step)
                .unwrap_or_else(|e| panic!("etcdctl {step:?}: {e}"));
        }
    }
}

/// `etcdctl` against `url` over TLS with the certificates in `certs`, as
/// `user` if given: its stdout, or its stderr as the error.
fn ctl(url: &str, certs: &Path, user: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", url, "--command-timeout", "3s"])
        .arg("--cacert")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join("client.pem"))
        .arg("--key")
        .arg(certs.join("client.key"));
    if let Some(user) = user {
        command.args(["--user", user]);
    }
    let out = command.args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The broker's `cluster.json` (rewritten every second or so), once `ready`
/// says it shows what the test waits for; panics after PATIENCE.
fn cluster_status(dir: &Path, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let end = Instant::now() + PATIENCE;
    loop {
        let status = std::fs::read_to_string(dir.join("cluster.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(serde_json::Value::Null);
        if ready(&status) {
            return status;
        }
        assert!(
            Instant::now() < end,
            "cluster.json never showed it: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tls_config(etcd: &TlsEtcd, node: &str, prefix: &str, password_file: &Path) -> String {
    let certs = etcd.certs.display();
    format!(
        "[cluster]\nnode = \"{node}\"\netcd = [\"{url}\"]\netcd_prefix = \"{prefix}\"\n\
         lease_ttl_ms = 4000\nlock_delay_ms = 200\nfence_margin_ms = 1000\nmin_hold_ms = 5\n\
         etcd_ca_file = \"{certs}/ca.pem\"\netcd_cert_file = \"{certs}/client.pem\"\n\
         etcd_key_file = \"{certs}/client.key\"\netcd_user = \"forelock\"\n\
         etcd_password_file = \"{password}\"\n",
        url = etcd.etcd.url,
        password = password_file.display(),
    )
}

#[test]
fn a_broker_with_tls_and_an_etcd_user_takes_global_keys_and_one_with_a_wrong_password_grants_none()
{
    let scratch = TempDir::new("etcd-tls");
    let Some(etcd) = TlsEtcd::start(scratch.path()) else {
        return;
    };
    let prefix = format!("/fl-tls-{}", std::process::id());
    etcd.enable_auth(&prefix, "forelock-password");
    // The role is enforced: the user may not write outside its prefix.
    assert!(
        etcd.ctl(
            Some("forelock:forelock-password"),
            &["put", "/elsewhere", "x"]
        )
        .is_err(),
        "etcd's auth is not on"
    );

    let good = scratch.path().join("password");
    std::fs::write(&good, "forelock-password\n").unwrap();
    let dir = TempDir::new("etcd-tls-a");
    let _broker = Broker::start(dir.path(), &tls_config(&etcd, "a", &prefix, &good));
    let client = forelock::Client::connect_to(dir.path()).expect("connect");
    let mut last = 0;
    for _ in 0..3 {
        let guard = client
            .lock_timeout("global/tls", PATIENCE)
            .expect("a global key through an etcd with TLS and auth");
        assert!(
            guard.token() > last,
            "token {:#x} after {last:#x}",
            guard.token()
        );
        last = guard.token();
        // The node grant is this host's entry under the prefix at etcd.
        let entries = etcd
            .ctl(
                Some("forelock:forelock-password"),
                &["get", "--prefix", "--keys-only", &prefix],
            )
            .expect("the user reads its prefix");
        assert!(
            !entries.trim().is_empty(),
            "held, but nothing under {prefix} at etcd"
        );
        guard.release().expect("release");
    }
    cluster_status(dir.path(), |s| s["connected"] == true);
    // Idle past the token's 2 s TTL (the lease's keep-alive stream does not
    // renew it): the next grant needs a fresh token.
    std::thread::sleep(Duration::from_secs(4));
    let guard = client
        .lock_timeout("global/tls-after-idle", PATIENCE)
        .expect("a global key after the auth token expired");
    assert!(guard.token() > 0);
    guard.release().expect("release");

    // The same broker with a wrong password: not connected, the error said,
    // no grant.
    let wrong = scratch.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let dir_b = TempDir::new("etcd-tls-b");
    let _refused = Broker::start(dir_b.path(), &tls_config(&etcd, "b", &prefix, &wrong));
    let status = cluster_status(dir_b.path(), |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("authentication failed"))
    });
    assert_eq!(status["connected"], false, "{status}");
    let refused = forelock::Client::connect_to(dir_b.path()).expect("connect");
    assert!(
        refused
            .lock_timeout("global/tls", Duration::from_millis(1500))
            .is_err(),
        "a broker etcd refused granted a global key"
    );
}

#[test]
fn a_credential_file_that_cannot_be_read_stops_the_broker_at_start_naming_it() {
    let dir = TempDir::new("etcd-tls-missing");
    let config = dir.path().join("forelockd.toml");
    std::fs::write(
        &config,
        "[cluster]\nnode = \"a\"\netcd = [\"https://127.0.0.1:1\"]\n\
         etcd_ca_file = \"/nonexistent/forelock-ca.pem\"\n",
    )
    .unwrap();
    let out = Command::new(broker_exe())
        .arg("--config")
        .arg(&config)
        .arg("--runtime-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run forelockd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "forelockd started: {stderr}");
    assert!(
        stderr.contains("cluster.etcd_ca_file") && stderr.contains("/nonexistent/forelock-ca.pem"),
        "{stderr}"
    );
}
