#!/bin/bash
# Three "hosts" on one machine, each with its own forelockd, against a
# three-member etcd: global keys taken from every host, one holder at a time,
# with strictly increasing fencing tokens. The walkthrough of docs/cluster.md
# ("Try it: three hosts on one machine"); tools/tests/three_hosts.rs runs it.
#
#   sudo tools/three-hosts.sh [BIN_DIR]
#
# BIN_DIR holds `forelockd` and `forelock` (default: target/release; build
# them with `cargo build --release -p forelockd -p forelock-tools`). Needs
# root (network namespaces), iproute2, etcd-server and etcd-client (Debian's
# packages; .ci/install.sh installs them). Everything it makes (a bridge, six
# namespaces, the etcd members and brokers, a directory in /dev/shm) is
# removed when it exits, on an error too.
#
# Environment: FORELOCK_DEMO_NET (default 10.77.0), the /24 the namespaces
# use; FORELOCK_DEMO_ROUNDS (default 5), the locks each host takes.
set -euo pipefail

BIN=$(realpath "${1:-target/release}")
NET=${FORELOCK_DEMO_NET:-10.77.0}
ROUNDS=${FORELOCK_DEMO_ROUNDS:-5}
TAG=fl3h$$ # names unique to this run (a veth name has at most 15 bytes)
for tool in "$BIN/forelockd" "$BIN/forelock"; do
    [ -x "$tool" ] || { echo "three-hosts: $tool is missing: build it (see the top of $0)" >&2; exit 2; }
done
for tool in ip etcd etcdctl; do
    command -v "$tool" >/dev/null || { echo "three-hosts: $tool is not installed (apt-get install iproute2 etcd-server etcd-client)" >&2; exit 2; }
done

WORK=$(mktemp -d /dev/shm/forelock-three-hosts.XXXXXX)
PIDS=()
cleanup() {
    trap '' TERM INT # a second signal must not cut the clean-up short
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in e1 e2 e3 h1 h2 h3; do ip netns del "$TAG-$n" 2>/dev/null || true; done
    ip link del "${TAG}br" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM INT # so that the EXIT trap cleans up after a signal too

# 1. The network: a bridge, and a namespace per etcd member (e1-e3 at .11-.13)
#    and per host (h1-h3 at .1-.3), each with a veth on the bridge.
ip link add "${TAG}br" type bridge
ip link set "${TAG}br" up
declare -A ADDR=([e1]=11 [e2]=12 [e3]=13 [h1]=1 [h2]=2 [h3]=3)
for n in e1 e2 e3 h1 h2 h3; do
    ip netns add "$TAG-$n"
    ip link add "$TAG$n" type veth peer name eth0 netns "$TAG-$n"
    ip link set "$TAG$n" master "${TAG}br" up
    ip -n "$TAG-$n" addr add "$NET.${ADDR[$n]}/24" dev eth0
    ip -n "$TAG-$n" link set eth0 up
    ip -n "$TAG-$n" link set lo up
done

# 2. etcd: three members, elections at 10x the heartbeat (a loaded machine
#    pauses; shorter timeouts elect leaders for nothing).
CLUSTER="e1=http://$NET.11:2380,e2=http://$NET.12:2380,e3=http://$NET.13:2380"
ENDPOINTS="http://$NET.11:2379,http://$NET.12:2379,http://$NET.13:2379"
for m in e1 e2 e3; do
    ip=$NET.${ADDR[$m]}
    ip netns exec "$TAG-$m" etcd --name "$m" --data-dir "$WORK/$m" \
        --listen-peer-urls "http://$ip:2380" --initial-advertise-peer-urls "http://$ip:2380" \
        --listen-client-urls "http://$ip:2379" --advertise-client-urls "http://$ip:2379" \
        --initial-cluster "$CLUSTER" --initial-cluster-state new \
        --heartbeat-interval 150 --election-timeout 1500 >"$WORK/$m.log" 2>&1 &
    PIDS+=($!)
done
for _ in $(seq 60); do
    if ETCDCTL_API=3 ip netns exec "$TAG-h1" etcdctl --endpoints "$ENDPOINTS" \
        --command-timeout 2s endpoint health >/dev/null 2>&1; then
        break
    fi
    sleep 0.5
done
ETCDCTL_API=3 ip netns exec "$TAG-h1" etcdctl --endpoints "$ENDPOINTS" endpoint health

# 3. A broker per host: its own runtime directory and a [cluster] section;
#    the same etcd, etcd_prefix and key prefix everywhere, gossip between them.
for h in h1 h2 h3; do
    mkdir -p "$WORK/$h"
    seeds=$(for o in h1 h2 h3; do [ "$o" = "$h" ] || printf '"%s:7946",' "$NET.${ADDR[$o]}"; done)
    cat >"$WORK/$h/forelockd.toml" <<EOF
[cluster]
node = "$h"
etcd = ["http://$NET.11:2379", "http://$NET.12:2379", "http://$NET.13:2379"]
etcd_prefix = "/forelock-demo"
gossip_addr = "$NET.${ADDR[$h]}:7946"
seeds = [${seeds%,}]
EOF
    ip netns exec "$TAG-$h" "$BIN/forelockd" --config "$WORK/$h/forelockd.toml" \
        --runtime-dir "$WORK/$h" >"$WORK/$h/forelockd.log" 2>&1 &
    PIDS+=($!)
done
# Ready when `forelock status` shows a lease it may grant under.
for h in h1 h2 h3; do
    for _ in $(seq 60); do
        FORELOCK_RUNTIME_DIR=$WORK/$h "$BIN/forelock" status 2>/dev/null | grep -q "safe for" && break
        sleep 0.5
    done
    FORELOCK_RUNTIME_DIR=$WORK/$h "$BIN/forelock" status | grep "cluster:" ||
        { cat "$WORK/$h/forelockd.log" >&2; exit 1; }
done

# 4. Every host at once, ROUNDS times each: take global/demo, and while
#    holding it append "host token" to a file all hosts share. The lines are
#    in the order the holds came: with one holder at a time their tokens
#    strictly increase.
LEDGER=$WORK/ledger
: >"$LEDGER"
LOOPS=()
for h in h1 h2 h3; do
    (
        for _ in $(seq "$ROUNDS"); do
            FORELOCK_RUNTIME_DIR=$WORK/$h ip netns exec "$TAG-$h" "$BIN/forelock" run -w 30 global/demo -- \
                sh -c "echo $h \$FORELOCK_TOKEN >>'$LEDGER'"
        done
    ) &
    LOOPS+=($!)
done
wait "${LOOPS[@]}"

echo "global/demo, in the order the holds came (host, token):"
cat "$LEDGER"
FORELOCK_RUNTIME_DIR=$WORK/h1 "$BIN/forelock" status | sed -n '/^cluster:/,$p'
awk -v want=$((3 * ROUNDS)) '
    { if (NR > 1 && $2 <= last) { print "token " $2 " of " $1 " after " last ": NOT increasing"; bad = 1 }
      last = $2; hosts[$1]++ }
    END { n = 0; for (h in hosts) n++
          if (NR != want) { print NR " holds, expected " want; bad = 1 }
          if (n != 3) { print "only " n " hosts held the key"; bad = 1 }
          if (!bad) print "tokens strictly increasing across " NR " holds from " n " hosts"
          exit bad }' "$LEDGER"
