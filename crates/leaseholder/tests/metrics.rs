//! The metrics a campaign reports (feature `metrics`), read back through
//! metrics-util's debugging recorder installed as the global recorder.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use leaseholder::metrics::{
    DEADLINE_SLACK, DEADLINE_SLACK_MIN, IS_LEADER, RENEW_SECONDS, STORE_ERRORS, TERMS, TERMS_ENDED,
};
use leaseholder::{Backend, Fault, Faults, Leader, MemoryStore, Op, State};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(60);

/// Every metric as `name{label=value,...}` and its value so far. The
/// debugging recorder hands out counters and histograms as what changed
/// since the last snapshot, so they are summed here across reads.
struct Metrics {
    snapshotter: Snapshotter,
    totals: Totals,
}

type Totals = std::collections::BTreeMap<String, DebugValue>;

impl Metrics {
    fn read(&mut self) -> &Totals {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            let merged = match (self.totals.remove(&name), value) {
                (Some(DebugValue::Counter(a)), DebugValue::Counter(b)) => {
                    DebugValue::Counter(a + b)
                }
                (Some(DebugValue::Histogram(mut a)), DebugValue::Histogram(b)) => {
                    a.extend(b);
                    DebugValue::Histogram(a)
                }
                (_, value) => value,
            };
            self.totals.insert(name, merged);
        }
        &self.totals
    }
}

fn value<'a>(all: &'a Totals, name: &str) -> Option<&'a DebugValue> {
    all.get(name)
}

fn counter(all: &Totals, name: &str) -> u64 {
    match value(all, name) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        other => panic!("{name}: {other:?}"),
    }
}

fn gauge(all: &Totals, name: &str) -> f64 {
    match value(all, name) {
        Some(DebugValue::Gauge(g)) => g.into_inner(),
        other => panic!("{name}: {other:?}"),
    }
}

fn histogram(all: &Totals, name: &str) -> Vec<f64> {
    match value(all, name) {
        Some(DebugValue::Histogram(h)) => h.iter().map(|v| v.into_inner()).collect(),
        other => panic!("{name}: {other:?}"),
    }
}

fn candidate(store: &MemoryStore, ttl: Duration) -> (Leader, Faults) {
    let edge = store.backend();
    let faults = edge.faults();
    let leader = Leader::builder("reports")
        .backend(Backend::new(edge))
        .ttl(ttl)
        .build()
        .unwrap();
    (leader, faults)
}

#[tokio::test(start_paused = true)]
async fn a_campaign_reports_leadership_renewals_slack_losses_and_store_errors() {
    let recorder = DebuggingRecorder::new();
    let mut metrics = Metrics {
        snapshotter: recorder.snapshotter(),
        totals: Default::default(),
    };
    recorder.install().unwrap();

    let store = MemoryStore::new();
    let ttl = Duration::from_secs(3);
    let (a, faults) = candidate(&store, ttl);
    let (b, _) = candidate(&store, ttl);
    let ta = tokio::spawn({
        let a = a.clone();
        async move { a.start(Default::default()).await }
    });
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let tb = tokio::spawn({
        let b = b.clone();
        async move { b.start(Default::default()).await }
    });
    // Renewals: about three per ttl.
    tokio::time::sleep(ttl * 2).await;
    let all = metrics.read();
    println!("{all:#?}");
    assert_eq!(gauge(all, &format!("{IS_LEADER}{{key=reports}}")), 1.0);
    assert_eq!(counter(all, &format!("{TERMS}{{key=reports}}")), 1);
    let renewals = histogram(all, &format!("{RENEW_SECONDS}{{key=reports}}"));
    assert!(renewals.len() >= 4, "{renewals:?}");
    let slack = histogram(all, &format!("{DEADLINE_SLACK}{{key=reports}}"));
    let min = gauge(all, &format!("{DEADLINE_SLACK_MIN}{{key=reports}}"));
    assert!(!slack.is_empty());
    assert_eq!(
        min,
        slack.iter().copied().fold(f64::INFINITY, f64::min),
        "the minimum gauge is the smallest slack"
    );
    // Renewed every ttl/3 against a deadline of ttl - drift: about
    // ttl - drift - ttl/3 was left each time.
    assert!(min > 1.0 && min < 2.0, "{min}");

    // Renewals fail for a while: errors by op and kind, and the slack
    // shrinks, but the leader keeps the term.
    faults.inject_on(Op::Renew, Fault::Fail, 2);
    tokio::time::sleep(ttl).await;
    let all = metrics.read();
    assert_eq!(
        counter(
            all,
            &format!("{STORE_ERRORS}{{key=reports,kind=unavailable,op=renew}}")
        ),
        2
    );
    assert!(gauge(all, &format!("{DEADLINE_SLACK_MIN}{{key=reports}}")) < min);
    assert!(a.state().borrow().is_leader());

    // A is cut off: its term ends at the deadline.
    faults.partition();
    timeout(WAIT, b.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let all = metrics.read();
    assert_eq!(
        counter(all, &format!("{TERMS_ENDED}{{cause=deadline,key=reports}}")),
        1
    );
    // Both candidates report under the same key: the gauge is whoever
    // wrote last, which is B winning.
    assert_eq!(gauge(all, &format!("{IS_LEADER}{{key=reports}}")), 1.0);
    assert_eq!(counter(all, &format!("{TERMS}{{key=reports}}")), 2);

    // B resigns: a resign end.
    faults.heal();
    b.resign().await.unwrap();
    timeout(WAIT, a.state().wait_for(State::is_leader))
        .await
        .unwrap()
        .unwrap();
    let all = metrics.read();
    assert_eq!(
        counter(all, &format!("{TERMS_ENDED}{{cause=resign,key=reports}}")),
        1
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();
    let all = metrics.read();
    assert_eq!(
        counter(all, &format!("{TERMS_ENDED}{{cause=shutdown,key=reports}}")),
        1
    );
    assert_eq!(gauge(all, &format!("{IS_LEADER}{{key=reports}}")), 0.0);
}
