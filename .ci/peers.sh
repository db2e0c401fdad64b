#!/usr/bin/env bash
# Installs the lock services that `forelock bench` compares forelock with:
# Redis 7 (Debian's redis-server) and etcd 3.4 (Debian's etcd-server).
# Run as root on a fresh Debian machine; non-interactive, idempotent.
# The services are NOT started here: the benchmark starts each server itself,
# on 127.0.0.1 with a temporary data directory, and stops it when done.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# Package names checked with `apt-cache policy` on Debian 12 (bookworm):
# redis-server 5:7.0.15, etcd-server 3.4.23.
PEER_PACKAGES=(redis-server etcd-server)

missing=()
for package in "${PEER_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "peers.sh: already installed: ${PEER_PACKAGES[*]}"
    exit 0
fi

apt-get update
# policy-rc.d 101 keeps the packages' post-install scripts from starting the
# services (there is no systemd in containers, and the bench starts its own).
policy_rc_created=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_rc_created=1
fi
trap '[ "$policy_rc_created" -eq 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y --no-install-recommends "${missing[@]}"

command -v redis-server >/dev/null
command -v etcd >/dev/null
echo "peers.sh: installed: ${missing[*]}"
