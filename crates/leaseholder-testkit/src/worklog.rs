//! A record of when each candidate's work ran, checked against the safety
//! property: no two work intervals overlap, and each term's fencing token is
//! larger than every earlier one.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;
use tokio::time::Instant;

/// One term's work: who ran it, with which token, from when until when.
#[derive(Clone, Debug)]
pub struct Interval {
    /// The candidate, as the test names it.
    pub who: String,
    /// The term's fencing token.
    pub token: u64,
    /// When the work started.
    pub start: Instant,
    /// When the work returned or was dropped; `None` while it runs.
    pub end: Option<Instant>,
}

/// Work intervals shared by every candidate of a test (cheap to clone).
///
/// The work calls [`begin`](Self::begin) first thing and keeps the returned
/// [`WorkGuard`] until it returns; the guard records the end when it is
/// dropped, so work that is aborted (dropped mid-`.await`) is recorded too.
/// The times are taken inside the work, so scheduling delays can only make
/// an interval look longer, never hide an overlap.
#[derive(Clone, Debug, Default)]
pub struct WorkLog {
    intervals: Arc<Mutex<Vec<Interval>>>,
    /// How many intervals have begun.
    begun: Arc<watch::Sender<usize>>,
    /// How many intervals have ended.
    ended: Arc<watch::Sender<usize>>,
}

/// Ends its interval in the [`WorkLog`] when dropped.
#[derive(Debug)]
#[must_use = "the interval ends when the guard is dropped"]
pub struct WorkGuard {
    log: WorkLog,
    index: usize,
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        if let Some(interval) = self.log.lock().get_mut(self.index) {
            interval.end = Some(now);
        }
        self.log.ended.send_modify(|n| *n += 1);
    }
}

/// What [`WorkLog::check`] found wrong.
#[derive(Debug)]
pub struct Violation {
    /// What is wrong.
    pub problem: String,
    /// Every interval, in start order.
    pub intervals: Vec<Interval>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}; work intervals:", self.problem)?;
        let origin = self.intervals.first().map(|i| i.start);
        for i in &self.intervals {
            let at = |t: Instant| origin.map_or(t, |o| o.max(t)) - origin.unwrap_or(t);
            writeln!(
                f,
                "  {:>10} token {:>20} from {:>12?} to {:?}",
                i.who,
                i.token,
                at(i.start),
                i.end.map(at)
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

impl WorkLog {
    /// An empty log.
    pub fn new() -> WorkLog {
        WorkLog::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Interval>> {
        // A panic elsewhere does not make the record unreadable.
        self.intervals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `who` started work with `token`, now.
    pub fn begin(&self, who: impl Into<String>, token: u64) -> WorkGuard {
        let mut intervals = self.lock();
        intervals.push(Interval {
            who: who.into(),
            token,
            start: Instant::now(),
            end: None,
        });
        let index = intervals.len() - 1;
        drop(intervals);
        self.begun.send_replace(index + 1);
        WorkGuard {
            log: self.clone(),
            index,
        }
    }

    /// Waits until at least `n` intervals have begun (ever, not at once),
    /// and returns the `n`th (counting from 1) in the order they began.
    /// Without a timeout of its own: wrap it in one.
    pub async fn wait_for_start(&self, n: usize) -> Interval {
        let mut begun = self.begun.subscribe();
        // The sender lives in `self`, so the wait cannot fail.
        let _ = begun.wait_for(|&count| count >= n).await;
        self.lock()[n.saturating_sub(1)].clone()
    }

    /// Waits until the interval at `index` (from 0, in start order) has
    /// begun and ended, and returns it. Without a timeout of its own: wrap
    /// it in one.
    pub async fn wait_for_end(&self, index: usize) -> Interval {
        let mut ended = self.ended.subscribe();
        loop {
            if let Some(i) = self.lock().get(index).filter(|i| i.end.is_some()) {
                return i.clone();
            }
            // The sender lives in `self`, so the wait cannot fail.
            let _ = ended.changed().await;
        }
    }

    /// Every interval so far, in start order.
    pub fn intervals(&self) -> Vec<Interval> {
        let mut all = self.lock().clone();
        all.sort_by_key(|i| i.start);
        all
    }

    /// Checks the safety property over every interval so far: each one
    /// ended before the next one started, and tokens strictly increase in
    /// start order. Work still running is allowed only as the last
    /// interval. Returns how many intervals were checked.
    pub fn check(&self) -> Result<usize, Violation> {
        let intervals = self.intervals();
        let fail = |problem: String| Violation {
            problem,
            intervals: intervals.clone(),
        };
        for pair in intervals.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            match a.end {
                None => {
                    return Err(fail(format!(
                        "{} (token {}) was still working when {} (token {}) started",
                        a.who, a.token, b.who, b.token
                    )));
                }
                Some(end) if end > b.start => {
                    return Err(fail(format!(
                        "{} (token {}) worked {:?} past the start of {} (token {})",
                        a.who,
                        a.token,
                        end - b.start,
                        b.who,
                        b.token
                    )));
                }
                Some(_) => {}
            }
            if b.token <= a.token {
                return Err(fail(format!(
                    "token {} of {} is not larger than the earlier token {} of {}",
                    b.token, b.who, a.token, a.who
                )));
            }
        }
        Ok(intervals.len())
    }

    /// The token half of [`check`](Self::check) alone: tokens strictly
    /// increase in start order, whether or not intervals overlap. For tests
    /// of an operator's forced release, where the old holder learns of it
    /// only after the store has freed the key, so overlap is expected and
    /// only fencing protects writes. Panics with every interval otherwise.
    #[track_caller]
    pub fn assert_tokens_increase(&self) {
        let intervals = self.intervals();
        for pair in intervals.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.token <= a.token {
                panic!(
                    "{}",
                    Violation {
                        problem: format!(
                            "token {} of {} is not larger than the earlier token {} of {}",
                            b.token, b.who, a.token, a.who
                        ),
                        intervals: intervals.clone(),
                    }
                );
            }
        }
        println!("{} work intervals, tokens increasing", intervals.len());
    }

    /// [`check`](Self::check) for tests: prints how many intervals passed,
    /// or panics with the violation and every interval.
    #[track_caller]
    pub fn assert_safe(&self) {
        match self.check() {
            Ok(n) => println!("{n} work intervals, none overlapping, tokens increasing"),
            Err(violation) => panic!("{violation}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::WorkLog;

    #[tokio::test(start_paused = true)]
    async fn sequential_terms_pass_and_overlaps_or_old_tokens_fail() {
        let log = WorkLog::new();
        {
            let _a = log.begin("a", 1);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        let b = log.begin("b", 2);
        assert_eq!(log.check().unwrap(), 2);

        // c starts while b still works.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let c = log.begin("c", 3);
        let err = log.check().unwrap_err();
        assert!(err.problem.contains("still working"), "{err}");
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(b);
        drop(c);
        let err = log.check().unwrap_err();
        assert!(err.problem.contains("past the start"), "{err}");

        let log = WorkLog::new();
        drop(log.begin("a", 5));
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(log.begin("b", 5));
        let err = log.check().unwrap_err();
        assert!(err.problem.contains("not larger"), "{err}");
    }
}
