//! What a backend knows of its server's clock (PostgreSQL, Redis): enough
//! to tell the server "do this only if your clock is still before the
//! leader's deadline".

use tokio::time::Instant;

/// What we know of the server's clock: a lower bound on its offset from
/// ours, from the last reply that carried the server's time.
///
/// A reply to a request sent at local time `s` and received at `r` that
/// says the server's clock read `t` proves the server read its clock no
/// later than `r`, so `offset >= t - r`. A leader's deadline `d` on our
/// clock is then at least `d + (t - r)` on the server's: a renewal the
/// server performs before that is performed before `d` (clocks running at
/// the same rate, which the drift margin covers).
#[derive(Default)]
pub(crate) struct ServerClock {
    /// `t - r` in µs, `r` measured from `base`.
    offset_min_us: std::sync::Mutex<Option<i128>>,
    base: std::sync::OnceLock<Instant>,
}

impl ServerClock {
    fn local_us(&self, at: Instant) -> i128 {
        let base = *self.base.get_or_init(Instant::now);
        i128::try_from(at.saturating_duration_since(base).as_micros()).unwrap_or(i128::MAX)
    }

    /// Records that the server's clock read `server_us` at or before
    /// `received`. The newest sample wins, so a server clock stepped back
    /// is picked up at once.
    pub(crate) fn sample(&self, server_us: i64, received: Instant) {
        let offset = i128::from(server_us) - self.local_us(received);
        *self
            .offset_min_us
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(offset);
    }

    /// `deadline` on the server's clock, early rather than late; `None`
    /// before the first sample.
    pub(crate) fn server_deadline_us(&self, deadline: Instant) -> Option<i64> {
        let offset = (*self
            .offset_min_us
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))?;
        i64::try_from(self.local_us(deadline) + offset).ok()
    }
}
