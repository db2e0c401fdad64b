//! forelock's integration tests start real processes: `forelockd` (built from
//! the broker's own `main.rs` as the `forelockd-under-test` binary) and
//! `fl-worker` client processes. The tests are in `tests/tests/`, their
//! support code in `tests/tests/support/`.
