//! Gossip over real UDP on 127.0.0.1, and foca fed hostile bytes directly.
//!
//! Deadlines are generous (the machine is shared and small): they bound a
//! test that would otherwise hang, they do not measure anything.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use foca::{AccumulatingRuntime, Codec, Foca, Header, Message, PostcardCodec};
use rand::{Rng, SeedableRng as _};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{Instant, timeout};

use super::*;

/// How long a cluster of three on loopback may take to converge, detect a
/// failure or spread an item.
const CONVERGENCE_DEADLINE: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct Node {
    gossip: Gossip,
    events: UnboundedReceiver<GossipEvent>,
    /// Every event received so far, for failure messages.
    seen: Vec<GossipEvent>,
}

impl Node {
    fn start(node: &str, bind: SocketAddr, seeds: Vec<SocketAddr>) -> Node {
        let (events_tx, events) = mpsc::unbounded_channel();
        let gossip = Gossip::start(
            GossipConfig {
                node: node.into(),
                bind,
                seeds,
            },
            events_tx,
        )
        .unwrap();
        Node {
            gossip,
            events,
            seen: Vec::new(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.gossip.local_addr()
    }

    /// Waits for the first event that `wanted` accepts; panics, listing what
    /// came instead, after [`CONVERGENCE_DEADLINE`].
    async fn expect_event(&mut self, what: &str, wanted: impl Fn(&GossipEvent) -> bool) {
        let deadline = Instant::now() + CONVERGENCE_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.events.recv()).await {
                Ok(Some(event)) => {
                    let matched = wanted(&event);
                    self.seen.push(event);
                    if matched {
                        return;
                    }
                }
                Ok(None) => panic!("{what}: event channel closed; saw {:?}", self.seen),
                Err(_) => panic!(
                    "{what}: not within {CONVERGENCE_DEADLINE:?}; saw {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits until `members()` satisfies `wanted`.
    async fn expect_members(&self, what: &str, wanted: impl Fn(&[Member]) -> bool) {
        let deadline = Instant::now() + CONVERGENCE_DEADLINE;
        loop {
            let members = self.gossip.members();
            if wanted(&members) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {CONVERGENCE_DEADLINE:?}; members {members:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn is_up(members: &[Member], node: &str) -> bool {
    members
        .iter()
        .any(|member| member.node == node && member.up)
}

fn is_down(members: &[Member], node: &str) -> bool {
    members
        .iter()
        .any(|member| member.node == node && !member.up)
        && !is_up(members, node)
}

/// Three brokers joined through the first one, each seeing the other two.
async fn three() -> (Node, Node, Node) {
    let mut a = Node::start("a", loopback(), Vec::new());
    let mut b = Node::start("b", loopback(), vec![a.addr()]);
    let mut c = Node::start("c", loopback(), vec![a.addr()]);
    for (node, others) in [
        (&mut a, ["b", "c"]),
        (&mut b, ["a", "c"]),
        (&mut c, ["a", "b"]),
    ] {
        for other in others {
            node.expect_members(&format!("{other} up"), |members| is_up(members, other))
                .await;
        }
    }
    (a, b, c)
}

fn key(name: &str) -> Vec<u8> {
    format!("global/{name}").into_bytes()
}

#[tokio::test]
async fn three_instances_converge_to_see_each_other() {
    let (mut a, mut b, mut c) = three().await;
    for (node, others) in [
        (&mut a, ["b", "c"]),
        (&mut b, ["a", "c"]),
        (&mut c, ["a", "b"]),
    ] {
        let members = node.gossip.members();
        assert_eq!(members.len(), 2, "{members:?}");
        for other in others {
            node.expect_event(
                &format!("MemberUp {other}"),
                |event| matches!(event, GossipEvent::MemberUp { node, .. } if node == other),
            )
            .await;
        }
    }
    // Each member is listed at the address it gossips at.
    let addr_of_b = b.addr();
    assert!(
        a.gossip
            .members()
            .iter()
            .any(|member| member.node == "b" && member.addr == addr_of_b)
    );
}

#[tokio::test]
async fn a_stopped_instance_is_reported_down_by_the_others() {
    let (mut a, mut b, c) = three().await;
    // A crash: no goodbye, the socket simply goes quiet.
    c.gossip.kill().await;
    for node in [&mut a, &mut b] {
        node.expect_event(
            "MemberDown c",
            |event| matches!(event, GossipEvent::MemberDown { node } if node == "c"),
        )
        .await;
        node.expect_members("c down", |members| is_down(members, "c"))
            .await;
        assert!(is_up(
            &node.gossip.members(),
            if node.gossip.origin.node == "a" {
                "b"
            } else {
                "a"
            }
        ));
    }
}

#[tokio::test]
async fn an_instance_that_shuts_down_is_reported_down_by_the_others() {
    let (mut a, mut b, c) = three().await;
    c.gossip.shutdown().await;
    for node in [&mut a, &mut b] {
        node.expect_event(
            "MemberDown c after its leave",
            |event| matches!(event, GossipEvent::MemberDown { node } if node == "c"),
        )
        .await;
    }
}

#[tokio::test]
async fn a_restarted_instance_rejoins_at_the_same_address() {
    let (mut a, _b, c) = three().await;
    let addr_of_c = c.addr();
    let seeds = vec![a.addr()];
    c.gossip.kill().await;
    a.expect_event(
        "MemberDown c",
        |event| matches!(event, GossipEvent::MemberDown { node } if node == "c"),
    )
    .await;
    // Same name, same address, new boot: a newer identity, accepted at once.
    let _c = Node::start("c", addr_of_c, seeds);
    a.expect_event("MemberUp c after the restart", |event| {
        matches!(event, GossipEvent::MemberUp { node, addr } if node == "c" && *addr == addr_of_c)
    })
    .await;
    a.expect_members("c up again, listed once", |members| {
        is_up(members, "c") && members.iter().filter(|m| m.node == "c").count() == 1
    })
    .await;
}

/// A broker started before its gossip address can be bound (the network is
/// not up yet, or a previous broker's socket is still closing) joins once it
/// can, instead of running without gossip until restarted.
#[tokio::test]
async fn an_address_that_cannot_be_bound_yet_is_tried_again_until_it_can() {
    let taken = std::net::UdpSocket::bind(loopback()).unwrap();
    let addr = taken.local_addr().unwrap();
    let mut a = Node::start("a", loopback(), Vec::new());
    let late = Node::start("late", addr, vec![a.addr()]);
    assert_eq!(late.addr(), addr, "the configured address, bound later");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(taken);
    a.expect_event("MemberUp late, once its address was free", |event| {
        matches!(event, GossipEvent::MemberUp { node, addr: at } if node == "late" && *at == addr)
    })
    .await;
    // A shutdown while still waiting to bind returns at once.
    let blocker = std::net::UdpSocket::bind(loopback()).unwrap();
    let waiting = Node::start("waiting", blocker.local_addr().unwrap(), Vec::new());
    timeout(CONVERGENCE_DEADLINE, waiting.gossip.shutdown())
        .await
        .expect("shutdown while the address was taken");
}

#[tokio::test]
async fn hot_keys_and_a_want_hint_from_one_reach_the_other_two() {
    let (a, mut b, mut c) = three().await;
    let first = vec![key("orders"), key("stock")];
    let report = a.gossip.publish_hot(first.clone());
    assert!(report.is_complete(), "{report:?}");
    a.gossip.want(key("payments")).unwrap();
    for node in [&mut b, &mut c] {
        node.expect_event("Hot from a", |event| {
            *event
                == GossipEvent::Hot {
                    node: "a".into(),
                    keys: first.clone(),
                    truncated: false,
                }
        })
        .await;
        node.expect_event("Want from a", |event| {
            *event
                == GossipEvent::Want {
                    node: "a".into(),
                    key: key("payments"),
                }
        })
        .await;
    }

    // A newer list supersedes: it arrives, and the older one is not heard again.
    let second = vec![key("invoices")];
    let _ = a.gossip.publish_hot(second.clone());
    for node in [&mut b, &mut c] {
        node.expect_event("second Hot from a", |event| {
            matches!(event, GossipEvent::Hot { node, keys, .. } if node == "a" && *keys == second)
        })
        .await;
        // Drain what else is queued: nothing may bring the first list back.
        tokio::time::sleep(Duration::from_millis(500)).await;
        while let Ok(event) = node.events.try_recv() {
            node.seen.push(event);
        }
        let last_hot = node
            .seen
            .iter()
            .rev()
            .find_map(|event| match event {
                GossipEvent::Hot { node, keys, .. } if node == "a" => Some(keys.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(last_hot, second, "events {:?}", node.seen);
    }

    // Keys that are not lock keys are refused as want hints.
    assert!(a.gossip.want(Vec::new()).is_err());
    assert!(
        a.gossip
            .want(vec![b'k'; shm_layout::MAX_KEY_LEN + 1])
            .is_err()
    );
}

#[tokio::test]
async fn a_member_that_joins_later_hears_the_latest_hot_list() {
    let (a, _b, _c) = three().await;
    let hot = vec![key("published-before-d-came")];
    let _ = a.gossip.publish_hot(hot.clone());
    // Long enough for foca to have spread the item its bounded number of
    // times among a, b and c before d exists (no timing is asserted).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut d = Node::start("d", loopback(), vec![a.addr()]);
    d.expect_event(
        "a's hot list at the late joiner",
        |event| matches!(event, GossipEvent::Hot { node, keys, .. } if node == "a" && *keys == hot),
    )
    .await;
}

#[tokio::test]
async fn an_oversized_hot_key_list_is_cut_to_fit_and_says_so() {
    let (a, mut b, _c) = three().await;
    let keys: Vec<Vec<u8>> = (0..5_000).map(|i| key(&format!("k{i:05}"))).collect();
    let report = a.gossip.publish_hot(keys.clone());
    assert!(!report.is_complete());
    assert!(report.published > 10, "{report:?}");
    assert_eq!(report.published + report.cut, keys.len());
    assert_eq!(report.invalid, 0);
    let kept = keys[..report.published].to_vec();
    b.expect_event("the cut list, marked truncated", |event| {
        *event
            == GossipEvent::Hot {
                node: "a".into(),
                keys: kept.clone(),
                truncated: true,
            }
    })
    .await;
}

#[tokio::test]
async fn garbage_datagrams_sent_to_a_member_do_not_break_it() {
    let (a, mut b, _c) = three().await;
    let target = b.addr();
    let attacker = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut garbage: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        vec![0xff; 3],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xab; 1401],
        vec![0x5a; 60_000],
    ];
    // A valid header addressed to b, then a custom broadcast that is not one
    // of ours: foca passes the item to our handler, which must refuse it.
    let b_identity = NodeId {
        node: "b".into(),
        addr: target,
        boot: b.gossip.origin.boot,
    };
    let forger = NodeId {
        node: "forger".into(),
        addr: attacker.local_addr().unwrap(),
        boot: 1,
    };
    let mut forged = Vec::new();
    PostcardCodec
        .encode_header(
            &Header {
                src: forger.clone(),
                src_incarnation: 0,
                dst: b_identity.clone(),
                message: Message::Broadcast,
            },
            &mut forged,
        )
        .unwrap();
    let bad_item = [wire::WIRE_VERSION, 0xff, 0xff, 0xff, 0xff];
    forged.extend_from_slice(&(bad_item.len() as u16).to_be_bytes());
    forged.extend_from_slice(&bad_item);
    garbage.push(forged.clone());
    // The same with a length prefix that runs past the end.
    let mut overrun = forged[..forged.len() - bad_item.len() - 2].to_vec();
    overrun.extend_from_slice(&600u16.to_be_bytes());
    overrun.extend_from_slice(&[1, 2, 3]);
    garbage.push(overrun);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x90551b);
    for _ in 0..200 {
        let len = rng.random_range(1..MAX_PACKET_BYTES);
        garbage.push((0..len).map(|_| rng.random()).collect());
    }
    // One at a time, each counted before the next: a burst would overflow
    // the socket's receive buffer and be lost in the kernel, uncounted.
    let deadline = Instant::now() + CONVERGENCE_DEADLINE;
    for (sent, datagram) in garbage.iter().enumerate() {
        let before = b.gossip.stats().packets_dropped;
        attacker.send_to(datagram, target).unwrap();
        while b.gossip.stats().packets_dropped == before {
            assert!(
                Instant::now() < deadline,
                "garbage datagram #{sent} ({} bytes) not counted as dropped",
                datagram.len()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    // b still works: it still sees a and c, and still hears a's broadcasts.
    let keys = vec![key("after-the-garbage")];
    let _ = a.gossip.publish_hot(keys.clone());
    b.expect_event("Hot from a after the garbage", |event| {
        matches!(event, GossipEvent::Hot { node, keys: heard, .. } if node == "a" && *heard == keys)
    })
    .await;
    let members = b.gossip.members();
    assert!(is_up(&members, "a") && is_up(&members, "c"), "{members:?}");
}

#[tokio::test]
async fn start_refuses_a_config_that_cannot_work() {
    let (events, _rx) = mpsc::unbounded_channel();
    for (node, bind) in [
        ("", "127.0.0.1:0"),
        (&*"n".repeat(MAX_NODE_NAME_BYTES + 1), "127.0.0.1:0"),
        ("h1", "0.0.0.0:0"),
    ] {
        let error = Gossip::start(
            GossipConfig {
                node: node.into(),
                bind: bind.parse().unwrap(),
                seeds: Vec::new(),
            },
            events.clone(),
        )
        .err()
        .unwrap_or_else(|| panic!("{node:?} at {bind} was accepted"));
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
    }
}

#[test]
fn start_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let (events, _rx) = mpsc::unbounded_channel();
    let error = Gossip::start(
        GossipConfig {
            node: "h1".into(),
            bind: loopback(),
            seeds: Vec::new(),
        },
        events,
    )
    .err()
    .unwrap();
    assert!(error.to_string().contains("tokio runtime"), "{error}");
}

/// What the handler of a hand-driven foca has heard.
type HeardLog = Arc<Mutex<Vec<Heard>>>;

/// foca with our identity, codec and handler, driven by hand (sans-IO).
fn bare_foca(node: &str, port: u16) -> (FocaInstance, HeardLog) {
    let heard = Arc::new(Mutex::new(Vec::new()));
    let mut config = Config::new_lan(NonZeroU32::new(EXPECTED_CLUSTER_SIZE).unwrap());
    config.max_packet_size = std::num::NonZeroUsize::new(MAX_PACKET_BYTES).unwrap();
    let foca = Foca::with_custom_broadcast(
        NodeId::starting_now(node.into(), SocketAddr::from(([127, 0, 0, 1], port))),
        config,
        SmallRng::seed_from_u64(u64::from(port)),
        PostcardCodec,
        Handler::new(node.into(), heard.clone()),
    );
    (foca, heard)
}

/// Real packets of a two-member exchange (join, feed, probes, broadcasts)
/// that were addressed to `b`, as mutation seeds, and `b` itself: a member
/// that accepts them (foca ignores a payload addressed to another identity).
fn real_packets() -> (Vec<Vec<u8>>, FocaInstance, HeardLog) {
    let (mut a, _) = bare_foca("a", 1);
    let (mut b, heard) = bare_foca("b", 2);
    let mut runtime = AccumulatingRuntime::new();
    let mut packets = Vec::new();
    let mut in_flight: VecDeque<(NodeId, Vec<u8>)> = VecDeque::new();
    a.announce(b.identity().clone(), &mut runtime).unwrap();
    let (hot, _) = wire::encode_hot(
        &Origin {
            node: "a".into(),
            boot: a.identity().boot,
        },
        0,
        vec![key("x"), key("y")],
    );
    a.add_broadcast(&hot).unwrap();
    let want = wire::encode(&Item::Want {
        origin: Origin {
            node: "b".into(),
            boot: b.identity().boot,
        },
        seq: 0,
        key: key("z"),
    });
    b.add_broadcast(&want).unwrap();
    for round in 0..50 {
        while let Some((to, data)) = runtime.to_send() {
            in_flight.push_back((to, data.to_vec()));
        }
        while runtime.to_schedule().is_some() {}
        while runtime.to_notify().is_some() {}
        let Some((to, data)) = in_flight.pop_front() else {
            // Keep the exchange going: gossip and probes.
            let _ = a.gossip(&mut runtime);
            let _ = b.broadcast(&mut runtime);
            if round > 40 {
                break;
            }
            continue;
        };
        let _ = if to.addr == a.identity().addr {
            a.handle_data(&data, &mut runtime)
        } else {
            packets.push(data.clone());
            b.handle_data(&data, &mut runtime)
        };
    }
    assert!(packets.len() >= 4, "only {} packets", packets.len());
    (packets, b, heard)
}

#[test]
fn mutated_real_packets_never_panic_foca_or_the_handler() {
    let (seeds, mut victim, heard) = real_packets();
    let mut runtime = AccumulatingRuntime::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xf0ca);
    let mut refused = 0;
    for round in 0..20_000 {
        let mut packet = seeds[round % seeds.len()].clone();
        match rng.random_range(0..4) {
            // Flip a few bytes.
            0 => {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..packet.len());
                    packet[at] = rng.random();
                }
            }
            // Cut it short.
            1 => packet.truncate(rng.random_range(0..packet.len())),
            // Append junk.
            2 => packet.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
            // Splice two packets.
            _ => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let at = rng.random_range(0..packet.len());
                packet.truncate(at);
                packet.extend_from_slice(&other[rng.random_range(0..other.len())..]);
            }
        }
        if victim.handle_data(&packet, &mut runtime).is_err() {
            refused += 1;
        }
        while runtime.to_send().is_some() {}
        while runtime.to_schedule().is_some() {}
        while runtime.to_notify().is_some() {}
    }
    // Mutations mostly break packets; a test that refused nothing would
    // not have exercised the refusals.
    assert!(refused > 1_000, "only {refused} refused");
    // Whatever got through as news holds only valid lock keys.
    for news in heard.lock().unwrap().iter() {
        match news {
            Heard::Hot { keys, .. } => {
                for key in keys {
                    validate_key(key).unwrap();
                }
            }
            Heard::Want { key, .. } => validate_key(key).unwrap(),
        }
    }
}

#[test]
fn the_handle_can_be_shared_between_tasks() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Gossip>();
    shareable::<GossipEvent>();
}
