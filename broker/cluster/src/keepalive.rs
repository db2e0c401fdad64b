//! The lease's keep-alive: renewals sent through every etcd endpoint at
//! once, on tasks of their own, so that neither a dead member nor an
//! election holds up the session (its commands, its key tasks' reports,
//! its fence timer).
//!
//! Before this module the session renewed in line, one request at a time
//! on one keep-alive stream of the balanced client (up to 2 s to open a
//! stream and 2 s for an answer), and when the etcd leader died that
//! stream broke, the next one landed on the dead member or on a follower
//! still waiting for the election, the safe time ran out and the brokers
//! fenced themselves (docs/cluster.md, "A leader loss, measured"). Now a
//! renewal goes through each endpoint every `every`, each on a stream of
//! its own, whether or not the earlier ones were answered: a follower
//! forwards a renewal to the new leader as soon as it knows one, so the
//! first renewal sent after the election comes back at once.
//!
//! Each answer is paired with the instant its own request was sent: a
//! renewal sent at `t` proves the lease at etcd until `t + TTL` on etcd's
//! clock. The broker's safe time and the fence deadline are the largest
//! any renewal has proved (docs/cluster.md, "Leases and the self-fence").

use crate::agent::{AgentStatus, FAILOVER_TARGET, Lease, monotonic_ns};
use crate::config::ClusterConfig;
use etcd_client::{Client, ConnectOptions};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// The pause before a renewal that failed is sent again (a dead member
/// refuses at once: this bounds the attempts to five a second).
const REOPEN_PAUSE: Duration = Duration::from_millis(200);

/// Renewals unanswered at once through one endpoint, at most. Each waits
/// up to the lease's TTL, so a renewal every `every` (a sixth of the safe
/// window or less) keeps seven to nine in flight while a member holds
/// them: through an election, a member without a leader holds each renewal
/// for an election timeout and more, and the renewals sent after it knows
/// the new leader are the ones that come back at once. The bound only
/// guards against a pathological configuration.
const RENEWALS_IN_FLIGHT: usize = 16;

/// How often a lease of `ttl_ms` is renewed: a third of the TTL (etcd's
/// own clients' rate), or a sixth of the safe window if that is sooner,
/// so that when etcd stops answering (an election) at least five sixths
/// of the window are left to ride it out. At least every 100 ms.
pub fn renew_every(config: &ClusterConfig, ttl_ms: u64) -> Duration {
    let window_ms = config.valid_for_ms(ttl_ms);
    Duration::from_millis((ttl_ms / 3).min(window_ms / 6).max(100))
}

/// The endpoints of the balanced client (the one every etcd step goes
/// through), as the keep-alive finds them: an endpoint whose member
/// refuses connections (it is down) is taken out, and put back when a
/// renewal through it comes back. The balanced channel picks the less
/// loaded of two endpoints, and a dead member, which fails every request
/// at once, looks the least loaded: with one member down, most etcd steps
/// first failed on it and paused 50 ms or more.
#[derive(Clone)]
pub struct Endpoints {
    client: Client,
    in_use: Arc<Mutex<HashSet<String>>>,
}

impl Endpoints {
    /// `client` balanced over `endpoints`, all in use.
    pub fn new(client: Client, endpoints: &[String]) -> Endpoints {
        Endpoints {
            client,
            in_use: Arc::new(Mutex::new(endpoints.iter().cloned().collect())),
        }
    }

    /// `endpoint` as the balanced client keys it: etcd-client adds
    /// `http://` to an endpoint written without a scheme.
    fn uri(endpoint: &str) -> String {
        if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        }
    }

    fn in_use(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `endpoint`'s member refused a connection: take it out, unless it
    /// is the last one in use.
    async fn down(&self, endpoint: &str) {
        let take = {
            let mut in_use = self.in_use();
            in_use.len() > 1 && in_use.remove(endpoint)
        };
        if take {
            let removed = self.client.remove_endpoint(Self::uri(endpoint)).await;
            tracing::info!(
                target: FAILOVER_TARGET,
                at_ns = monotonic_ns(),
                endpoint,
                ok = removed.is_ok(),
                "etcd endpoint refuses connections: out of the balanced client"
            );
        }
    }

    /// A renewal through `endpoint` came back: put it back in use.
    async fn up(&self, endpoint: &str) {
        let add = self.in_use().insert(endpoint.to_string());
        if add {
            let added = self.client.add_endpoint(endpoint).await;
            tracing::info!(
                target: FAILOVER_TARGET,
                at_ns = monotonic_ns(),
                endpoint,
                ok = added.is_ok(),
                "etcd endpoint answers again: back in the balanced client"
            );
        }
    }
}

/// The pauses between attempts to connect a keep-alive client to its
/// endpoint ([`Dial`]): from 200 ms, doubling, at most 5 s.
const CONNECT_PAUSE_FIRST: Duration = Duration::from_millis(200);
const CONNECT_PAUSE_MAX: Duration = Duration::from_secs(5);

/// The keep-alive's client of one endpoint, made at its first use and kept
/// for every later session. With etcd auth on, `Client::connect`
/// authenticates through the endpoint and fails while its member is down;
/// the client was then never made, and the endpoint had no keep-alive,
/// hence no health tracking, and kept its place in the balanced client.
/// Now [`Renewals::through`] retries the connect, with backoff, until the
/// member is up.
#[derive(Clone)]
pub struct Dial {
    endpoint: String,
    options: Option<ConnectOptions>,
    client: Arc<tokio::sync::OnceCell<Client>>,
}

impl Dial {
    /// A client of `endpoint` with `options`, connected at first use.
    pub fn new(endpoint: String, options: ConnectOptions) -> Dial {
        Dial {
            endpoint,
            options: Some(options),
            client: Arc::default(),
        }
    }

    /// `client`, made already (for `endpoint`: a name in the logs).
    pub fn made(endpoint: String, client: Client) -> Dial {
        Dial {
            endpoint,
            options: None,
            client: Arc::new(tokio::sync::OnceCell::new_with(Some(client))),
        }
    }

    /// One attempt to connect, or the client made earlier.
    async fn client(&self) -> Result<Client, etcd_client::Error> {
        self.client
            .get_or_try_init(|| Client::connect([self.endpoint.as_str()], self.options.clone()))
            .await
            .cloned()
    }
}

/// What the keep-alive tasks share.
#[derive(Clone)]
pub struct Renewals {
    pub config: ClusterConfig,
    pub lease: Lease,
    pub status: Arc<Mutex<AgentStatus>>,
    /// The session's lease, the TTL it was granted with, and how often to
    /// renew it.
    pub id: i64,
    pub ttl_ms: u64,
    pub every: Duration,
    /// Told why, when etcd says the lease is gone.
    pub gone: mpsc::UnboundedSender<String>,
    /// The balanced client's endpoints, kept to those that answer (`None`:
    /// one endpoint only).
    pub endpoints: Option<Endpoints>,
}

impl Renewals {
    fn note(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A renewal sent at `sent_ns` came back with `ttl_ms`: raise the safe
    /// time and the fence deadline (never lower them: an older answer may
    /// come back after a newer one on another stream).
    fn proved(&self, sent_ns: u64, ttl_ms: u64) {
        let safe = sent_ns + self.config.valid_for_ms(ttl_ms) * 1_000_000;
        let alive = sent_ns + self.config.alive_for_ms(ttl_ms) * 1_000_000;
        let id = self.id;
        self.lease.set(|l| {
            if l.id == id {
                l.valid_until_ns = l.valid_until_ns.max(safe);
                l.alive_until_ns = l.alive_until_ns.max(alive);
            }
        });
        self.note(|s| s.connected = true);
    }

    fn failed(&self, error: String) {
        let safe = self.lease.get().valid_until_ns > monotonic_ns();
        self.note(|s| {
            s.last_error = error;
            s.connected = safe;
        });
    }

    /// Keeps the lease alive through `client` (one endpoint) until the
    /// session aborts the task, or etcd says the lease is gone: a renewal
    /// every `every`, each on a keep-alive stream of its own, and the next
    /// one goes out on time even while earlier ones are unanswered (up to
    /// [`RENEWALS_IN_FLIGHT`]). A failed one is sent again after
    /// [`REOPEN_PAUSE`].
    ///
    /// A stream of its own per renewal: etcd answers a stream's renewals
    /// one after the other, and a follower that has lost its leader holds
    /// a renewal for a whole election timeout before it looks for the new
    /// leader again (etcd 3.4's `waitLeader`): a renewal sent once the new
    /// leader is known must not queue behind it.
    ///
    /// Its client is connected first ([`Dial`]), retried with backoff; while
    /// it cannot be, the endpoint is out of the balanced client as if its
    /// member refused connections.
    pub async fn through(self, dial: Dial) {
        let endpoint = dial.endpoint.clone();
        let mut pause = CONNECT_PAUSE_FIRST;
        let client = loop {
            match dial.client().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, endpoint, retry_in = ?pause, "no keep-alive client for this endpoint yet");
                    if let Some(e) = &self.endpoints {
                        e.down(&endpoint).await;
                    }
                    self.failed(format!("{endpoint}: {e}"));
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(CONNECT_PAUSE_MAX);
                }
            }
        };
        let mut flying = FuturesUnordered::new();
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    if flying.len() < RENEWALS_IN_FLIGHT {
                        flying.push(self.renew_once(&client));
                    }
                    next = tokio::time::Instant::now() + self.every;
                }
                Some((sent, answer)) = flying.next() => {
                    let took_ms = monotonic_ns().saturating_sub(sent) / 1_000_000;
                    tracing::debug!(
                        target: FAILOVER_TARGET,
                        at_ns = monotonic_ns(),
                        endpoint,
                        took_ms,
                        in_flight = flying.len(),
                        safe_for_ms = self.lease.get().valid_until_ns.saturating_sub(monotonic_ns()) / 1_000_000,
                        answer = ?answer,
                        "keep-alive answered"
                    );
                    match answer {
                        Renewal::Renewed => {
                            self.proved(sent, self.ttl_ms);
                            if !self.status.lock().unwrap_or_else(|e| e.into_inner()).renewed_through.contains(&endpoint) {
                                self.note(|s| { s.renewed_through.insert(endpoint.clone()); });
                            }
                            if let Some(e) = &self.endpoints {
                                e.up(&endpoint).await;
                            }
                        }
                        Renewal::Gone => {
                            let why = format!("lease {:x} not found at etcd ({endpoint})", self.id);
                            let _ = self.gone.send(why);
                            // The session fences and aborts this task.
                            std::future::pending::<()>().await;
                        }
                        Renewal::Failed { why, refused } => {
                            if refused && let Some(e) = &self.endpoints {
                                e.down(&endpoint).await;
                            }
                            self.failed(format!("{endpoint}: {why}"));
                            next = next.min(tokio::time::Instant::now() + REOPEN_PAUSE);
                        }
                    }
                }
            }
        }
    }

    /// One renewal on a keep-alive stream of its own, and when it was sent.
    /// etcd-client opens the stream with a renewal and waits for its
    /// answer; it says only whether the lease was found, and a renewal
    /// resets the lease to the TTL it was granted with.
    async fn renew_once(&self, client: &Client) -> (u64, Renewal) {
        let sent = monotonic_ns();
        let mut c = client.clone();
        let limit = Duration::from_millis(self.ttl_ms);
        let answer = match tokio::time::timeout(limit, c.lease_keep_alive(self.id)).await {
            Ok(Ok(_stream)) => Renewal::Renewed,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) if e.contains("not found") => {
                Renewal::Gone
            }
            Ok(Err(e)) => {
                let why = e.to_string();
                Renewal::Failed {
                    refused: why.contains("tcp connect error"),
                    why,
                }
            }
            Err(_) => Renewal::Failed {
                why: format!("no answer within {limit:?}"),
                refused: false,
            },
        };
        (sent, answer)
    }
}

/// What came of one renewal.
#[derive(Debug)]
enum Renewal {
    /// etcd reset the lease to its TTL.
    Renewed,
    /// etcd does not know the lease (it expired or was revoked).
    Gone,
    /// No answer (a dead member, a broken connection, a timeout);
    /// `refused`: the member refused the connection (it is down).
    Failed { why: String, refused: bool },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_a_scheme_is_keyed_as_etcd_client_adds_it() {
        assert_eq!(Endpoints::uri("10.0.0.1:2379"), "http://10.0.0.1:2379");
        assert_eq!(
            Endpoints::uri("https://etcd.example:2379"),
            "https://etcd.example:2379"
        );
    }

    #[test]
    fn renewals_leave_five_sixths_of_the_safe_window_in_hand() {
        let c = ClusterConfig::default();
        // 10 s TTL: an 8.5 s window; a sixth of it (1.416 s) is sooner
        // than a third of the TTL.
        assert_eq!(renew_every(&c, 10_000), Duration::from_millis(1_416));
        // The fault tests' 4 s lease: a 2.8 s window, renewed every 466 ms.
        let tests = ClusterConfig {
            fence_margin_ms: 1_000,
            ..c.clone()
        };
        assert_eq!(renew_every(&tests, 4_000), Duration::from_millis(466));
        // A long lease with a small margin: a third of the TTL.
        let long = ClusterConfig {
            fence_margin_ms: 0,
            max_clock_drift: 0.0,
            ..c
        };
        assert_eq!(renew_every(&long, 60_000), Duration::from_millis(10_000));
    }
}
