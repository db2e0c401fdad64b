//! The checked-in `include/forelock.h` is what cbindgen makes of the code.

#[test]
fn the_checked_in_header_matches_the_code() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/forelock.h"));
    let checked_in = include_str!("../include/forelock.h");
    assert!(
        generated == checked_in,
        "client/capi/include/forelock.h is stale: run \
         `FORELOCK_CAPI_BLESS=1 cargo build -p forelock-capi` and commit it"
    );
}
