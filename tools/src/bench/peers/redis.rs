//! Redis 7 on loopback, the usual single-instance lock recipe: `SET key token
//! NX PX 30000` to acquire (retried while taken: Redis has no waiting), a
//! compare-and-delete Lua script to release. The bench starts its own
//! `redis-server` on a free 127.0.0.1 port, without persistence, and kills it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bench::support::{
    ChildGuard, TempDir, die_with_parent, find_binary, free_loopback_port, poll_until,
};
use crate::bench::system::{
    BenchEnv, LockKey, LockSession, LockSystem, RunShape, Sharing, StartError, SystemEntry,
    SystemTraits, WorkerIdentity,
};

pub const ENTRY: SystemEntry = SystemEntry {
    name: "redis",
    start,
    connect,
};

const RELEASE_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// A holder that cannot get the key within this time reports an error
/// instead of retrying for ever.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts retried at once before sleeping between attempts.
const IMMEDIATE_RETRIES: u32 = 3;
const RETRY_SLEEP: Duration = Duration::from_micros(100);

struct RedisSystem {
    address: String,
    // Field order: the server is stopped before its directory is removed.
    _server: ChildGuard,
    _dir: TempDir,
}

fn start(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    let binary = find_binary("redis-server").ok_or(StartError::NotInstalled {
        binary: "redis-server",
    })?;
    let dir = TempDir::new("redis")?;
    let port = free_loopback_port()?;
    let log = std::fs::File::create(dir.path().join("redis.log")).context("redis log")?;
    let mut command = Command::new(&binary);
    command
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--protected-mode", "yes", "--logfile", ""])
        .arg("--dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().context("redis log")?))
        .stderr(Stdio::from(log));
    let child = die_with_parent(&mut command)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut server = ChildGuard::new(child);
    let address = format!("127.0.0.1:{port}");
    let ready = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        if let Ok(Some(_)) = server.try_wait() {
            return true;
        }
        Resp::connect(&address)
            .and_then(|mut resp| resp.command(&[b"PING"]))
            .is_ok_and(|reply| matches!(reply, Reply::Simple(ref pong) if pong == "PONG"))
    });
    if let Ok(Some(status)) = server.try_wait() {
        let log = std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default();
        return Err(StartError::Failed(anyhow::anyhow!(
            "redis-server exited at start ({status}): {}",
            log.trim()
        )));
    }
    if !ready {
        return Err(StartError::Failed(anyhow::anyhow!(
            "redis-server did not answer PING on {address} within 10 s"
        )));
    }
    Ok(Box::new(RedisSystem {
        address,
        _server: server,
        _dir: dir,
    }))
}

impl LockSystem for RedisSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::CrossProcess,
            excludes: true,
            note: "redis: SET NX PX 30000 (retry x3 at once, then every 100 us) + compare-and-delete EVALSHA; --save '' --appendonly no; TCP loopback",
        }
    }

    fn prepare_run(&mut self, _run: &RunShape) -> anyhow::Result<String> {
        let mut resp = Resp::connect(&self.address)?;
        resp.command(&[b"FLUSHALL"])?.expect_ok("FLUSHALL")?;
        Ok(self.address.clone())
    }
}

/// A reply in the Redis serialization protocol (only the kinds used here).
#[derive(Debug, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
}

impl Reply {
    fn expect_ok(self, what: &str) -> anyhow::Result<()> {
        match self {
            Reply::Simple(ok) if ok == "OK" => Ok(()),
            other => bail!("{what}: expected +OK, got {other:?}"),
        }
    }
}

/// A Redis connection speaking RESP2 by hand.
struct Resp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    request: Vec<u8>,
    line: String,
}

impl Resp {
    fn connect(address: &str) -> anyhow::Result<Resp> {
        let stream = TcpStream::connect(address)
            .with_context(|| format!("connecting to redis at {address}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(ACQUIRE_TIMEOUT))?;
        Ok(Resp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            request: Vec::with_capacity(256),
            line: String::with_capacity(64),
        })
    }

    fn command(&mut self, arguments: &[&[u8]]) -> anyhow::Result<Reply> {
        self.request.clear();
        write!(self.request, "*{}\r\n", arguments.len())?;
        for argument in arguments {
            write!(self.request, "${}\r\n", argument.len())?;
            self.request.extend_from_slice(argument);
            self.request.extend_from_slice(b"\r\n");
        }
        self.writer
            .write_all(&self.request)
            .context("sending to redis")?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> anyhow::Result<Reply> {
        self.line.clear();
        let read = self
            .reader
            .read_line(&mut self.line)
            .context("reading from redis")?;
        if read == 0 {
            bail!("redis closed the connection");
        }
        let line = self.line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(line.len().min(1));
        match kind {
            "+" => Ok(Reply::Simple(rest.to_string())),
            "-" => Ok(Reply::Error(rest.to_string())),
            ":" => Ok(Reply::Integer(rest.parse().context("redis integer reply")?)),
            "$" => {
                let length: i64 = rest.parse().context("redis bulk length")?;
                if length < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut body = vec![0u8; length as usize + 2];
                self.reader
                    .read_exact(&mut body)
                    .context("redis bulk reply")?;
                body.truncate(length as usize);
                Ok(Reply::Bulk(Some(body)))
            }
            _ => bail!("unexpected redis reply {line:?}"),
        }
    }
}

struct RedisSession {
    resp: Resp,
    release_sha: Vec<u8>,
    token_prefix: String,
    token_counter: u64,
}

fn connect(config: &str, worker: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let mut resp = Resp::connect(config)?;
    let release_sha = match resp.command(&[b"SCRIPT", b"LOAD", RELEASE_SCRIPT.as_bytes()])? {
        Reply::Bulk(Some(sha)) => sha,
        other => bail!("SCRIPT LOAD: expected the script's SHA1, got {other:?}"),
    };
    Ok(Box::new(RedisSession {
        resp,
        release_sha,
        token_prefix: format!("{}-{}-", std::process::id(), worker.index),
        token_counter: 0,
    }))
}

impl LockSession for RedisSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        self.token_counter += 1;
        let token = format!("{}{}", self.token_prefix, self.token_counter);
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            let reply = self.resp.command(&[
                b"SET",
                key.name.as_bytes(),
                token.as_bytes(),
                b"NX",
                b"PX",
                b"30000",
            ])?;
            match reply {
                Reply::Simple(ok) if ok == "OK" => break,
                Reply::Bulk(None) => {}
                other => bail!("SET NX PX: unexpected reply {other:?}"),
            }
            attempts += 1;
            if started.elapsed() > ACQUIRE_TIMEOUT {
                bail!(
                    "redis lock {} still taken after {ACQUIRE_TIMEOUT:?}",
                    key.name
                );
            }
            if attempts > IMMEDIATE_RETRIES {
                std::thread::sleep(RETRY_SLEEP);
            }
        }
        critical();
        let reply = self.resp.command(&[
            b"EVALSHA",
            &self.release_sha,
            b"1",
            key.name.as_bytes(),
            token.as_bytes(),
        ])?;
        match reply {
            Reply::Integer(1) => Ok(()),
            other => bail!(
                "releasing {}: expected :1 from the compare-and-delete script, got {other:?} (lock expired or taken by another holder)",
                key.name
            ),
        }
    }
}
