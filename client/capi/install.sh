#!/usr/bin/env bash
# Build the C ABI in release mode and install libforelock_capi.{so,a},
# forelock.h and forelock.pc under PREFIX (default /usr/local):
#   bash client/capi/install.sh [PREFIX]
# then: cc app.c $(pkg-config --cflags --libs forelock)
set -euo pipefail
cd "$(dirname "$0")"
prefix=${1:-/usr/local}
libdir=$prefix/lib
includedir=$prefix/include
target=${CARGO_TARGET_DIR:-../../target}
cargo build --release -p forelock-capi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' ../../Cargo.toml | head -1)
install -d "$libdir/pkgconfig" "$includedir"
install -m 0755 "$target/release/libforelock_capi.so" "$libdir/"
install -m 0644 "$target/release/libforelock_capi.a" "$libdir/"
install -m 0644 include/forelock.h "$includedir/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@LIBDIR@|$libdir|" -e "s|@INCLUDEDIR@|$includedir|" \
    -e "s|@VERSION@|$version|" forelock.pc.in > "$libdir/pkgconfig/forelock.pc"
echo "installed forelock's C ABI under $prefix (pkg-config: $libdir/pkgconfig)"
