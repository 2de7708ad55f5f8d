//! The etcd backend under failures, on real etcd members started by the
//! testkit: the leader's link cut or blackholed by a proxy, its member
//! restarted, the cluster's Raft leader killed, the shared lease revoked
//! and a key deleted by an operator, a watch resumed from a compacted
//! revision, a cluster re-created on empty data; etcd's own election bugs
//! #18163 (an observer that reports a stale leader) and #19597 (a zombie or
//! phantom leader after its session expired); one keep-alive for many
//! keys; idle followers that make no store calls; a key whose release
//! never reached the server swept off the shared lease; and the candidate
//! registry on the shared lease (renewals without writes, entries that go
//! with a revoked lease and come back, an unregistered entry swept).
//!
//! Every test checks safety where the contract promises it (the work of
//! two terms never overlaps and tokens strictly increase, as the work
//! itself recorded it in a [`WorkLog`]) and liveness (a new leader within a
//! bound). Where a test compares the leader's local times with the lease's
//! expiry in the store, it reads the lease's remaining ttl (whole seconds,
//! rounded down) and adds it to the instant the read was sent: a lower
//! bound of the expiry on the local clock.
#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::Client;
use futures_util::StreamExt;
use leaseholder::{
    Acquired, Backend, BackendEdge, Candidate, Claim, EtcdBackend, Key, Leader, LeaderId, Observed,
    Observer, WatchEvent, WatchStream,
};
use leaseholder_testkit::{EtcdCluster, EtcdServer, TcpProxy, WorkLog};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout};

mod support;
use support::{run_reporting_terms, stop, wait_any_leader, wait_sees};

const WAIT: Duration = Duration::from_secs(30);

/// The key every test campaigns for (each test has its own server).
const KEY: &str = "scheduler";

fn etcd_backend(endpoints: &[String]) -> EtcdBackend {
    EtcdBackend::builder()
        .endpoints(endpoints.to_vec())
        .build()
        .unwrap()
}

fn backend(endpoint: &str) -> Backend {
    Backend::etcd(etcd_backend(&[endpoint.to_owned()]))
}

fn via(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

fn leader_for(key: &str, backend: Backend, ttl: Duration) -> Leader {
    Leader::builder(key)
        .backend(backend)
        .ttl(ttl)
        .build()
        .unwrap()
}

fn leader_on(backend: Backend, ttl: Duration) -> Leader {
    leader_for(KEY, backend, ttl)
}

fn lease_key(key: &str) -> String {
    etcd_backend(&["127.0.0.1:1".to_owned()]).lease_key(&Key::new(key).unwrap())
}

/// Writes the epoch marker of a new cluster and waits until its fresh
/// marker (one second) has expired, so that candidates acquire at once.
async fn plant_epoch(endpoints: &[String]) {
    let b = Backend::etcd(etcd_backend(endpoints));
    b.setup().await.unwrap();
    let claim = Claim::new(LeaderId::new(), Default::default());
    let key = Key::new("epoch-planter").unwrap();
    let first = timeout(WAIT, b.acquire(&key, &claim, Duration::from_secs(1)))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, Acquired::Held(ref h) if h.is_foreign()),
        "a new cluster's first acquire waits for the epoch: {first:?}"
    );
    let mut c = client(endpoints).await;
    let fresh = etcd_backend(endpoints).fresh_key().to_owned();
    let start = Instant::now();
    while c.get(fresh.as_str(), None).await.unwrap().count() > 0 {
        assert!(start.elapsed() < WAIT, "the fresh marker never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn server() -> EtcdServer {
    let s = EtcdServer::start()
        .await
        .expect("etcd 3.4+ is needed: run scripts/setup");
    plant_epoch(&[s.endpoint()]).await;
    s
}

async fn client(endpoints: &[String]) -> Client {
    timeout(WAIT, Client::connect(endpoints.to_vec(), None))
        .await
        .expect("connecting within 30 s")
        .unwrap()
}

/// The id of the shared lease `key` is bound to, if it exists.
async fn bound_lease(c: &mut Client, key: &str) -> Option<i64> {
    let reply = c.get(lease_key(key), None).await.unwrap();
    reply.kvs().first().map(etcd_client::KeyValue::lease)
}

/// Reads `key` every 10 ms from now until it is gone (or bound to
/// another lease), and returns when it was last seen bound to the lease it
/// has now: a lower bound of that lease's expiry on the local clock (etcd
/// reports a lease's remaining ttl only in whole seconds, rounded down).
fn last_seen_alive(endpoint: String, key: &'static str) -> tokio::task::JoinHandle<Instant> {
    tokio::spawn(async move {
        let mut c = client(&[endpoint]).await;
        let lease = bound_lease(&mut c, key).await.expect("the key is held");
        let mut seen = Instant::now();
        loop {
            let sent = Instant::now();
            if bound_lease(&mut c, key).await != Some(lease) {
                return seen;
            }
            seen = sent;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

// ----- the leader's link cut or blackholed ----------------------------------

/// A cut or blackholed link: A's token fires before its lease expires in
/// the store, B takes over only after that, and A follows B once the link
/// is back.
async fn a_leader_whose_link_fails_stops_before_its_lease_expires(blackhole: bool) {
    let ttl = Duration::from_secs(2);
    let s = server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let log = WorkLog::new();
    let a = leader_on(backend(&via(proxy.addr())), ttl);
    let b = leader_on(backend(&s.endpoint()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, token).await;

    let alive = last_seen_alive(s.endpoint(), KEY);
    if blackhole {
        proxy.blackhole();
    } else {
        proxy.cut();
        timeout(WAIT, proxy.wait_connections(0))
            .await
            .expect("the proxy closes every connection");
    }
    let failed = Instant::now();

    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("B leads within 30 s of the failure");
    assert_eq!(next.who, "b");
    assert!(next.token > token);
    assert!(term.is_cancelled());
    let ended = timeout(WAIT, log.wait_for_end(0))
        .await
        .expect("A's work ends")
        .end
        .expect("an ended interval has an end");
    let expires = alive.await.unwrap();
    println!(
        "{}: A's work ended {:?} after it, its lease was last seen {:?} after it, B began {:?} after it",
        if blackhole { "blackhole" } else { "cut" },
        ended.saturating_duration_since(failed),
        expires.saturating_duration_since(failed),
        next.start.saturating_duration_since(failed),
    );
    assert!(
        ended < expires,
        "A worked {:?} past its lease's expiry in the store",
        ended - expires
    );
    assert!(
        next.start > expires,
        "B began {:?} before A's lease expired in the store",
        expires - next.start
    );

    proxy.restore();
    wait_sees(&a, next.token).await;
    stop(&b, tb).await;
    stop(&a, ta).await;
    log.assert_safe();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_by_a_proxy_stops_before_its_lease_expires_and_is_replaced() {
    a_leader_whose_link_fails_stops_before_its_lease_expires(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_leader_stops_by_its_deadline_and_follows_once_the_link_heals() {
    a_leader_whose_link_fails_stops_before_its_lease_expires(true).await;
}

// ----- members restarted and killed ----------------------------------------

/// The only member restarts (its data kept): leases live through it (etcd
/// persists them and a new Raft leader extends them), the leader keeps its
/// term or hands over safely, and tokens keep rising.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_keeps_the_election_safe_and_tokens_rising() {
    let ttl = Duration::from_secs(3);
    let mut s = server().await;
    let log = WorkLog::new();
    let a = leader_on(backend(&s.endpoint()), ttl);
    let b = leader_on(backend(&s.endpoint()), ttl);
    let (ta, _) = run_reporting_terms(&a, "a", &log);
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    let first = timeout(WAIT, log.wait_for_start(1)).await.unwrap();
    s.restart().await.unwrap();
    // Someone leads again (the same term, or a later one).
    let i = timeout(WAIT, wait_any_leader(&[&a, &b])).await.unwrap();
    let now = [&a, &b][i].fencing_token().unwrap().get();
    assert!(now >= first.token);
    // Step down, and the next term's token is larger still.
    [&a, &b][i].resign().await.unwrap();
    let next = timeout(WAIT, log.wait_for_start(log.intervals().len() + 1))
        .await
        .expect("a new term after the resign");
    assert!(next.token > now);
    stop(&a, ta).await;
    stop(&b, tb).await;
    log.assert_safe();
}

/// In a cluster of three, the member that is the Raft leader is killed:
/// the cluster elects another within about an election timeout, requests
/// go to the live members, and the election stays safe; the killed member
/// rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_clusters_raft_leader_keeps_the_election_safe() {
    let ttl = Duration::from_secs(3);
    let mut cluster = EtcdCluster::start(3)
        .await
        .expect("a 3-member etcd cluster (etcd 3.4+; run scripts/setup)");
    let endpoints = cluster.endpoints();
    plant_epoch(&endpoints).await;
    let log = WorkLog::new();
    let a = leader_on(Backend::etcd(etcd_backend(&endpoints)), ttl);
    let b = leader_on(Backend::etcd(etcd_backend(&endpoints)), ttl);
    let (ta, _) = run_reporting_terms(&a, "a", &log);
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    let first = timeout(WAIT, log.wait_for_start(1)).await.unwrap();
    let raft_leader = cluster.wait_leader().await.unwrap();
    cluster.kill(raft_leader).await.unwrap();
    let killed = Instant::now();
    let again = cluster.wait_leader().await.unwrap();
    assert_ne!(again, raft_leader);
    println!(
        "member {raft_leader} killed; member {again} leads the cluster {:?} later",
        killed.elapsed()
    );
    let i = timeout(WAIT, wait_any_leader(&[&a, &b])).await.unwrap();
    let now = [&a, &b][i].fencing_token().unwrap().get();
    assert!(now >= first.token);
    [&a, &b][i].resign().await.unwrap();
    let next = timeout(WAIT, log.wait_for_start(log.intervals().len() + 1))
        .await
        .expect("a new term after the resign");
    assert!(next.token > now);
    cluster.restart(raft_leader).await.unwrap();
    cluster.wait_healthy().await.unwrap();
    stop(&a, ta).await;
    stop(&b, tb).await;
    log.assert_safe();
}

// ----- operators ------------------------------------------------------------

/// `etcdctl lease revoke` on the shared lease ends every term on it at
/// once (etcd deletes all its keys): every key gets a new term with a
/// larger token, bound to another lease (the first process's next acquire
/// grants a new one). (A revoke frees the keys at once, so the next holder may start
/// within milliseconds of the old work's end: fence downstream writes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_revoking_the_shared_lease_ends_every_term_on_it() {
    let ttl = Duration::from_secs(3);
    let s = server().await;
    let keys = ["k0", "k1", "k2"];
    let (xb, yb) = (etcd_backend(&[s.endpoint()]), etcd_backend(&[s.endpoint()]));
    let mut xs = Vec::new();
    let mut x_terms = Vec::new();
    for key in keys {
        let l = leader_for(key, Backend::etcd(xb.clone()), ttl);
        let log = WorkLog::new();
        let (task, mut terms) = run_reporting_terms(&l, "x", &log);
        let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
        x_terms.push(term);
        xs.push((l, task, log));
    }
    let mut ys = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let l = leader_for(key, Backend::etcd(yb.clone()), ttl);
        let (task, _) = run_reporting_terms(&l, "y", &xs[i].2);
        wait_sees(&l, x_terms[i].fencing_token().get()).await;
        ys.push((l, task));
    }
    let ids = xb.lease_ids();
    assert_eq!(ids.len(), 1, "one shared lease for the three keys: {ids:?}");
    let revoked = Instant::now();
    s.ctl(&["lease", "revoke", &format!("{:x}", ids[0])])
        .await
        .unwrap();
    let mut c = client(&[s.endpoint()]).await;
    for (i, (_, _, log)) in xs.iter().enumerate() {
        // Either process may win the freed key; its term is a new one.
        let next = timeout(WAIT, log.wait_for_start(2))
            .await
            .expect("a new term after the revoke");
        assert!(next.token > x_terms[i].fencing_token().get());
        let ended = timeout(WAIT, log.wait_for_end(0))
            .await
            .expect("x's work ends")
            .end
            .expect("an ended interval has an end");
        println!(
            "{}: x's work ended {:?} after the revoke, {}'s began {:?} after it",
            keys[i],
            ended.saturating_duration_since(revoked),
            next.who,
            next.start.saturating_duration_since(revoked)
        );
        assert!(ended.saturating_duration_since(revoked) < ttl / 3);
        let bound = bound_lease(&mut c, keys[i]).await;
        assert!(
            bound.is_some_and(|l| l != ids[0]),
            "{} is bound to {bound:?} after the revoke of {}",
            keys[i],
            ids[0]
        );
    }
    for (l, task) in ys {
        stop(&l, task).await;
    }
    for (l, task, log) in xs {
        stop(&l, task).await;
        // A revoke frees the keys in the store before x hears of it, so
        // y may start before x's work ends (as after `release --force`):
        // bounded above by ttl / 3, and fenced by the larger token.
        log.assert_tokens_increase();
    }
}

/// `etcdctl del` of the leader's key (an operator forcing a release): the
/// watch tells the leader's backend, its term ends within a renew
/// interval, and the next holder's token is larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_deleting_the_leaders_key_ends_its_term() {
    let ttl = Duration::from_secs(3);
    let s = server().await;
    let log = WorkLog::new();
    let a = leader_on(backend(&s.endpoint()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let b = leader_on(backend(&s.endpoint()), ttl);
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, term.fencing_token().get()).await;
    let deleted = Instant::now();
    s.ctl(&["del", &lease_key(KEY)]).await.unwrap();
    timeout(WAIT, term.cancelled()).await.unwrap();
    let took = deleted.elapsed();
    println!("a's term ended {took:?} after the delete");
    assert!(took < a.config().renew_interval());
    let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    assert!(next.token > term.fencing_token().get());
    stop(&a, ta).await;
    stop(&b, tb).await;
}

// ----- proclaim ------------------------------------------------------------

/// `Leader::proclaim` on a real member: another client's `current_leader`
/// reads the new metadata under the same token; the key keeps its create
/// revision (the token) and its shared lease, and its revision moves
/// (holders report it); another backend's watch event carries the new
/// holder. At the edge: a proclaim with a lease that missed a landed
/// proclaim (its reply lost) writes over it, and a proclaim after the key
/// was deleted is `Lost` and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proclaim_is_seen_by_other_clients_with_the_same_token() {
    let ttl = Duration::from_secs(3);
    let s = server().await;
    let mut c = client(&[s.endpoint()]).await;
    let log = WorkLog::new();
    let a = Leader::builder(KEY)
        .backend(backend(&s.endpoint()))
        .ttl(ttl)
        .metadata("starting")
        .build()
        .unwrap();
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token();
    // Another process's backend, its epoch base known (read once), so that
    // its watch events carry holders.
    let watcher = etcd_backend(&[s.endpoint()]);
    let before = watcher
        .holder(&Key::new(KEY).unwrap(), WAIT)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before.metadata().as_ref(), b"starting");
    let mut events = timeout(WAIT, watcher.watch())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let kv0 = c.get(lease_key(KEY), None).await.unwrap().kvs()[0].clone();

    timeout(WAIT, a.proclaim("serving at 10.0.0.7:8080"))
        .await
        .unwrap()
        .unwrap();
    let other = leader_on(backend(&s.endpoint()), ttl);
    let seen = other.current_leader().await.unwrap().unwrap();
    assert_eq!(seen.metadata().as_ref(), b"serving at 10.0.0.7:8080");
    assert_eq!(seen.token(), Some(token));
    assert_eq!(seen.id(), Some(a.leader_id()));
    assert_eq!(a.fencing_token(), Some(token), "no new election");
    let kv1 = c.get(lease_key(KEY), None).await.unwrap().kvs()[0].clone();
    assert_eq!(kv1.create_revision(), kv0.create_revision());
    assert_eq!(kv1.lease(), kv0.lease());
    assert!(kv1.mod_revision() > kv0.mod_revision());
    assert_eq!(seen.revision(), u64::try_from(kv1.mod_revision()).unwrap());
    loop {
        match timeout(WAIT, events.next()).await.unwrap().unwrap() {
            WatchEvent::Updated(_, Some(h)) => {
                assert_eq!(h.metadata().as_ref(), b"serving at 10.0.0.7:8080");
                assert_eq!(h.token(), Some(token));
                break;
            }
            WatchEvent::Updated(_, None) => panic!("an event without its holder"),
            _ => continue,
        }
    }
    stop(&a, ta).await;

    // At the edge.
    let e = etcd_backend(&[s.endpoint()]);
    let key = Key::new("edge").unwrap();
    let claim = Claim::new(LeaderId::new(), bytes::Bytes::from_static(b"v1"));
    let Acquired::Won(lease) = e.acquire(&key, &claim, ttl, WAIT).await.unwrap() else {
        panic!("the key is free");
    };
    let v2 = bytes::Bytes::from_static(b"v2");
    let landed = e.proclaim(&key, &lease, &v2, ttl, WAIT).await.unwrap();
    let landed = landed.lease().unwrap().clone();
    assert!(landed.revision() > lease.revision());
    // As if that reply was lost: the term still has the first revision.
    let v3 = bytes::Bytes::from_static(b"v3");
    let again = e.proclaim(&key, &lease, &v3, ttl, WAIT).await.unwrap();
    let again = again.lease().unwrap().clone();
    assert!(again.revision() > landed.revision());
    assert_eq!(again.metadata(), &v3);
    let h = e.holder(&key, WAIT).await.unwrap().unwrap();
    assert_eq!(
        (h.metadata(), h.token(), h.revision()),
        (&v3, Some(lease.token()), again.revision())
    );
    // A plain renewal keeps the revision (it writes nothing).
    let renewed = e.renew(&key, &again, ttl, WAIT).await.unwrap();
    assert_eq!(renewed.lease().unwrap().revision(), again.revision());
    s.ctl(&["del", &lease_key("edge")]).await.unwrap();
    let lost = e.proclaim(&key, &again, &v2, ttl, WAIT).await.unwrap();
    assert_eq!(lost, leaseholder::Renewed::Lost);
    assert!(e.holder(&key, WAIT).await.unwrap().is_none());
}

// ----- the watch --------------------------------------------------------------

/// A follower whose watch was down while the leader released and the
/// history was compacted resumes from a compacted revision: the backend
/// watches from now and the follower, told to resync, acquires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_from_a_compacted_revision_resyncs_and_the_follower_takes_over() {
    let ttl = Duration::from_secs(2);
    let s = server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let log = WorkLog::new();
    let a = leader_on(backend(&s.endpoint()), ttl);
    let (ta, _) = run_reporting_terms(&a, "a", &log);
    let first = timeout(WAIT, log.wait_for_start(1)).await.unwrap();
    let f = leader_on(backend(&via(proxy.addr())), ttl);
    let (tf, _) = run_reporting_terms(&f, "f", &log);
    wait_sees(&f, first.token).await;
    proxy.cut();
    timeout(WAIT, proxy.wait_connections(0)).await.unwrap();
    // A steps down for good while f cannot hear it; more writes; compact.
    stop(&a, ta).await;
    let mut c = client(&[s.endpoint()]).await;
    for i in 0..10 {
        c.put(format!("noise/{i}"), "x", None).await.unwrap();
    }
    let rev = c.get("noise/9", None).await.unwrap().kvs()[0].mod_revision();
    c.compact(rev, None).await.unwrap();
    let healed = Instant::now();
    proxy.restore();
    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("f leads after its watch resyncs");
    assert_eq!(next.who, "f");
    assert!(next.token > first.token);
    println!("f led {:?} after its link healed", healed.elapsed());
    stop(&f, tf).await;
    log.assert_safe();
}

// ----- etcd's election bugs ---------------------------------------------------

/// etcd-io/etcd#18163: etcd's `Observe` reports a stale leader and never
/// "no leader". Ours reports the leader, then `Vacant` once a crashed
/// leader's lease has expired (here: its link cut for good), then the next
/// leader; never the old one after it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_observer_reports_vacant_after_expiry_and_never_a_stale_leader() {
    let ttl = Duration::from_secs(2);
    let s = server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let log = WorkLog::new();
    let a = leader_on(backend(&via(proxy.addr())), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let observer = Observer::new(KEY, backend(&s.endpoint()), Duration::from_secs(60)).unwrap();
    let mut seen = observer.watch();
    timeout(
        WAIT,
        seen.wait_for(|o| {
            o.holder()
                .is_some_and(|h| h.token().map(|t| t.get()) == Some(token))
        }),
    )
    .await
    .expect("the observer sees a's term")
    .unwrap();
    let alive = last_seen_alive(s.endpoint(), KEY);
    let history = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let (history, mut seen) = (history.clone(), observer.watch());
        tokio::spawn(async move {
            while seen.changed().await.is_ok() {
                let now = seen.borrow().clone();
                history.lock().unwrap().push(now);
            }
        })
    };
    proxy.cut();
    timeout(WAIT, seen.wait_for(|o| matches!(o, Observed::Vacant)))
        .await
        .expect("the observer reports vacant after a's lease expired")
        .unwrap();
    let vacant_at = Instant::now();
    let expires = alive.await.unwrap();
    assert!(vacant_at >= expires, "vacant while the lease was alive");
    println!(
        "vacant {:?} after the lease's expiry (lower bound)",
        vacant_at - expires
    );
    let b = leader_on(backend(&s.endpoint()), ttl);
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    timeout(
        WAIT,
        seen.wait_for(|o| {
            o.holder()
                .is_some_and(|h| h.token().map(|t| t.get()) == Some(next.token))
        }),
    )
    .await
    .expect("the observer sees b's term")
    .unwrap();
    // Once it said vacant, the observer never went back to a's term.
    recorder.abort();
    let history = history.lock().unwrap().clone();
    let vacant = history
        .iter()
        .position(|o| matches!(o, Observed::Vacant))
        .expect("vacant was reported");
    for o in &history[vacant..] {
        assert!(
            o.holder()
                .is_none_or(|h| h.token().map(|t| t.get()) != Some(token)),
            "a stale leader after vacant: {history:?}"
        );
    }
    proxy.restore();
    stop(&b, tb).await;
    stop(&a, ta).await;
    log.assert_safe();
}

/// etcd-io/etcd#19597: a campaign whose session expired goes on as a
/// zombie, or comes back as a phantom leader. Here a leader whose link is
/// down past the ttl stops being leader by its deadline (no zombie), and
/// once the link is back never reports itself leader of the old term (no
/// phantom): it follows, and any later term of its own comes from a new
/// acquisition with a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_cut_off_past_its_ttl_is_neither_zombie_nor_phantom() {
    let ttl = Duration::from_secs(2);
    let s = server().await;
    let proxy = TcpProxy::start(s.addr()).await.unwrap();
    let log = WorkLog::new();
    let a = leader_on(backend(&via(proxy.addr())), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let token = term.fencing_token().get();
    let mut state = a.state();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            // Every state a reports from the cut on.
            while state.changed().await.is_ok() {
                let now = state.borrow().clone();
                seen.lock().unwrap().push(now);
            }
        })
    };
    proxy.blackhole();
    let cut = Instant::now();
    timeout(WAIT, term.cancelled()).await.unwrap();
    assert!(
        cut.elapsed() < ttl,
        "a still led {:?} after the cut",
        cut.elapsed()
    );
    // Down past the ttl: the lease expires in the store.
    let mut c = client(&[s.endpoint()]).await;
    let start = Instant::now();
    while bound_lease(&mut c, KEY).await.is_some() {
        assert!(start.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = leader_on(backend(&s.endpoint()), ttl);
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    let next = timeout(WAIT, log.wait_for_start(2)).await.unwrap();
    assert_eq!(next.who, "b");
    proxy.restore();
    wait_sees(&a, next.token).await;
    stop(&b, tb).await;
    let relead = timeout(WAIT, log.wait_for_start(3)).await.unwrap();
    assert_eq!(relead.who, "a");
    assert!(relead.token > next.token);
    stop(&a, ta).await;
    watcher.abort();
    let states = seen.lock().unwrap().clone();
    for s in &states {
        if let leaseholder::State::Leader { token: t, .. } = s {
            assert_ne!(
                t.get(),
                token,
                "a reported the old term again after the cut: {states:?}"
            );
        }
    }
    log.assert_safe();
}

// ----- one keep-alive for many keys; idle followers -------------------------

/// A process leading 100 keys on one backend sends about one keep-alive
/// per renew interval, not one per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keep_alive_per_renew_interval_serves_a_hundred_keys() {
    let ttl = Duration::from_secs(3);
    let s = server().await;
    let eb = etcd_backend(&[s.endpoint()]);
    let shared = Backend::etcd(eb.clone());
    let mut fleet = Vec::new();
    let mut states = Vec::new();
    for i in 0..100 {
        let log = WorkLog::new();
        let l = leader_for(&format!("shard-{i}"), shared.clone(), ttl);
        let (task, _) = run_reporting_terms(&l, &format!("s{i}"), &log);
        states.push(l.state());
        fleet.push((l, task, log));
    }
    for state in &mut states {
        timeout(WAIT, state.wait_for(leaseholder::State::is_leader))
            .await
            .unwrap()
            .unwrap();
    }
    // Let the keys fall into step (a couple of intervals).
    let renew = fleet[0].0.config().renew_interval();
    tokio::time::sleep(renew * 3).await;
    let before = eb.keep_alives_sent();
    let window = renew * 6;
    tokio::time::sleep(window).await;
    let sent = eb.keep_alives_sent() - before;
    println!("{sent} keep-alives in {window:?} for 100 keys (renew every {renew:?})");
    assert!(
        sent <= 6 * 2 + 1,
        "{sent} keep-alives in six renew intervals for 100 keys"
    );
    assert_eq!(eb.lease_ids().len(), 1);
    for (l, task, log) in fleet {
        assert_eq!(log.intervals().len(), 1, "a term was lost");
        stop(&l, task).await;
        log.assert_safe();
    }
}

/// The counters etcd keeps of the gRPC requests it handled: unary calls
/// (`Txn`, `Range`, ...) and keep-alive messages, summed over methods.
async fn requests(addr: SocketAddr) -> (u64, u64) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    let value = |line: &str| -> u64 {
        line.rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let mut unary = 0;
    let mut keep_alives = 0;
    for line in body.lines() {
        if line.starts_with("grpc_server_handled_total{")
            && line.contains("grpc_type=\"unary\"")
            && !line.contains("grpc_service=\"grpc.health")
        {
            unary += value(line);
            if std::env::var_os("ETCD_TEST_METRICS").is_some() {
                println!("{line}");
            }
        }
        if line.starts_with("grpc_server_msg_received_total{")
            && line.contains("grpc_method=\"LeaseKeepAlive\"")
        {
            keep_alives += value(line);
        }
    }
    (unary, keep_alives)
}

/// While the leader renews, followers make no store calls at all, and the
/// leader only keep-alives: no key is written while a term goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_followers_make_no_store_calls_while_the_leader_renews() {
    let ttl = Duration::from_secs(2);
    let s = server().await;
    let log = WorkLog::new();
    let mut fleet = Vec::new();
    for who in ["c0", "c1", "c2", "c3"] {
        let l = leader_on(backend(&s.endpoint()), ttl);
        let (task, _) = run_reporting_terms(&l, who, &log);
        fleet.push((l, task));
    }
    let leaders: Vec<&Leader> = fleet.iter().map(|(l, _)| l).collect();
    let i = timeout(WAIT, wait_any_leader(&leaders)).await.unwrap();
    let token = leaders[i].fencing_token().unwrap().get();
    for l in &leaders {
        wait_sees(l, token).await;
    }
    tokio::time::sleep(ttl).await;
    let (unary0, ka0) = requests(s.addr()).await;
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await;
    let (unary1, ka1) = requests(s.addr()).await;
    let renew = leaders[i].config().renew_interval();
    let renewals = window.as_secs_f64() / renew.as_secs_f64();
    println!(
        "idle: {} unary calls and {} keep-alives in {window:?} with 1 leader and 3 followers (renew every {renew:?})",
        unary1 - unary0,
        ka1 - ka0
    );
    assert_eq!(unary1 - unary0, 0, "store calls while nobody changed");
    assert!((ka1 - ka0) as f64 <= renewals.ceil() + 1.0);
    assert_eq!(log.intervals().len(), 1);
    for (l, task) in fleet {
        stop(&l, task).await;
    }
    log.assert_safe();
}

// ----- a cluster re-created on empty data -------------------------------------

/// The only member loses its data (killed, data directory removed,
/// started again: a new cluster, whose revisions start over) while a term
/// runs. The old leader's keep-alives find no lease and its term ends; no
/// acquisition succeeds on the new cluster until one ttl after its epoch
/// marker was written; the next token is larger than the old one although
/// the new cluster's revisions are small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_recreated_on_empty_data_waits_a_ttl_and_tokens_still_rise() {
    let ttl = Duration::from_secs(2);
    let mut s = server().await;
    let log = WorkLog::new();
    let a = leader_on(backend(&s.endpoint()), ttl);
    let (ta, mut terms) = run_reporting_terms(&a, "a", &log);
    let term = timeout(WAIT, terms.recv()).await.unwrap().unwrap();
    let b = leader_on(backend(&s.endpoint()), ttl);
    let (tb, _) = run_reporting_terms(&b, "b", &log);
    wait_sees(&b, term.fencing_token().get()).await;
    s.kill().await.unwrap();
    std::fs::remove_dir_all(s.dir().join("data")).unwrap();
    s.restart().await.unwrap();
    let back = Instant::now();
    let next = timeout(WAIT, log.wait_for_start(2))
        .await
        .expect("a leader on the new cluster");
    println!(
        "new cluster: next term {:?} after it came up, token {} after {}",
        next.start - back,
        next.token,
        term.fencing_token().get()
    );
    assert!(next.token > term.fencing_token().get());
    assert!(
        next.start - back >= ttl,
        "a term began {:?} after the new cluster came up, before one ttl",
        next.start - back
    );
    stop(&a, ta).await;
    stop(&b, tb).await;
    log.assert_safe();
}

// ----- a key whose release never reached the server ----------------------------

/// While another key keeps `shared`'s lease alive, a candidate on another
/// backend campaigns for `key`, which `shared` left bound to that lease;
/// it must begin to lead at least a ttl after `written`.
async fn taken_from_the_shared_lease(
    s: &EtcdServer,
    shared: &Backend,
    key: &str,
    ttl: Duration,
    written: Instant,
) {
    let log = WorkLog::new();
    let keeper = leader_for("busy", shared.clone(), ttl);
    let (tk, _) = run_reporting_terms(&keeper, "keeper", &log);
    timeout(WAIT, log.wait_for_start(1)).await.unwrap();
    let other = WorkLog::new();
    let taker = leader_for(key, backend(&s.endpoint()), ttl);
    let (tt, _) = run_reporting_terms(&taker, "taker", &other);
    let taken = timeout(WAIT, other.wait_for_start(1))
        .await
        .unwrap_or_else(|_| panic!("{key} is never deleted and taken"));
    let after = taken.start - written;
    println!("{key} taken {after:?} after it was written");
    assert!(after >= ttl, "{key} taken {after:?} after it was written");
    stop(&taker, tt).await;
    stop(&keeper, tk).await;
    log.assert_safe();
}

/// A key acquired through a backend that then neither renews nor releases
/// it (its campaign gone while the link was down, say) would stay alive as
/// long as the backend's other keys keep the shared lease alive. The
/// backend deletes it once it has gone a ttl without a renewal, and
/// another candidate takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_nobody_renews_is_swept_off_the_shared_lease() {
    let ttl = Duration::from_secs(2);
    let s = server().await;
    let shared = Backend::etcd(etcd_backend(&[s.endpoint()]));
    let claim = Claim::new(LeaderId::new(), Default::default());
    let orphan = Key::new("orphan").unwrap();
    let won = shared.acquire(&orphan, &claim, ttl).await.unwrap();
    assert!(matches!(won, Acquired::Won(_)), "{won:?}");
    taken_from_the_shared_lease(&s, &shared, "orphan", ttl, Instant::now()).await;
}

/// An acquire whose reply was lost may have written the key, and the
/// campaign, which could not read it back, gives that attempt up and later
/// acquires with a new nonce. The key is bound to the shared lease that the
/// backend's other keys keep alive, so it would never expire: the backend
/// keeps the given-up attempt aside and deletes its key once a ttl has
/// passed without a call for it, and a candidate elsewhere takes the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_by_an_abandoned_acquire_is_deleted_and_taken() {
    let ttl = Duration::from_secs(2);
    let s = server().await;
    let shared = Backend::etcd(etcd_backend(&[s.endpoint()]));
    let key = Key::new("abandoned").unwrap();
    // The attempt whose reply the campaign never saw: it won.
    let lost = Claim::new(LeaderId::new(), Default::default());
    let won = shared.acquire(&key, &lost, ttl).await.unwrap();
    assert!(matches!(won, Acquired::Won(_)), "{won:?}");
    let written = Instant::now();
    // The campaign's next attempt, with a new nonce, finds the key held.
    let next = Claim::new(LeaderId::new(), Default::default());
    let held = shared.acquire(&key, &next, ttl).await.unwrap();
    assert!(matches!(held, Acquired::Held(_)), "{held:?}");
    taken_from_the_shared_lease(&s, &shared, "abandoned", ttl, written).await;
}

// ----- the candidate registry -------------------------------------------------

/// The next registry event of the watch (lease events are skipped).
async fn next_candidates(events: &mut WatchStream) -> Key {
    loop {
        match timeout(WAIT, events.next()).await.unwrap().unwrap() {
            WatchEvent::Candidates(key) => return key,
            _ => continue,
        }
    }
}

/// The ids `b` lists for `key`.
async fn listed(b: &EtcdBackend, key: &Key) -> Vec<LeaderId> {
    b.candidates(key, WAIT)
        .await
        .unwrap()
        .iter()
        .map(Candidate::id)
        .collect()
}

/// Registry entries live on the shared lease: a renewal is the lease's
/// keep-alive and writes nothing (the cluster's revision stays, the watch
/// sends nothing); a key's registry never lists a longer key's entries
/// (`a` and `a/b`); a revoked lease takes the entries with it, the watch
/// says so, and the next register puts them again on the new lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_entries_ride_the_shared_lease() {
    let ttl = Duration::from_secs(3);
    let s = server().await;
    let eb = etcd_backend(&[s.endpoint()]);
    let mut events = timeout(WAIT, eb.watch()).await.unwrap().unwrap().unwrap();
    let mut c = client(&[s.endpoint()]).await;
    let (a, ab) = (Key::new("a").unwrap(), Key::new("a/b").unwrap());
    let (ca, cab) = (
        Candidate::new(LeaderId::new(), 1, &b"a"[..]),
        Candidate::new(LeaderId::new(), 2, &b"ab"[..]),
    );
    eb.register(&a, &ca, ttl, WAIT).await.unwrap();
    assert_eq!(next_candidates(&mut events).await, a);
    eb.register(&ab, &cab, ttl, WAIT).await.unwrap();
    assert_eq!(next_candidates(&mut events).await, ab);
    assert_eq!(listed(&eb, &a).await, vec![ca.id()]);
    assert_eq!(listed(&eb, &ab).await, vec![cab.id()]);
    // Renewals: keep-alives, and no other request (no write, no read).
    let (unary0, ka0) = requests(s.addr()).await;
    for _ in 0..3 {
        eb.register(&a, &ca, ttl, WAIT).await.unwrap();
        eb.register(&ab, &cab, ttl, WAIT).await.unwrap();
    }
    let (unary1, ka1) = requests(s.addr()).await;
    assert_eq!(unary1 - unary0, 0, "a renewal wrote or read");
    assert!(
        ka1 - ka0 >= 1 && ka1 - ka0 <= 6,
        "{} keep-alives",
        ka1 - ka0
    );
    // A rewrite is a write, and the next event (not a renewal's).
    let ca2 = Candidate::new(ca.id(), 5, &b"a"[..]).with_since(ca.since());
    eb.register(&a, &ca2, ttl, WAIT).await.unwrap();
    assert_eq!(next_candidates(&mut events).await, a);
    let entry = eb.candidate_key(&a, ca.id());
    let bound = c.get(entry.as_str(), None).await.unwrap().kvs()[0].lease();
    assert_eq!(eb.lease_ids(), vec![bound]);
    // Revoked: both entries go, and the watch reports each.
    s.ctl(&["lease", "revoke", &format!("{bound:x}")])
        .await
        .unwrap();
    let mut gone = vec![
        next_candidates(&mut events).await,
        next_candidates(&mut events).await,
    ];
    gone.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    assert_eq!(gone, vec![a.clone(), ab.clone()]);
    assert!(listed(&eb, &a).await.is_empty());
    // The next register puts the entry again, on a new lease.
    eb.register(&a, &ca2, ttl, WAIT).await.unwrap();
    assert_eq!(next_candidates(&mut events).await, a);
    let kv = c.get(entry.as_str(), None).await.unwrap().kvs()[0].clone();
    assert_ne!(kv.lease(), bound);
    assert_eq!(eb.lease_ids(), vec![kv.lease()]);
    assert_eq!(Candidate::decode(kv.value()).unwrap().priority(), 5);
    // The registry is not a lease: the key is free.
    assert!(eb.holder(&a, WAIT).await.unwrap().is_none());
}

/// An entry whose candidate stopped registering it without deregistering
/// (its deregister never reached the server) is deleted, although another
/// key of the process keeps the shared lease alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_nobody_registers_is_swept_off_the_shared_lease() {
    let ttl = Duration::from_secs(2);
    let s = server().await;
    let eb = etcd_backend(&[s.endpoint()]);
    let shared = Backend::etcd(eb.clone());
    let key = Key::new("orphan").unwrap();
    let mut events = timeout(WAIT, eb.watch()).await.unwrap().unwrap().unwrap();
    let c = Candidate::new(LeaderId::new(), 0, &b""[..]);
    eb.register(&key, &c, ttl, WAIT).await.unwrap();
    let registered = Instant::now();
    assert_eq!(next_candidates(&mut events).await, key);
    // Another key keeps the shared lease alive.
    let log = WorkLog::new();
    let keeper = leader_for("busy", shared.clone(), ttl);
    let (tk, _) = run_reporting_terms(&keeper, "keeper", &log);
    assert_eq!(next_candidates(&mut events).await, key);
    let swept = registered.elapsed();
    println!("the unregistered entry was deleted {swept:?} after its last register");
    assert!(swept >= ttl, "{swept:?}");
    assert!(listed(&eb, &key).await.is_empty());
    stop(&keeper, tk).await;
    log.assert_safe();
}
