#!/usr/bin/env bash
# Installs the Debian packages the project needs on a fresh machine (root).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# fonts-dejavu-core: text in the PNG plots (tools); systemd: systemd-analyze
# verify of the unit files; g++: libFuzzer, which cargo-fuzz's libfuzzer-sys
# compiles from C++ (.ci/fuzz.sh).
apt-get install -y -q --no-install-recommends fonts-dejavu-core systemd g++
# Peers for `forelock bench` (Redis, etcd), if the peer script is present.
if [ -f .ci/peers.sh ]; then
    bash .ci/peers.sh
fi
