//! The two custom broadcasts gossip carries beside foca's own membership
//! updates, their bytes, and the `BroadcastHandler` that decides which ones
//! are news.
//!
//! An item is one byte of format version ([`WIRE_VERSION`]) followed by a
//! postcard [`Item`]. Each names its origin (node name and boot id, since foca
//! only tells who relayed it) and a counter of that origin's boot:
//!
//! | item | supersedes | so that |
//! |---|---|---|
//! | `Hot { origin, version, truncated, keys }` | any `Hot` of the same node with a smaller `(boot, version)` | a node's latest hot list replaces the one still being spread |
//! | `Want { origin, seq, key }` | any `Want` of the same node for the same key with a smaller `(boot, seq)` | a repeated hint is news again, an old copy is not |
//!
//! Every item must fit in one packet with foca's header:
//! [`ITEM_MAX_BYTES`], checked against the largest header by a test. foca
//! sends an item whole or not at all.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use shm_layout::{KeyError, MAX_KEY_LEN, validate_key};

use super::identity::NodeId;

/// The first byte of every item; a node that meets another version drops
/// the item (and says so) instead of misreading it.
pub(crate) const WIRE_VERSION: u8 = 1;

/// foca's `max_packet_size`, for sending and for receiving: under a
/// 1500-byte Ethernet MTU with room for IP and UDP headers (foca's advice).
pub(crate) const MAX_PACKET_BYTES: usize = 1400;

/// Longest node name, in bytes. It bounds foca's header (two identities in
/// every packet), hence the room left for items.
pub const MAX_NODE_NAME_BYTES: usize = 64;

/// Largest encoded item. A packet is foca's header (at most two identities
/// of at most [`MAX_NODE_NAME_BYTES`] names, IPv6 addresses and full boot
/// ids, under 200 bytes), then each item with a 2-byte length prefix.
/// `an_item_of_the_largest_size_fits_beside_the_largest_header` checks the sum.
pub(crate) const ITEM_MAX_BYTES: usize = 1100;

/// Who sent an item first: foca passes only the member that relayed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Origin {
    pub(crate) node: String,
    pub(crate) boot: u64,
}

/// One custom broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Item {
    /// The origin's hot global keys, hottest first. `truncated` says the
    /// forecaster had more than fit in one packet.
    Hot {
        origin: Origin,
        version: u64,
        truncated: bool,
        keys: Vec<Vec<u8>>,
    },
    /// "I will want `key`."
    Want {
        origin: Origin,
        seq: u64,
        key: Vec<u8>,
    },
}

/// Why an item received from a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("empty broadcast item")]
    Empty,
    #[error(
        "broadcast item of format version {found}, this broker reads version {expected}: run one forelock version across the cluster"
    )]
    UnknownVersion { found: u8, expected: u8 },
    #[error("broadcast item of {len} bytes, longer than the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    #[error("broadcast item does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("broadcast item has {0} bytes after its end")]
    TrailingBytes(usize),
    #[error("broadcast item names node {node:?}: a node name is 1 to {max} bytes")]
    BadNode { node: String, max: usize },
    #[error("broadcast item's key #{index} is not a lock key: {source}")]
    BadKey { index: usize, source: KeyError },
}

/// The bytes of an item.
pub(crate) fn encode(item: &Item) -> Vec<u8> {
    let mut bytes = vec![WIRE_VERSION];
    // Serializing into a Vec cannot fail: postcard fails only when its
    // output is full, and a Vec grows.
    match postcard::to_extend(item, bytes) {
        Ok(extended) => bytes = extended,
        Err(error) => unreachable!("postcard into a Vec failed: {error}"),
    }
    bytes
}

/// An item from a peer, checked: known version, exactly one item, a
/// plausible node name, every key a valid lock key.
pub(crate) fn decode(data: &[u8]) -> Result<Item, WireError> {
    let (&version, body) = data.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::UnknownVersion {
            found: version,
            expected: WIRE_VERSION,
        });
    }
    if data.len() > ITEM_MAX_BYTES {
        return Err(WireError::TooLong {
            len: data.len(),
            max: ITEM_MAX_BYTES,
        });
    }
    let (item, rest): (Item, &[u8]) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    let origin = match &item {
        Item::Hot { origin, .. } | Item::Want { origin, .. } => origin,
    };
    check_node_name(&origin.node).map_err(|()| WireError::BadNode {
        node: origin.node.clone(),
        max: MAX_NODE_NAME_BYTES,
    })?;
    match &item {
        Item::Hot { keys, .. } => {
            for (index, key) in keys.iter().enumerate() {
                validate_key(key).map_err(|source| WireError::BadKey { index, source })?;
            }
        }
        Item::Want { key, .. } => {
            validate_key(key).map_err(|source| WireError::BadKey { index: 0, source })?;
        }
    }
    Ok(item)
}

/// A node name is 1 to [`MAX_NODE_NAME_BYTES`] bytes.
pub(crate) fn check_node_name(node: &str) -> Result<(), ()> {
    if node.is_empty() || node.len() > MAX_NODE_NAME_BYTES {
        Err(())
    } else {
        Ok(())
    }
}

/// What [`super::Gossip::publish_hot`] did with the list it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotKeysPublished {
    /// Keys sent: the first ones of the list, in its order.
    pub published: usize,
    /// Valid keys left out because one packet had no room for them (the
    /// list is cut at the first key that does not fit). Receivers see
    /// `truncated: true`.
    pub cut: usize,
    /// Keys left out because they are not lock keys (empty, longer than
    /// [`MAX_KEY_LEN`] bytes, or holding a NUL).
    pub invalid: usize,
}

impl HotKeysPublished {
    /// Every key of the list was published.
    pub fn is_complete(&self) -> bool {
        self.cut == 0 && self.invalid == 0
    }
}

/// The bytes of a `Hot` item for `keys` (hottest first), cut to
/// [`ITEM_MAX_BYTES`], and what was left out.
#[cfg(test)]
pub(crate) fn encode_hot(
    origin: &Origin,
    version: u64,
    keys: Vec<Vec<u8>>,
) -> (Vec<u8>, HotKeysPublished) {
    let (mut item, report) = cut_hot(origin, version, keys);
    (encode_fitted(&mut item), report)
}

/// A `Hot` item for `keys` (hottest first) that fits in
/// [`ITEM_MAX_BYTES`]: invalid keys left out, the list cut at the first key
/// that does not fit; and what was left out.
pub(crate) fn cut_hot(
    origin: &Origin,
    version: u64,
    keys: Vec<Vec<u8>>,
) -> (Item, HotKeysPublished) {
    let offered = keys.len();
    let mut valid: Vec<Vec<u8>> = keys
        .into_iter()
        .filter(|key| validate_key(key).is_ok())
        .collect();
    let invalid = offered - valid.len();
    let valid_count = valid.len();

    // The fixed part, with the key count's varint at its widest (a packet
    // holds far fewer than 2^14 keys: 3 bytes is an upper bound).
    let empty = encode(&Item::Hot {
        origin: origin.clone(),
        version,
        truncated: true,
        keys: Vec::new(),
    });
    let mut size = empty.len() + 2;
    let mut fits = 0;
    for key in &valid {
        // A key is at most MAX_KEY_LEN (64) bytes: its length is one varint byte.
        debug_assert!(key.len() <= MAX_KEY_LEN && MAX_KEY_LEN < 128);
        let cost = 1 + key.len();
        if size + cost > ITEM_MAX_BYTES {
            break;
        }
        size += cost;
        fits += 1;
    }
    valid.truncate(fits);
    let mut item = Item::Hot {
        origin: origin.clone(),
        version,
        truncated: fits < valid_count,
        keys: valid,
    };
    // The estimate above is an upper bound; this only guards it.
    let _ = encode_fitted(&mut item);
    let published = match &item {
        Item::Hot { keys, .. } => keys.len(),
        Item::Want { .. } => 0,
    };
    (
        item,
        HotKeysPublished {
            published,
            cut: valid_count - published,
            invalid,
        },
    )
}

/// The bytes of `item`; a `Hot` item longer than [`ITEM_MAX_BYTES`] loses
/// its coldest keys (and is marked truncated) until it fits. A `Want` item
/// always fits: its key is at most [`MAX_KEY_LEN`] bytes.
pub(crate) fn encode_fitted(item: &mut Item) -> Vec<u8> {
    let mut bytes = encode(item);
    while bytes.len() > ITEM_MAX_BYTES {
        match item {
            Item::Hot {
                keys, truncated, ..
            } if !keys.is_empty() => {
                keys.pop();
                *truncated = true;
            }
            _ => break,
        }
        bytes = encode(item);
    }
    bytes
}

/// What the handler heard, for the gossip task to turn into events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Heard {
    Hot {
        node: String,
        keys: Vec<Vec<u8>>,
        truncated: bool,
    },
    Want {
        node: String,
        key: Vec<u8>,
    },
}

/// Identifies an item for foca's dissemination backlog: a newer item of the
/// same kind from the same node (and for `Want`, the same key) replaces an
/// older one there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ItemKey {
    Hot {
        node: String,
        stamp: (u64, u64),
    },
    Want {
        node: String,
        key: Vec<u8>,
        stamp: (u64, u64),
    },
}

impl foca::Invalidates for ItemKey {
    fn invalidates(&self, other: &ItemKey) -> bool {
        match (self, other) {
            (
                ItemKey::Hot { node, stamp },
                ItemKey::Hot {
                    node: other_node,
                    stamp: other_stamp,
                },
            ) => node == other_node && stamp > other_stamp,
            (
                ItemKey::Want { node, key, stamp },
                ItemKey::Want {
                    node: other_node,
                    key: other_key,
                    stamp: other_stamp,
                },
            ) => node == other_node && key == other_key && stamp > other_stamp,
            _ => false,
        }
    }
}

/// A map that forgets: at most `2 * cap` entries, the oldest generation
/// dropped when the current one fills. What it forgets can be heard again
/// as news, which costs a repeated hint, never a wrong one.
pub(crate) struct Recent<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    cap: usize,
}

impl<K: Eq + Hash, V> Recent<K, V> {
    pub(crate) fn new(cap: usize) -> Recent<K, V> {
        debug_assert!(cap > 0);
        Recent {
            current: HashMap::new(),
            previous: HashMap::new(),
            cap,
        }
    }

    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        if !self.current.contains_key(&key) && self.current.len() >= self.cap {
            self.previous = std::mem::take(&mut self.current);
        }
        self.previous.remove(&key);
        self.current.insert(key, value);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// Nodes whose latest hot list is remembered.
const HOT_NODES_REMEMBERED: usize = 1024;
/// (node, key) pairs whose latest want hint is remembered.
const WANTS_REMEMBERED: usize = 16 * 1024;

/// foca's `BroadcastHandler`: decodes items, keeps the newest stamp per
/// node (and key), and queues what is news for the gossip task.
pub(crate) struct Handler {
    own_node: String,
    hot: Recent<String, (u64, u64)>,
    wants: Recent<(String, Vec<u8>), (u64, u64)>,
    heard: Arc<Mutex<Vec<Heard>>>,
}

impl Handler {
    pub(crate) fn new(own_node: String, heard: Arc<Mutex<Vec<Heard>>>) -> Handler {
        Handler {
            own_node,
            hot: Recent::new(HOT_NODES_REMEMBERED),
            wants: Recent::new(WANTS_REMEMBERED),
            heard,
        }
    }

    fn tell(&self, heard: Heard) {
        self.heard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(heard);
    }
}

impl foca::BroadcastHandler<NodeId> for Handler {
    type Key = ItemKey;
    type Error = WireError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<ItemKey>, WireError> {
        let item = decode(data)?;
        // sender is None for our own items (Foca::add_broadcast); Some for a
        // peer's copy, which may be one of ours coming back: we know our own
        // state, so that is never news.
        let from_peer = sender.is_some();
        match item {
            Item::Hot {
                origin,
                version,
                truncated,
                keys,
            } => {
                let stamp = (origin.boot, version);
                if from_peer && origin.node == self.own_node {
                    return Ok(None);
                }
                if self
                    .hot
                    .get(&origin.node)
                    .is_some_and(|seen| *seen >= stamp)
                {
                    return Ok(None);
                }
                self.hot.insert(origin.node.clone(), stamp);
                if from_peer {
                    self.tell(Heard::Hot {
                        node: origin.node.clone(),
                        keys,
                        truncated,
                    });
                }
                Ok(Some(ItemKey::Hot {
                    node: origin.node,
                    stamp,
                }))
            }
            Item::Want { origin, seq, key } => {
                let stamp = (origin.boot, seq);
                if from_peer && origin.node == self.own_node {
                    return Ok(None);
                }
                let seen_key = (origin.node, key);
                if self.wants.get(&seen_key).is_some_and(|seen| *seen >= stamp) {
                    return Ok(None);
                }
                self.wants.insert(seen_key.clone(), stamp);
                let (node, key) = seen_key;
                if from_peer {
                    self.tell(Heard::Want {
                        node: node.clone(),
                        key: key.clone(),
                    });
                }
                Ok(Some(ItemKey::Want { node, key, stamp }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::{BroadcastHandler, Codec, Header, Invalidates, Message, PostcardCodec};
    use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

    fn origin(node: &str, boot: u64) -> Origin {
        Origin {
            node: node.into(),
            boot,
        }
    }

    fn key(i: usize) -> Vec<u8> {
        format!("global/orders/{i:08}").into_bytes()
    }

    /// The widest identity: longest name, IPv6, largest port and boot.
    fn widest_identity(name: char) -> NodeId {
        NodeId {
            node: std::iter::repeat_n(name, MAX_NODE_NAME_BYTES).collect(),
            addr: SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::new(
                    0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
                ),
                u16::MAX,
                u32::MAX,
                u32::MAX,
            )),
            boot: u64::MAX,
        }
    }

    #[test]
    fn an_item_of_the_largest_size_fits_beside_the_largest_header() {
        // foca.broadcast() sends Message::Broadcast: header, then items, each
        // with a u16 length prefix. An item that does not fit there never leaves.
        let mut header_bytes = Vec::new();
        PostcardCodec
            .encode_header(
                &Header {
                    src: widest_identity('a'),
                    src_incarnation: u16::MAX,
                    dst: widest_identity('b'),
                    message: Message::Broadcast,
                },
                &mut header_bytes,
            )
            .unwrap();
        assert!(
            header_bytes.len() + 2 + ITEM_MAX_BYTES <= MAX_PACKET_BYTES,
            "header {} + 2 + item {} > packet {}",
            header_bytes.len(),
            ITEM_MAX_BYTES,
            MAX_PACKET_BYTES
        );
    }

    #[test]
    fn items_round_trip() {
        let hot = Item::Hot {
            origin: origin("h1", 5),
            version: 9,
            truncated: false,
            keys: vec![key(1), key(2)],
        };
        assert_eq!(decode(&encode(&hot)).unwrap(), hot);
        let want = Item::Want {
            origin: origin("h2", 6),
            seq: 3,
            key: key(7),
        };
        assert_eq!(decode(&encode(&want)).unwrap(), want);
    }

    #[test]
    fn a_short_hot_list_is_published_whole() {
        let (bytes, report) = encode_hot(&origin("h1", 1), 1, vec![key(1), key(2), key(3)]);
        assert_eq!(
            report,
            HotKeysPublished {
                published: 3,
                cut: 0,
                invalid: 0
            }
        );
        assert!(report.is_complete());
        match decode(&bytes).unwrap() {
            Item::Hot {
                keys, truncated, ..
            } => {
                assert_eq!(keys, vec![key(1), key(2), key(3)]);
                assert!(!truncated);
            }
            other => panic!("expected Hot, got {other:?}"),
        }
    }

    #[test]
    fn an_oversized_hot_list_is_cut_to_its_hottest_keys_and_says_so() {
        let keys: Vec<Vec<u8>> = (0..10_000).map(key).collect();
        let longest_node: String = "n".repeat(MAX_NODE_NAME_BYTES);
        let (bytes, report) = encode_hot(&origin(&longest_node, u64::MAX), u64::MAX, keys);
        assert!(bytes.len() <= ITEM_MAX_BYTES, "{} bytes", bytes.len());
        assert!(report.published > 0);
        assert_eq!(report.published + report.cut, 10_000);
        assert!(!report.is_complete());
        match decode(&bytes).unwrap() {
            Item::Hot {
                keys, truncated, ..
            } => {
                assert!(truncated);
                assert_eq!(keys.len(), report.published);
                // The hottest (first) keys are the ones kept, in order.
                assert_eq!(keys, (0..report.published).map(key).collect::<Vec<_>>());
            }
            other => panic!("expected Hot, got {other:?}"),
        }
        // And the cut leaves little room unused: one more key would not fit.
        assert!(bytes.len() + 1 + key(0).len() > ITEM_MAX_BYTES - 2);
    }

    #[test]
    fn keys_that_are_not_lock_keys_are_left_out_and_counted() {
        let keys = vec![
            key(1),
            Vec::new(),
            vec![b'x'; MAX_KEY_LEN + 1],
            b"glo\0bal".to_vec(),
            key(2),
        ];
        let (bytes, report) = encode_hot(&origin("h1", 1), 1, keys);
        assert_eq!(report.published, 2);
        assert_eq!(report.invalid, 3);
        assert_eq!(report.cut, 0);
        match decode(&bytes).unwrap() {
            Item::Hot { keys, .. } => assert_eq!(keys, vec![key(1), key(2)]),
            other => panic!("expected Hot, got {other:?}"),
        }
    }

    #[test]
    fn hostile_items_are_refused_not_trusted() {
        assert!(matches!(decode(&[]), Err(WireError::Empty)));
        assert!(matches!(
            decode(&[9, 0, 0]),
            Err(WireError::UnknownVersion { found: 9, .. })
        ));
        assert!(matches!(
            decode(&[WIRE_VERSION, 0xff, 0xff, 0xff]),
            Err(WireError::Decode(_))
        ));
        let mut trailing = encode(&Item::Want {
            origin: origin("h1", 1),
            seq: 1,
            key: key(1),
        });
        trailing.push(0);
        assert!(matches!(
            decode(&trailing),
            Err(WireError::TrailingBytes(1))
        ));
        let nameless = encode(&Item::Want {
            origin: origin("", 1),
            seq: 1,
            key: key(1),
        });
        assert!(matches!(decode(&nameless), Err(WireError::BadNode { .. })));
        let bad_key = encode(&Item::Hot {
            origin: origin("h1", 1),
            version: 1,
            truncated: false,
            keys: vec![key(1), vec![b'x'; MAX_KEY_LEN + 1]],
        });
        assert!(matches!(
            decode(&bad_key),
            Err(WireError::BadKey { index: 1, .. })
        ));
        // A count claiming a huge list in a few bytes fails, without
        // allocating for the claim.
        let mut huge = encode(&Item::Hot {
            origin: origin("h1", 1),
            version: 1,
            truncated: false,
            keys: Vec::new(),
        });
        huge.pop();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode(&huge).is_err());
    }

    #[test]
    fn a_newer_item_from_a_node_supersedes_an_older_one() {
        let hot = |node: &str, stamp| ItemKey::Hot {
            node: node.into(),
            stamp,
        };
        assert!(hot("h1", (1, 2)).invalidates(&hot("h1", (1, 1))));
        assert!(hot("h1", (2, 0)).invalidates(&hot("h1", (1, 9))));
        assert!(!hot("h1", (1, 1)).invalidates(&hot("h1", (1, 2))));
        assert!(!hot("h1", (1, 1)).invalidates(&hot("h1", (1, 1))));
        assert!(!hot("h2", (1, 2)).invalidates(&hot("h1", (1, 1))));
        let want = |key: usize, stamp| ItemKey::Want {
            node: "h1".into(),
            key: super::tests::key(key),
            stamp,
        };
        assert!(want(1, (1, 2)).invalidates(&want(1, (1, 1))));
        assert!(!want(2, (1, 2)).invalidates(&want(1, (1, 1))));
        assert!(!want(1, (1, 2)).invalidates(&hot("h1", (1, 1))));
    }

    #[test]
    fn the_handler_reports_news_once_and_ignores_stale_and_own_items() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let mut handler = Handler::new("me".into(), heard.clone());
        let peer = NodeId::seed("127.0.0.1:1".parse().unwrap());
        let hot = |version, keys: Vec<Vec<u8>>| {
            encode(&Item::Hot {
                origin: origin("h1", 1),
                version,
                truncated: false,
                keys,
            })
        };
        assert!(
            handler
                .receive_item(&hot(2, vec![key(2)]), Some(&peer))
                .unwrap()
                .is_some()
        );
        // The same item again, and an older one: not news.
        assert!(
            handler
                .receive_item(&hot(2, vec![key(2)]), Some(&peer))
                .unwrap()
                .is_none()
        );
        assert!(
            handler
                .receive_item(&hot(1, vec![key(1)]), Some(&peer))
                .unwrap()
                .is_none()
        );
        // Our own item coming back from a peer: not news.
        let own = encode(&Item::Want {
            origin: origin("me", 1),
            seq: 1,
            key: key(5),
        });
        assert!(handler.receive_item(&own, Some(&peer)).unwrap().is_none());
        // Our own item added locally: kept for dissemination, not reported.
        assert!(handler.receive_item(&own, None).unwrap().is_some());
        assert_eq!(
            *heard.lock().unwrap(),
            vec![Heard::Hot {
                node: "h1".into(),
                keys: vec![key(2)],
                truncated: false
            }]
        );
    }

    #[test]
    fn recent_forgets_the_oldest_generation_and_stays_bounded() {
        let mut recent = Recent::new(4);
        for i in 0..100u32 {
            recent.insert(i, i);
            assert!(recent.len() <= 8);
            assert_eq!(recent.get(&i), Some(&i));
        }
        assert_eq!(recent.get(&0), None);
    }
}
