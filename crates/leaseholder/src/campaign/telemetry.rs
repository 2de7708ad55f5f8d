//! What the campaign reports through the `metrics` facade (feature
//! `metrics`); without the feature every call compiles to nothing.
//!
//! The names and labels are listed in [`crate::metrics`].

use std::time::Duration;

use super::core::EndReason;
use crate::backend::Key;
use crate::error::BackendError;

/// Which store call an error or a latency belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    Setup,
    Acquire,
    Renew,
    Release,
    Holder,
    Candidates,
}

impl Call {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn label(self) -> &'static str {
        match self {
            Call::Setup => "setup",
            Call::Acquire => "acquire",
            Call::Renew => "renew",
            Call::Release => "release",
            Call::Holder => "holder",
            Call::Candidates => "candidates",
        }
    }
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
fn cause(reason: EndReason) -> &'static str {
    match reason {
        EndReason::Deadline => "deadline",
        EndReason::Lost => "lost",
        EndReason::WorkDone => "work_done",
        EndReason::Resign => "resign",
        EndReason::Preempted => "preempted",
        EndReason::Shutdown => "shutdown",
        EndReason::Fatal => "store_error",
    }
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
fn kind(e: &BackendError) -> &'static str {
    match e {
        BackendError::Unavailable(_) => "unavailable",
        BackendError::Timeout(_) => "timeout",
        BackendError::Unsupported { .. } => "unsupported",
        BackendError::Misconfigured { .. } => "misconfigured",
        BackendError::Denied(_) => "denied",
        BackendError::Fatal(_) => "fatal",
        BackendError::Panicked { .. } => "panicked",
    }
}

/// One campaign's instruments.
pub(crate) struct Telemetry {
    #[cfg(feature = "metrics")]
    key: metrics::SharedString,
    /// The smallest slack seen in the current term.
    min_slack: Option<Duration>,
}

impl Telemetry {
    pub(crate) fn new(key: &Key) -> Telemetry {
        #[cfg(not(feature = "metrics"))]
        let _ = key;
        Telemetry {
            #[cfg(feature = "metrics")]
            key: metrics::SharedString::from(key.as_str().to_owned()),
            min_slack: None,
        }
    }

    /// A term began: this candidate leads.
    pub(crate) fn term_began(&mut self) {
        self.min_slack = None;
        #[cfg(feature = "metrics")]
        {
            use crate::metrics::{IS_LEADER, TERMS};
            metrics::gauge!(IS_LEADER, "key" => self.key.clone()).set(1.0);
            metrics::counter!(TERMS, "key" => self.key.clone()).increment(1);
        }
    }

    /// The term's token was cancelled, for `reason`.
    pub(crate) fn term_ended(&mut self, reason: EndReason) {
        #[cfg(not(feature = "metrics"))]
        let _ = reason;
        #[cfg(feature = "metrics")]
        {
            use crate::metrics::{IS_LEADER, TERMS_ENDED};
            metrics::gauge!(IS_LEADER, "key" => self.key.clone()).set(0.0);
            metrics::counter!(TERMS_ENDED, "key" => self.key.clone(), "cause" => cause(reason))
                .increment(1);
        }
    }

    /// A renewal was confirmed (after `latency`, if its own reply said so;
    /// `None` when a read-back confirmed it), with `slack` left before the
    /// deadline it replaced.
    pub(crate) fn renewed(&mut self, latency: Option<Duration>, slack: Duration) {
        let min = self.min_slack.map_or(slack, |m| m.min(slack));
        self.min_slack = Some(min);
        #[cfg(not(feature = "metrics"))]
        let _ = latency;
        #[cfg(feature = "metrics")]
        {
            use crate::metrics::{DEADLINE_SLACK, DEADLINE_SLACK_MIN, RENEW_SECONDS};
            if let Some(latency) = latency {
                metrics::histogram!(RENEW_SECONDS, "key" => self.key.clone())
                    .record(latency.as_secs_f64());
            }
            metrics::histogram!(DEADLINE_SLACK, "key" => self.key.clone())
                .record(slack.as_secs_f64());
            metrics::gauge!(DEADLINE_SLACK_MIN, "key" => self.key.clone()).set(min.as_secs_f64());
        }
    }

    /// A store call failed.
    pub(crate) fn store_error(&self, call: Call, error: &BackendError) {
        #[cfg(not(feature = "metrics"))]
        let _ = (call, error);
        #[cfg(feature = "metrics")]
        {
            use crate::metrics::STORE_ERRORS;
            metrics::counter!(
                STORE_ERRORS,
                "key" => self.key.clone(),
                "op" => call.label(),
                "kind" => kind(error)
            )
            .increment(1);
        }
    }

    /// The campaign stopped.
    pub(crate) fn stopped(&self) {
        #[cfg(feature = "metrics")]
        {
            use crate::metrics::IS_LEADER;
            metrics::gauge!(IS_LEADER, "key" => self.key.clone()).set(0.0);
        }
    }
}
