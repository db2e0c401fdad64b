#!/usr/bin/env bash
# Installs the Debian packages the project needs on a fresh machine (root).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# fonts-dejavu-core: text in the PNG plots (tools); systemd: systemd-analyze
# verify of the unit files; g++: libFuzzer, which cargo-fuzz's libfuzzer-sys
# compiles from C++ (.ci/fuzz.sh).
apt-get install -y -q --no-install-recommends fonts-dejavu-core systemd g++
# gcc, libc6-dev, pkg-config: the C ABI's tests compile C programs against
# libforelock_capi with the flags of forelock.pc (tools/tests/languages.rs).
apt-get install -y -q --no-install-recommends gcc libc6-dev pkg-config
# protobuf-compiler: etcd-client (the cluster agent, broker/cluster) compiles
# etcd's .proto files at build time; libprotobuf-dev: the well-known types
# they import (google/protobuf/descriptor.proto, struct.proto), which
# protobuf-compiler only recommends, so --no-install-recommends leaves out.
# iproute2, nftables, faketime and etcdctl (etcd-client): the multi-host
# tests make hosts of network namespaces, cut links with nftables and jump
# wall clocks with libfaketime (docs/cluster.md); util-linux: setpriv, which
# ties each test host's processes to the test's life (--pdeathsig); openssl:
# tests/tests/etcd_tls.rs makes the CA and certificates of an etcd that asks
# for TLS. etcd-server itself comes with the peers below.
apt-get install -y -q --no-install-recommends protobuf-compiler libprotobuf-dev iproute2 nftables faketime etcd-client util-linux openssl
# maturin builds the Python package (client/python), pytest runs its tests;
# filelock is the Python peer of the language benchmark. Into the machine's
# Python 3.11 (a throwaway CI machine: no venv needed).
python3 -m pip install -q --root-user-action=ignore --break-system-packages \
    'maturin>=1.8,<2' pytest filelock 2>/dev/null \
    || python3 -m pip install -q 'maturin>=1.8,<2' pytest filelock
# Peers for `forelock bench` (Redis, etcd), if the peer script is present.
if [ -f .ci/peers.sh ]; then
    bash .ci/peers.sh
fi
