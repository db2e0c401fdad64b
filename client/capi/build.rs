//! Generates the C header from `src/lib.rs` with cbindgen into `OUT_DIR`.
//! The checked-in `include/forelock.h` is compared with it by
//! `tests/header.rs`; with `FORELOCK_CAPI_BLESS=1` the build rewrites the
//! checked-in header instead.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("forelock.h");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=FORELOCK_CAPI_BLESS");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("client/capi/cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates forelock.h from src/lib.rs");
    bindings.write_to_file(&out);
    if std::env::var_os("FORELOCK_CAPI_BLESS").is_some() {
        bindings.write_to_file(crate_dir.join("include/forelock.h"));
    }
}
