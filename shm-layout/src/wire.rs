//! Messages on the broker's socket (`<runtime dir>/broker.sock`, a
//! SOCK_SEQPACKET Unix socket: one message per packet, no framing).
//!
//! Each message is an rkyv archive, validated (bytecheck) before use: a peer
//! that sends garbage gets an error reply and its packet is dropped, never
//! trusted. The client's identity comes from SO_PEERCRED, not from a message.
//!
//! A connection starts with [`Request::Hello`] (only [`Request::Ping`] and
//! [`Request::Waiters`], which need no client record, may come before it);
//! after that it carries one request and one response at a time. Each
//! connection owns one wait cell of its client record (named in `Hello`):
//! when an acquire is queued, the broker answers [`Response::Queued`] and
//! later hands the lock over by writing that cell and waking it with a shared
//! futex.

use rkyv::rancor;
use rkyv::util::AlignedVec;

/// Bump on any change to these types.
pub const PROTOCOL_VERSION: u32 = 4;
/// Largest packet either side sends or accepts.
pub const MAX_MESSAGE: usize = 1024;
/// Most waiters one [`Response::Waiters`] lists (the answer must fit
/// [`MAX_MESSAGE`]); `total` says how many there are.
pub const WAITERS_MAX: usize = 100;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// First message on a connection. `client: None` registers a new client
    /// record; `Some(i)` attaches this connection to record `i`, which must
    /// belong to the same process (checked with SO_PEERCRED).
    Hello {
        protocol: u32,
        table_version: u32,
        client: Option<u32>,
        cell: u32,
    },
    /// Take `key`. If it is held: `queue` true queues the request (answer
    /// `Queued`, grant later through the wait cell), false answers `WouldBlock`.
    ///
    /// `request` is the client's id for this acquire (unique per client
    /// record, never 0). Sent again with the same id (after a broken
    /// connection or a broker restart), it is answered with the grant it
    /// already produced, or takes its queued place over: never a second grant.
    Acquire {
        key: Vec<u8>,
        shared: bool,
        queue: bool,
        request: u64,
    },
    /// Withdraw the queued acquire `request` (timeout or abandon); answered
    /// `Cancelled`, or `Granted` if the grant won the race.
    Cancel { request: u64 },
    /// Release a lock granted with `token` on `slot`.
    Release { slot: u32, token: u64 },
    /// Liveness check; also the broker round trip the benchmark measures.
    Ping,
    /// The client is done (its `Client` was dropped): free its record and
    /// release whatever it still holds, as if it died. Answered `Bye`.
    Bye,
    /// Who waits for `key`, in queue order (an observer's question, like
    /// `forelock locks`). Allowed before `Hello`: it needs no client record.
    /// Answered [`Response::Waiters`].
    Waiters { key: Vec<u8> },
    /// Does this client still hold `slot` with `token`? Answered
    /// [`Response::Holding`], or the `Lost` error once this host lost the
    /// global key's node grant (the hold stays in place until released), or
    /// `NotHolder`. Changes nothing. (Protocol 4.)
    Check { slot: u32, token: u64 },
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Welcome {
        client: u32,
        epoch: u64,
    },
    Granted {
        slot: u32,
        token: u64,
        owner_died: bool,
    },
    /// Queued on `slot`: sleep on the wait cell; the grant written there is
    /// for this slot (the client needs it to release).
    Queued {
        slot: u32,
    },
    WouldBlock,
    /// The queued acquire was withdrawn before any grant.
    Cancelled,
    Released,
    Pong,
    Bye,
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The answer to [`Request::Waiters`]: the first [`WAITERS_MAX`] queued
    /// acquires of the key, head first, and how many are queued in all
    /// (empty and 0 if the key has no slot or nobody waits).
    Waiters {
        waiters: Vec<WaiterInfo>,
        total: u32,
    },
    /// The answer to [`Request::Check`]: the hold stands.
    Holding,
}

/// One queued acquire, as [`Response::Waiters`] lists it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaiterInfo {
    /// The waiting client's process (its client record's pid).
    pub pid: u32,
    /// A shared acquire.
    pub shared: bool,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request could not be decoded or broke the protocol.
    BadRequest,
    /// Client and broker speak different protocol or table versions.
    VersionMismatch,
    /// Every client record is taken.
    TooManyClients,
    /// No free slot and no idle slot to evict.
    TableFull,
    /// The key breaks the key rules.
    BadKey,
    /// The client holds the maximum number of broker-granted locks.
    TooManyHolds,
    /// Release of a lock this client does not hold (or with a stale token).
    NotHolder,
    /// Attach to a client record of another process, or a dead one.
    NotYourRecord,
    /// The lock was a global key's, and this host lost its node grant (its
    /// etcd lease could not be confirmed in time, docs/cluster.md): the hold
    /// is gone, and another host may hold the key. The release was done.
    Lost,
}

/// Encode a message (infallible for these types).
pub fn encode<T>(value: &T) -> AlignedVec
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    rkyv::to_bytes::<rancor::Error>(value).expect("serialising a wire message cannot fail")
}

/// Why a packet was refused.
#[derive(Debug, thiserror::Error)]
#[error("malformed forelock message ({len} bytes): {reason}")]
pub struct DecodeError {
    pub len: usize,
    pub reason: String,
}

fn aligned(bytes: &[u8]) -> AlignedVec {
    let mut v = AlignedVec::with_capacity(bytes.len());
    v.extend_from_slice(bytes);
    v
}

/// Validate and decode a request packet.
pub fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(DecodeError {
            len: bytes.len(),
            reason: "longer than the protocol allows".into(),
        });
    }
    rkyv::from_bytes::<Request, rancor::Error>(&aligned(bytes)).map_err(|e| DecodeError {
        len: bytes.len(),
        reason: e.to_string(),
    })
}

/// Validate and decode a response packet.
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(DecodeError {
            len: bytes.len(),
            reason: "longer than the protocol allows".into(),
        });
    }
    rkyv::from_bytes::<Response, rancor::Error>(&aligned(bytes)).map_err(|e| DecodeError {
        len: bytes.len(),
        reason: e.to_string(),
    })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (
                any::<u32>(),
                any::<u32>(),
                any::<Option<u32>>(),
                any::<u32>()
            )
                .prop_map(|(protocol, table_version, client, cell)| Request::Hello {
                    protocol,
                    table_version,
                    client,
                    cell
                }),
            (
                proptest::collection::vec(any::<u8>(), 0..80),
                any::<bool>(),
                any::<bool>(),
                any::<u64>()
            )
                .prop_map(|(key, shared, queue, request)| Request::Acquire {
                    key,
                    shared,
                    queue,
                    request
                }),
            any::<u64>().prop_map(|request| Request::Cancel { request }),
            Just(Request::Bye),
            (any::<u32>(), any::<u64>()).prop_map(|(slot, token)| Request::Release { slot, token }),
            Just(Request::Ping),
            proptest::collection::vec(any::<u8>(), 0..80).prop_map(|key| Request::Waiters { key }),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            (any::<u32>(), any::<u64>())
                .prop_map(|(client, epoch)| Response::Welcome { client, epoch }),
            (any::<u32>(), any::<u64>(), any::<bool>()).prop_map(|(slot, token, owner_died)| {
                Response::Granted {
                    slot,
                    token,
                    owner_died,
                }
            }),
            any::<u32>().prop_map(|slot| Response::Queued { slot }),
            Just(Response::WouldBlock),
            Just(Response::Cancelled),
            Just(Response::Released),
            Just(Response::Pong),
            Just(Response::Bye),
            "[ -~]{0,200}".prop_map(|message| Response::Error {
                code: ErrorCode::BadKey,
                message
            }),
            (
                proptest::collection::vec(
                    (any::<u32>(), any::<bool>())
                        .prop_map(|(pid, shared)| WaiterInfo { pid, shared }),
                    0..=WAITERS_MAX
                ),
                any::<u32>()
            )
                .prop_map(|(waiters, total)| Response::Waiters { waiters, total }),
        ]
    }

    proptest! {
        #[test]
        fn every_request_round_trips(r in request()) {
            prop_assert_eq!(decode_request(&encode(&r)).unwrap(), r);
        }

        #[test]
        fn every_response_round_trips_within_the_message_limit(r in response()) {
            let bytes = encode(&r);
            prop_assert!(bytes.len() <= MAX_MESSAGE, "{} bytes", bytes.len());
            prop_assert_eq!(decode_response(&bytes).unwrap(), r);
        }

        #[test]
        fn random_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }
    }

    #[test]
    fn the_longest_waiters_answer_fits_a_message() {
        let r = Response::Waiters {
            waiters: vec![
                WaiterInfo {
                    pid: u32::MAX,
                    shared: true
                };
                WAITERS_MAX
            ],
            total: u32::MAX,
        };
        let bytes = encode(&r);
        assert!(bytes.len() <= MAX_MESSAGE, "{} bytes", bytes.len());
        assert_eq!(decode_response(&bytes).unwrap(), r);
        let longest_key = Request::Waiters {
            key: vec![b'k'; crate::MAX_KEY_LEN],
        };
        assert!(encode(&longest_key).len() <= MAX_MESSAGE);
    }

    #[test]
    fn responses_round_trip() {
        for r in [
            Response::Welcome {
                client: 3,
                epoch: 9,
            },
            Response::Granted {
                slot: 1,
                token: u64::MAX,
                owner_died: true,
            },
            Response::Error {
                code: ErrorCode::TableFull,
                message: "full".into(),
            },
        ] {
            assert_eq!(decode_response(&encode(&r)).unwrap(), r);
        }
    }
}
