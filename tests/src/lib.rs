//! forelock's integration tests start real processes: `forelockd` (built from
//! the broker's own `main.rs` as the `forelockd-under-test` binary) and
//! `fl-worker` client processes, and `forelock-predictor-under-test` (the
//! forecaster from its own `main.rs`). The tests are in `tests/tests/`, their
//! support code in `tests/tests/support/`.
