//! The chaos harness (`chaos` binary): see `src/bin/chaos.rs`.

pub(crate) mod candidate;
pub(crate) mod check;
pub(crate) mod harness;
pub(crate) mod report;
pub(crate) mod rng;
