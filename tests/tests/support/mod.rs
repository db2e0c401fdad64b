//! Test support: spawning brokers and clients. See tests/tests/*.rs.
