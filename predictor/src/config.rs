//! Forecaster configuration, read from TOML (`forelock-predictor --config FILE`).
//!
//! Every field has a default, so an empty file is a valid configuration:
//!
//! ```toml
//! horizon_ms = 500            # P(key requested within this horizon)
//! tick_ms = 10                # scores are recomputed this often
//! max_tracked_keys = 1048576  # bound on per-key state (see features.rs for eviction)
//! activity_window_ms = 30000  # keys idle longer than this are not scored (P taken as 0)
//! model = "online"            # "keep-alive" | "frequency" | "successor" | "logistic" | "hold-value" | "online"
//! keep_alive_ms = 500         # keep-alive model: prepared for this long after each use
//! frequency_scale = 2         # frequency model: index into the decay scales 50 ms, 500 ms, 5 s, 60 s
//! train_samples_per_tick = 64 # (key, tick) samples per tick, labelled as windows close: to learn (logistic, hold-value) and to score any model
//! learning_rate = 0.3         # logistic and hold-value models: AdaGrad step
//! top_k = 65536               # live binary: at most this many scores written per tick
//! min_probability = 0.01      # live binary: scores below this are not written
//! choice_window_ms = 60000    # online model: members are compared over about this much recent time
//! choice_hysteresis = 1.0     # online model: switch when the leader trails by this much discounted loss
//! choice_budget_slots = 0     # online model: the broker's slot budget (0: thresholds only)
//! score_threads = 1           # threads a tick scores on (large key sets only; the scores do not depend on it)
//! contention_max_keys = 4096  # bound on keys tracked for P(contended) (see contention.rs)
//! contention_window_ms = 30000 # time scale of each key's contention share
//! seed = 1                    # sampling is deterministic for a given seed
//! ```

use serde::Deserialize;

/// Which model of the ladder scores keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Prepared for `keep_alive_ms` after each use.
    KeepAlive,
    /// Poisson probability from a decayed request rate.
    Frequency,
    /// P(B within horizon | a client just took A), learnt per key pair.
    Successor,
    /// Online logistic regression over all features, trained as horizon windows close.
    Logistic,
    /// Per hold time, a logistic regression beside calibrated histograms; scores
    /// the best hits per slot-second.
    HoldValue,
    /// Every model above on the same stream, each scored prequentially on
    /// hits and waste; the scores follow the best now (the default; see
    /// `online.rs`).
    Online,
}

impl ModelKind {
    pub const ALL: [ModelKind; 6] = [
        ModelKind::KeepAlive,
        ModelKind::Frequency,
        ModelKind::Successor,
        ModelKind::Logistic,
        ModelKind::HoldValue,
        ModelKind::Online,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::KeepAlive => "keep-alive",
            ModelKind::Frequency => "frequency",
            ModelKind::Successor => "successor",
            ModelKind::Logistic => "logistic",
            ModelKind::HoldValue => "hold-value",
            ModelKind::Online => "online",
        }
    }

    pub fn from_name(name: &str) -> Option<ModelKind> {
        ModelKind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// The forecaster's settings. See the module docs for the TOML form.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PredictorConfig {
    pub horizon_ms: u64,
    pub tick_ms: u64,
    pub max_tracked_keys: usize,
    pub activity_window_ms: u64,
    pub model: ModelKind,
    pub keep_alive_ms: u64,
    pub frequency_scale: usize,
    pub train_samples_per_tick: usize,
    pub learning_rate: f32,
    pub top_k: usize,
    pub min_probability: f32,
    pub choice_window_ms: u64,
    pub choice_hysteresis: f32,
    pub choice_budget_slots: usize,
    pub score_threads: usize,
    pub contention_max_keys: usize,
    pub contention_window_ms: u64,
    pub seed: u64,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig {
            horizon_ms: 500,
            tick_ms: 10,
            max_tracked_keys: 1 << 20,
            activity_window_ms: 30_000,
            model: ModelKind::Online,
            keep_alive_ms: 500,
            frequency_scale: 2,
            train_samples_per_tick: 64,
            learning_rate: 0.3,
            top_k: 65_536,
            min_probability: 0.01,
            choice_window_ms: 60_000,
            choice_hysteresis: 1.0,
            choice_budget_slots: 0,
            score_threads: 1,
            contention_max_keys: 4096,
            contention_window_ms: 30_000,
            seed: 1,
        }
    }
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the predictor configuration is not valid TOML or has an unknown field: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("predictor configuration: {field} = {found} is out of range: {expected}")]
    Range {
        field: &'static str,
        found: String,
        expected: &'static str,
    },
}

impl PredictorConfig {
    /// Parses and validates a TOML configuration.
    pub fn from_toml(text: &str) -> Result<PredictorConfig, ConfigError> {
        let config: PredictorConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every bound the forecaster relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |field: &'static str, found: String, expected: &'static str| {
            Err(ConfigError::Range {
                field,
                found,
                expected,
            })
        };
        if self.horizon_ms == 0 || self.horizon_ms > 600_000 {
            return range("horizon_ms", self.horizon_ms.to_string(), "1..=600000");
        }
        if self.tick_ms == 0 || self.tick_ms > self.horizon_ms {
            return range("tick_ms", self.tick_ms.to_string(), "1..=horizon_ms");
        }
        if self.max_tracked_keys < 16 || self.max_tracked_keys > (1 << 26) {
            return range(
                "max_tracked_keys",
                self.max_tracked_keys.to_string(),
                "16..=67108864",
            );
        }
        // At most a day, as the contention window below (kept in microseconds).
        if self.activity_window_ms < self.horizon_ms || self.activity_window_ms > 86_400_000 {
            return range(
                "activity_window_ms",
                self.activity_window_ms.to_string(),
                "horizon_ms..=86400000",
            );
        }
        if self.frequency_scale >= crate::features::SCALES {
            return range("frequency_scale", self.frequency_scale.to_string(), "0..=3");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 10.0) {
            return range("learning_rate", self.learning_rate.to_string(), "(0, 10]");
        }
        if !(0.0..=1.0).contains(&self.min_probability) {
            return range(
                "min_probability",
                self.min_probability.to_string(),
                "[0, 1]",
            );
        }
        if self.choice_window_ms < self.tick_ms || self.choice_window_ms > 86_400_000 {
            return range(
                "choice_window_ms",
                self.choice_window_ms.to_string(),
                "tick_ms..=86400000",
            );
        }
        if !(0.0..=1e6).contains(&self.choice_hysteresis) {
            return range(
                "choice_hysteresis",
                self.choice_hysteresis.to_string(),
                "[0, 1e6]",
            );
        }
        if self.score_threads == 0 || self.score_threads > 64 {
            return range("score_threads", self.score_threads.to_string(), "1..=64");
        }
        if self.contention_max_keys == 0 || self.contention_max_keys > (1 << 20) {
            return range(
                "contention_max_keys",
                self.contention_max_keys.to_string(),
                "1..=1048576",
            );
        }
        // At most a day: the estimator works in microseconds (`contention()`
        // multiplies by 1000), and a share remembered longer follows nothing.
        if self.contention_window_ms < self.horizon_ms || self.contention_window_ms > 86_400_000 {
            return range(
                "contention_window_ms",
                self.contention_window_ms.to_string(),
                "horizon_ms..=86400000",
            );
        }
        if self.train_samples_per_tick > 65_536 {
            return range(
                "train_samples_per_tick",
                self.train_samples_per_tick.to_string(),
                "0..=65536",
            );
        }
        Ok(())
    }

    pub fn horizon_us(&self) -> u64 {
        self.horizon_ms * 1000
    }

    pub fn tick_us(&self) -> u64 {
        self.tick_ms * 1000
    }

    /// The contention estimator's settings.
    pub fn contention(&self) -> crate::contention::ContentionConfig {
        crate::contention::ContentionConfig {
            horizon_us: self.horizon_us(),
            window_us: self.contention_window_ms * 1000,
            max_keys: self.contention_max_keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(
            PredictorConfig::from_toml("").unwrap(),
            PredictorConfig::default()
        );
    }

    #[test]
    fn models_are_named_in_kebab_case() {
        let config =
            PredictorConfig::from_toml("model = \"keep-alive\"\nhorizon_ms = 200").unwrap();
        assert_eq!(config.model, ModelKind::KeepAlive);
        assert_eq!(config.horizon_us(), 200_000);
        for kind in ModelKind::ALL {
            assert_eq!(ModelKind::from_name(kind.name()), Some(kind));
        }
    }

    #[test]
    fn unknown_fields_and_bad_ranges_are_rejected() {
        assert!(matches!(
            PredictorConfig::from_toml("horizon = 5"),
            Err(ConfigError::Parse(_))
        ));
        let error = PredictorConfig::from_toml("tick_ms = 0").unwrap_err();
        assert!(error.to_string().contains("tick_ms"), "{error}");
    }

    #[test]
    fn a_contention_window_too_long_to_count_in_microseconds_is_rejected() {
        // 2^64 / 1000 ms: `contention()` would overflow converting it to us.
        let error =
            PredictorConfig::from_toml("contention_window_ms = 18446744073709552").unwrap_err();
        assert!(
            error.to_string().contains("contention_window_ms"),
            "{error}"
        );
        let longest = PredictorConfig::from_toml("contention_window_ms = 86400000").unwrap();
        assert_eq!(longest.contention().window_us, 86_400_000_000);
    }

    #[test]
    fn an_activity_window_too_long_to_count_in_microseconds_is_rejected() {
        let error =
            PredictorConfig::from_toml("activity_window_ms = 18446744073709552").unwrap_err();
        assert!(error.to_string().contains("activity_window_ms"), "{error}");
        PredictorConfig::from_toml("activity_window_ms = 86400000").unwrap();
    }
}
