//! The forelock forecaster: access events in, per-key P(requested within the
//! horizon) out.
//!
//! The live process `forelock-predictor` and the offline `forelock replay` use
//! the same code: [`trace`] reads recorded lock traces, [`features`] keeps
//! per-key multi-scale features in ndarray arrays over a bounded key set,
//! [`models`] is the ladder of models (keep-alive, decayed frequency, successor
//! table, online logistic regression, hold value: the best hits per slot-second
//! over several hold times), [`online`] runs them all and follows the best
//! now (the default), writing its scores through the leader's
//! [`calibration`], and [`forecaster`] ties them together
//! and trains the learned model as each horizon window closes. [`contention`]
//! estimates, apart from all that, P(a key is contended within the horizon).
//!
//! ```
//! use forelock_predictor::{config::{ModelKind, PredictorConfig}, forecaster::Forecaster, key_hash};
//!
//! let config = PredictorConfig { model: ModelKind::Frequency, ..PredictorConfig::default() };
//! let mut forecaster = Forecaster::new(config);
//! for i in 0..20 {
//!     forecaster.ingest(i * 100_000, 0, key_hash(b"orders:1"));
//! }
//! forecaster.tick(2_000_000);
//! let p = forecaster.probability_of(key_hash(b"orders:1")).unwrap();
//! assert!(p > 0.5, "a key requested every 100 ms is likely within 500 ms");
//! ```

pub mod calibration;
pub mod config;
pub mod contention;
pub mod fastmath;
pub mod features;
pub mod forecaster;
pub mod models;
pub mod online;
pub mod simulated_allocator;
pub mod trace;

/// The 64-bit hash that names a key everywhere in forelock (xxh3-64 of its
/// bytes): the table format's own function, re-exported.
pub use shm_layout::key_hash;
