//! etcd 3.4 on loopback, through its lock API (v3lock) on the JSON gateway:
//! a lease from /v3/lease/grant per session, /v3/lock/lock (waits on the
//! server until granted) and /v3/lock/unlock. The bench starts its own `etcd`
//! (a one-member cluster on two free 127.0.0.1 ports, a temporary data
//! directory) and kills it. HTTP/1.1 is spoken by hand over a kept-alive
//! TcpStream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bench::support::{
    ChildGuard, TempDir, base64_encode, etcd_log, find_binary, poll_until, spawn_loopback_etcd,
};
use crate::bench::system::{
    BenchEnv, LockKey, LockSession, LockSystem, RunShape, Sharing, StartError, SystemEntry,
    SystemTraits, WorkerIdentity,
};

pub const ENTRY: SystemEntry = SystemEntry {
    name: "etcd",
    start,
    connect,
};

/// Lease time to live: longer than any bench run, so no lock expires mid-run.
const LEASE_TTL_SECONDS: u64 = 300;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Responses larger than this are refused (the gateway's are tiny).
const RESPONSE_BYTES_MAX: usize = 1 << 20;

struct EtcdSystem {
    address: String,
    runs: AtomicU64,
    _server: ChildGuard,
    _dir: TempDir,
}

fn start(env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    let binary = find_binary("etcd").ok_or(StartError::NotInstalled {
        binary: "etcd (package etcd-server)",
    })?;
    let dir = TempDir::new("etcd")?;
    let (mut server, client_port) = spawn_loopback_etcd(&binary, &dir)?;
    let address = format!("127.0.0.1:{client_port}");
    let timeout = if env.quick { 20 } else { 30 };
    let ready = poll_until(
        Duration::from_secs(timeout),
        Duration::from_millis(50),
        || {
            if let Ok(Some(_)) = server.try_wait() {
                return true;
            }
            Http::connect(&address)
                .and_then(|mut http| http.post_json("/v3/maintenance/status", &json!({})))
                .is_ok()
        },
    );
    if let Ok(Some(status)) = server.try_wait() {
        let log = etcd_log(&dir);
        return Err(StartError::Failed(anyhow::anyhow!(
            "etcd exited at start ({status}): {}",
            log.trim()
        )));
    }
    if !ready {
        return Err(StartError::Failed(anyhow::anyhow!(
            "etcd did not answer on {address} within {timeout} s"
        )));
    }
    Ok(Box::new(EtcdSystem {
        address,
        runs: AtomicU64::new(0),
        _server: server,
        _dir: dir,
    }))
}

impl LockSystem for EtcdSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::CrossProcess,
            excludes: true,
            note: "etcd: v3lock Lock/Unlock via the JSON gateway (HTTP/1.1 keep-alive), one lease per session, 1-member cluster, default fsync",
        }
    }

    fn prepare_run(&mut self, _run: &RunShape) -> anyhow::Result<String> {
        // A fresh key prefix per run: locks of an earlier run can never collide.
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        Ok(format!("{} forelock-bench/run{run}/", self.address))
    }
}

/// A kept-alive HTTP/1.1 connection that posts JSON.
struct Http {
    address: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    request: Vec<u8>,
    line: String,
}

impl Http {
    fn connect(address: &str) -> anyhow::Result<Http> {
        let stream = TcpStream::connect(address)
            .with_context(|| format!("connecting to etcd at {address}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Http {
            address: address.to_string(),
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            request: Vec::with_capacity(512),
            line: String::with_capacity(128),
        })
    }

    fn post_json(&mut self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let body = serde_json::to_vec(body)?;
        self.request.clear();
        write!(
            self.request,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.address,
            body.len()
        )?;
        self.request.extend_from_slice(&body);
        self.writer
            .write_all(&self.request)
            .context("sending to etcd")?;
        let (status, response) = self.read_response()?;
        let value: Value = serde_json::from_slice(&response)
            .with_context(|| format!("etcd {path}: response is not JSON"))?;
        if status != 200 {
            bail!("etcd {path}: HTTP {status}: {value}");
        }
        Ok(value)
    }

    fn read_line(&mut self) -> anyhow::Result<&str> {
        self.line.clear();
        let read = self
            .reader
            .read_line(&mut self.line)
            .context("reading from etcd")?;
        if read == 0 {
            bail!("etcd closed the connection");
        }
        Ok(self.line.trim_end_matches(['\r', '\n']))
    }

    fn read_response(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        let status_line = self.read_line()?.to_string();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("bad HTTP status line {status_line:?}"))?;
        let mut content_length = None;
        let mut chunked = false;
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = Some(value.parse::<usize>().context("Content-Length")?);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size_line = self.read_line()?.to_string();
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .with_context(|| format!("bad chunk size {size_line:?}"))?;
                if body.len() + size > RESPONSE_BYTES_MAX {
                    bail!("etcd response larger than {RESPONSE_BYTES_MAX} bytes");
                }
                let start = body.len();
                body.resize(start + size + 2, 0);
                self.reader
                    .read_exact(&mut body[start..])
                    .context("chunk")?;
                body.truncate(start + size);
                if size == 0 {
                    // Trailer section ends with an empty line (already consumed
                    // as the chunk's CRLF when there are no trailers).
                    break;
                }
            }
        } else {
            let length = content_length.context("etcd response without Content-Length")?;
            if length > RESPONSE_BYTES_MAX {
                bail!("etcd response larger than {RESPONSE_BYTES_MAX} bytes");
            }
            body.resize(length, 0);
            self.reader.read_exact(&mut body).context("response body")?;
        }
        Ok((status, body))
    }
}

struct EtcdSession {
    http: Http,
    lease: String,
    prefix: String,
}

fn connect(config: &str, _worker: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let (address, prefix) = config
        .split_once(' ')
        .context("etcd config is \"ADDRESS PREFIX\"")?;
    let mut http = Http::connect(address)?;
    let grant = http.post_json("/v3/lease/grant", &json!({ "TTL": LEASE_TTL_SECONDS }))?;
    let lease = match &grant["ID"] {
        Value::String(id) => id.clone(),
        Value::Number(id) => id.to_string(),
        other => bail!("lease grant: no ID in {grant} (found {other})"),
    };
    Ok(Box::new(EtcdSession {
        http,
        lease,
        prefix: prefix.to_string(),
    }))
}

impl LockSession for EtcdSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        let name = base64_encode(format!("{}{}", self.prefix, key.name).as_bytes());
        let locked = self.http.post_json(
            "/v3/lock/lock",
            &json!({ "name": name, "lease": self.lease }),
        )?;
        let Some(lock_key) = locked["key"].as_str().map(str::to_string) else {
            bail!("etcd lock: no key in {locked}");
        };
        critical();
        self.http
            .post_json("/v3/lock/unlock", &json!({ "key": lock_key }))?;
        Ok(())
    }
}
