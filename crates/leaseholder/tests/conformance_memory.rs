//! The public conformance suite against the in-memory backend, under paused
//! time (the suite's waits on the store's clock take no wall time).
#![cfg(feature = "conformance")]

use std::time::Duration;

use leaseholder::conformance::{self, Harness};
use leaseholder::{Backend, BoxError, Key, MemoryStore};

/// The store, the rows' ttl, and whether the clients batch renewals.
struct Memory(MemoryStore, Duration, bool);

impl Harness for Memory {
    async fn backend(&self) -> Backend {
        Backend::new(self.0.backend().batched(self.2))
    }

    async fn put_foreign(&self, key: &Key, value: &[u8], ttl: Duration) -> Result<(), BoxError> {
        self.0.put_raw(key, value.to_vec(), ttl);
        Ok(())
    }

    fn ttl(&self) -> Duration {
        self.1
    }

    fn expiry_slack(&self) -> Duration {
        // The memory store expires to the tick; allow for scheduling on a
        // real clock.
        Duration::from_millis(100)
    }
}

#[tokio::test(start_paused = true)]
async fn memory_backend_passes_the_contract() {
    let report = conformance::run(&Memory(MemoryStore::new(), Duration::from_secs(1), false)).await;
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    // Only the multi-process row may be unsupported: this harness starts
    // no child processes (the single-node real-server suites do).
    assert!(
        report
            .unsupported
            .iter()
            .all(|(row, _)| row.contains("process")),
        "{report}"
    );
    assert_eq!(report.passed.len(), 21, "{report}");
}

/// The same on a real clock and the multi-thread runtime, with a short ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_passes_on_the_multi_thread_runtime() {
    let store = Memory(MemoryStore::new(), Duration::from_millis(200), false);
    let report = conformance::run(&store).await;
    assert!(report.is_ok(), "{report}");
}

/// The same with renewals batched: `renew_many` carries them, and the
/// rows' direct renewals go through the backend's batcher.
#[tokio::test(start_paused = true)]
async fn memory_backend_passes_the_contract_with_batched_renewals() {
    let report = conformance::run(&Memory(MemoryStore::new(), Duration::from_secs(1), true)).await;
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.passed.len(), 21, "{report}");
}
