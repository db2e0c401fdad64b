//! Hosts as network namespaces on one bridge, and the faults made inside
//! them with nftables and links set down (this kernel has no netem).

use super::run;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::io::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Serializes the cluster tests of one process: each builds six namespaces
/// and starts etcd; two at once on 2 cores only make both flaky.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Instances made by this process, for unique names.
static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// The members every [`Net`] has: etcd members `e1..e3` (addresses .11-.13)
/// and hosts `h1..h3` (.1-.3).
pub const ETCD_MEMBERS: [&str; 3] = ["e1", "e2", "e3"];
pub const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

/// One namespace on the bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// `e1`, `h2`, ...
    pub name: String,
    /// The namespace (`ip netns` name).
    pub ns: String,
    /// The bridge side of its veth (in the root namespace).
    pub veth: String,
    pub addr: Ipv4Addr,
}

/// Which packets a fault drops, seen from the namespace it is made in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Packets arriving (`input` hook).
    In,
    /// Packets leaving (`output` hook).
    Out,
    Both,
}

impl Direction {
    fn chains(self) -> &'static [&'static str] {
        match self {
            Direction::In => &["in"],
            Direction::Out => &["out"],
            Direction::Both => &["in", "out"],
        }
    }
}

/// A bridge and six namespaces; all removed on drop.
pub struct Net {
    /// Prefix of every name this instance makes.
    pub prefix: String,
    pub bridge: String,
    /// The /24 the members live in (never leaves the bridge: the bridge
    /// itself has no address in the root namespace).
    pub subnet: [u8; 3],
    pub members: Vec<Member>,
    bridge_made: bool,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Net {
    /// Make the bridge and the namespaces, or say why not. Takes the
    /// process-wide cluster lock for the instance's life.
    pub fn new() -> Result<Net, String> {
        if let Some(why) = super::unavailable() {
            return Err(why);
        }
        let guard = ONE_CLUSTER_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let pid = std::process::id();
        let counter = INSTANCES.fetch_add(1, Ordering::Relaxed) % 256;
        // Interface names have at most 15 bytes: "f" + pid (at most 7
        // digits) + 2 hex digits + "br" or a member name is at most 12.
        let prefix = format!("f{pid}{counter:02x}");
        let mut net = Net {
            bridge: format!("{prefix}br"),
            subnet: [10, 100 + (counter % 100) as u8, (pid % 256) as u8],
            prefix,
            members: Vec::new(),
            bridge_made: false,
            _one_at_a_time: guard,
        };
        // On an error, `net` is dropped and removes what was made.
        net.build()?;
        Ok(net)
    }

    fn build(&mut self) -> Result<(), String> {
        run(Command::new("ip").args(["link", "add", &self.bridge, "type", "bridge"]))?;
        self.bridge_made = true;
        run(Command::new("ip").args(["link", "set", &self.bridge, "up"]))?;
        let names = ETCD_MEMBERS.iter().chain(HOSTS.iter());
        for name in names {
            let last = match name.as_bytes() {
                [b'e', n] => 10 + (n - b'0'),
                [b'h', n] => n - b'0',
                _ => unreachable!(),
            };
            let [a, b, c] = self.subnet;
            let member = Member {
                name: name.to_string(),
                ns: format!("{}-{name}", self.prefix),
                veth: format!("{}{name}", self.prefix),
                addr: Ipv4Addr::new(a, b, c, last),
            };
            run(Command::new("ip").args(["netns", "add", &member.ns]))
                .map_err(|e| format!("cannot make a network namespace: {e}"))?;
            self.members.push(member.clone());
            let m = &member;
            run(Command::new("ip").args([
                "link", "add", &m.veth, "type", "veth", "peer", "name", "eth0", "netns", &m.ns,
            ]))?;
            run(Command::new("ip").args(["link", "set", &m.veth, "master", &self.bridge]))?;
            run(Command::new("ip").args(["link", "set", &m.veth, "up"]))?;
            let cidr = format!("{}/24", m.addr);
            run(Command::new("ip").args(["-n", &m.ns, "addr", "add", &cidr, "dev", "eth0"]))?;
            run(Command::new("ip").args(["-n", &m.ns, "link", "set", "eth0", "up"]))?;
            run(Command::new("ip").args(["-n", &m.ns, "link", "set", "lo", "up"]))?;
        }
        Ok(())
    }

    /// The member called `name` (`e1`..`e3`, `h1`..`h3`).
    pub fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    pub fn etcd_members(&self) -> Vec<Member> {
        ETCD_MEMBERS
            .iter()
            .map(|n| self.member(n).clone())
            .collect()
    }

    /// A command run inside `member`'s namespace (`ip netns exec`, which
    /// execs it in the same process).
    pub fn command(&self, member: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.member(member).ns, program]);
        c
    }

    /// `nft` in `member`'s namespace; panics with the error.
    fn nft(&self, member: &str, args: &[&str]) {
        let mut c = self.command(member, "nft");
        c.args(args);
        if let Err(e) = run(&mut c) {
            panic!("nftables in {member}: {e}");
        }
    }

    /// The table `inet nemesis` in `member`'s namespace, with an input and an
    /// output chain (idempotent).
    fn nemesis(&self, member: &str) {
        self.nft(member, &["add", "table", "inet", "nemesis"]);
        for (chain, hook) in [("in", "input"), ("out", "output")] {
            let spec = format!(
                "add chain inet nemesis {chain} {{ type filter hook {hook} priority 0; policy accept; }}"
            );
            self.nft(member, &[&spec]);
        }
    }

    /// Drop `member`'s packets to and from each of `peers` (names), in
    /// `direction`.
    pub fn partition(&self, member: &str, peers: &[&str], direction: Direction) {
        self.nemesis(member);
        for peer in peers {
            let addr = self.member(peer).addr.to_string();
            for chain in direction.chains() {
                let field = if *chain == "in" { "saddr" } else { "daddr" };
                self.nft(
                    member,
                    &[
                        "add", "rule", "inet", "nemesis", chain, "ip", field, &addr, "counter",
                        "drop",
                    ],
                );
            }
        }
    }

    /// Cut `member` off from the three etcd members.
    pub fn partition_from_etcd(&self, member: &str, direction: Direction) {
        self.partition(member, &ETCD_MEMBERS, direction);
    }

    /// Cut host `member` off from the other hosts only (etcd stays reachable).
    pub fn partition_from_peers(&self, member: &str, direction: Direction) {
        let peers: Vec<&str> = HOSTS.iter().copied().filter(|h| *h != member).collect();
        self.partition(member, &peers, direction);
    }

    /// Drop `percent`% of `member`'s packets at random, in `direction`
    /// (each direction on its own: `Both` at 30% loses about half the round
    /// trips).
    pub fn loss(&self, member: &str, percent: u32, direction: Direction) {
        assert!(percent <= 100);
        self.nemesis(member);
        let rule = format!("numgen random mod 100 < {percent} counter drop");
        for chain in direction.chains() {
            let spec = format!("add rule inet nemesis {chain} {rule}");
            self.nft(member, &[&spec]);
        }
    }

    /// Packets dropped so far by `member`'s fault rules, (in, out).
    pub fn dropped(&self, member: &str) -> (u64, u64) {
        let mut c = self.command(member, "nft");
        c.args(["list", "table", "inet", "nemesis"]);
        let Ok(out) = run(&mut c) else {
            return (0, 0);
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (mut counts, mut chain) = ((0, 0), "");
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("chain ") {
                chain = if rest.starts_with("in") { "in" } else { "out" };
            }
            if let Some(i) = line.find("counter packets ") {
                let n: u64 = line[i + 16..]
                    .split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                if chain == "in" {
                    counts.0 += n;
                } else {
                    counts.1 += n;
                }
            }
        }
        counts
    }

    /// Remove every nftables fault from `member` (no-op without one).
    pub fn heal(&self, member: &str) {
        let mut c = self.command(member, "nft");
        c.args(["delete", "table", "inet", "nemesis"]);
        let _ = c.output();
    }

    /// Set `member`'s link down (isolation) or back up.
    pub fn set_link(&self, member: &str, up: bool) {
        let veth = self.member(member).veth.clone();
        let state = if up { "up" } else { "down" };
        if let Err(e) = run(Command::new("ip").args(["link", "set", &veth, state])) {
            panic!("link {state} {member}: {e}");
        }
    }

    /// A UDP socket bound to `addr` inside `member`'s namespace. (A socket
    /// stays in the namespace it was made in, whichever thread uses it.)
    pub fn udp_socket_in(&self, member: &str, addr: SocketAddr) -> std::io::Result<UdpSocket> {
        let path = format!("/run/netns/{}", self.member(member).ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path)?;
                // SAFETY:
                // - `ns` is an open namespace file for the whole call;
                // - setns(CLONE_NEWNET) changes this thread's network
                //   namespace only, and this thread ends when the closure
                //   returns: no other code runs in the namespace by mistake.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                UdpSocket::bind(addr)
            })
            .join()
            .expect("setns thread")
        })
    }

    /// Send `count` UDP probes from `from` to an echo responder in `to`
    /// (ping without ping): how many came back, each waited for at most
    /// `wait`.
    pub fn probe(&self, from: &str, to: &str, count: u32, wait: Duration) -> u32 {
        let to_addr = SocketAddr::from((self.member(to).addr, 7));
        let from_addr = SocketAddr::from((self.member(from).addr, 0));
        let echo = self.udp_socket_in(to, to_addr).expect("echo socket");
        let sender = self.udp_socket_in(from, from_addr).expect("probe socket");
        echo.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = echo.recv_from(&mut buf) {
                        let _ = echo.send_to(&buf[..n], peer);
                    }
                }
            });
            sender.connect(to_addr).unwrap();
            let mut back = 0;
            for i in 0..count {
                let _ = sender.send(&i.to_be_bytes());
                let deadline = Instant::now() + wait;
                let mut buf = [0u8; 64];
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    sender
                        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                        .unwrap();
                    match sender.recv(&mut buf) {
                        Ok(4) if buf[..4] == i.to_be_bytes() => {
                            back += 1;
                            break;
                        }
                        Ok(_) => continue, // a late echo of an earlier probe
                        Err(_) => break,
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            back
        })
    }

    /// Kill every process left in a namespace (they are the harness's own:
    /// nothing else runs in these namespaces).
    fn kill_leftovers(&self, member: &Member) {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &member.ns])
            .output()
        else {
            return;
        };
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill has no memory preconditions; `pid` is a process
            // in a namespace this instance made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for m in &self.members {
            self.kill_leftovers(m);
        }
        for m in &self.members {
            // A process killed an instant ago may still pin the namespace
            // for a moment; `ip netns del` unmounts it regardless.
            let _ = Command::new("ip").args(["netns", "del", &m.ns]).output();
        }
        if self.bridge_made {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge])
                .output();
        }
    }
}
