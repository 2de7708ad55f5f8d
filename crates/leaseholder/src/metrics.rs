//! Metrics (feature `metrics`), reported through the
//! [`metrics`](https://docs.rs/metrics) facade: install the exporter you
//! use (Prometheus, StatsD, …) as the global recorder, and every `Leader`
//! reports to it. Without a recorder the calls cost next to nothing.
//!
//! Every metric has the label `key` (the election's key).
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `leaseholder_is_leader` | gauge | `key` | 1 while this process leads the key, else 0 |
//! | `leaseholder_terms_total` | counter | `key` | terms won |
//! | `leaseholder_terms_ended_total` | counter | `key`, `cause` | terms ended, by cause: `deadline` (no renewal confirmed in time), `lost` (the store says the lease is gone), `work_done`, `resign`, `shutdown`, `store_error` |
//! | `leaseholder_renew_seconds` | histogram | `key` | latency of confirmed renewals |
//! | `leaseholder_deadline_slack_seconds` | histogram | `key` | time left before the deadline when a renewal was confirmed |
//! | `leaseholder_deadline_slack_min_seconds` | gauge | `key` | the smallest such slack in the current term: how close the leader came to losing it |
//! | `leaseholder_store_errors_total` | counter | `key`, `op`, `kind` | failed store calls, by operation (`setup`, `acquire`, `renew`, `release`, `holder`) and kind (`unavailable`, `timeout`, `unsupported`, `misconfigured`, `denied`, `fatal`) |
//!
//! A `deadline` end or a small minimum slack means renewals are too slow
//! for the ttl: raise the ttl, or look at the store's latency.

/// Gauge: 1 while this process leads `key`.
pub const IS_LEADER: &str = "leaseholder_is_leader";
/// Counter: terms won.
pub const TERMS: &str = "leaseholder_terms_total";
/// Counter: terms ended, by `cause`.
pub const TERMS_ENDED: &str = "leaseholder_terms_ended_total";
/// Histogram: seconds a confirmed renewal took.
pub const RENEW_SECONDS: &str = "leaseholder_renew_seconds";
/// Histogram: seconds left before the deadline when a renewal was confirmed.
pub const DEADLINE_SLACK: &str = "leaseholder_deadline_slack_seconds";
/// Gauge: the smallest slack in the current term, in seconds.
pub const DEADLINE_SLACK_MIN: &str = "leaseholder_deadline_slack_min_seconds";
/// Counter: failed store calls, by `op` and `kind`.
pub const STORE_ERRORS: &str = "leaseholder_store_errors_total";
