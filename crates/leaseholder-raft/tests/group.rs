//! A group of members in one process, linked by [`LocalNet`], under
//! partitions: the Raft leader cut into a minority, the loss of the Raft
//! leader while the leading candidate lives, a majority lost. Work
//! intervals are stamped on the one process clock, so the check is strict:
//! no two terms' work overlaps at all, and tokens rise.

mod support;

use std::sync::Arc;
use std::time::Duration;

use leaseholder_raft::{LocalNet, PeerGroup};
use leaseholder_testkit::TempDir;
use tokio::time::{Instant, timeout};

use support::{Log, stop};

const TTL: Duration = Duration::from_millis(1500);

struct Cluster {
    net: Arc<LocalNet>,
    members: Vec<PeerGroup>,
}

async fn cluster(n: u64) -> Cluster {
    cluster_in(n, None).await
}

/// A group of `n` members; durable in `dirs/m<i>` when `dirs` is given.
async fn cluster_in(n: u64, dirs: Option<&std::path::Path>) -> Cluster {
    let net = LocalNet::new();
    let peers: Vec<(u64, String)> = (1..=n).map(|i| (i, format!("m{i}"))).collect();
    let mut members = Vec::new();
    for id in 1..=n {
        let builder = PeerGroup::builder()
            .node_id(id)
            .peers(peers.clone())
            .transport(net.transport(id));
        let builder = match dirs {
            Some(dir) => builder.data_dir(dir.join(format!("m{id}"))),
            None => builder.in_memory(),
        };
        let member = builder
            .start()
            .await
            .unwrap_or_else(|e| panic!("member {id}: {e}"));
        net.attach(&member);
        members.push(member);
    }
    for m in &members {
        m.wait_for_leader(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("member {}: {e}", m.id()));
    }
    Cluster { net, members }
}

impl Cluster {
    /// The index of the member every member names as the leader (waits
    /// until they agree).
    async fn raft_leader(&self) -> usize {
        let found = timeout(Duration::from_secs(20), async {
            loop {
                let named: Vec<Option<u64>> = self.members.iter().map(|m| m.leader()).collect();
                if let Some(Some(id)) = named.first()
                    && named.iter().all(|n| n == &Some(*id))
                    && let Some(i) = self
                        .members
                        .iter()
                        .position(|m| m.id() == *id && m.is_leader())
                {
                    return i;
                }
                let mut any = self.members[0].clone();
                for m in &self.members {
                    if !m.is_leader() {
                        any = m.clone();
                    }
                }
                let _ = any.wait_for_leader(Duration::from_millis(50)).await;
                tokio::task::yield_now().await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("the members never agreed on a leader"))
    }

    /// The Raft leader that member `f` names once it names one other than
    /// member `r` (waits up to 10 s).
    async fn new_raft_leader(&self, f: usize, r: usize) -> u64 {
        let old = self.members[r].id();
        timeout(Duration::from_secs(10), async {
            loop {
                if let Some(id) = self.members[f].leader()
                    && id != old
                {
                    return id;
                }
                let _ = self.members[f]
                    .wait_for_leader(Duration::from_millis(20))
                    .await;
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no new Raft leader"))
    }

    async fn shutdown(&self) {
        for m in &self.members {
            m.shutdown().await;
        }
    }
}

/// The candidate that leads runs on the member that leads the group; that
/// member is cut off into a minority of one. The term ends (no renewal
/// commits without a quorum) before the majority side grants a new one,
/// with a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_leader_cut_into_a_minority_ends_its_term_before_the_majority_grants_one() {
    let c = cluster(3).await;
    let mut log = Log::new(TTL);
    let r = c.raft_leader().await;
    let first = log.candidate(r, &c.members[r]);
    let (who, token) = log.started(Duration::from_secs(10)).await;
    assert_eq!(who, r);
    let mut leaders = vec![first];
    for i in (0..3).filter(|&i| i != r) {
        leaders.push(log.candidate(i, &c.members[i]));
    }
    c.net.isolate(c.members[r].id());
    let (ended, _) = log.ended(TTL * 2).await;
    assert_eq!(ended, r);
    let (next, next_token) = log.started(TTL * 4).await;
    assert_ne!(next, r, "the isolated member's candidate led again");
    assert!(next_token > token);
    c.net.heal();
    stop(leaders).await;
    log.check();
    c.shutdown().await;
}

/// The member that leads the group is lost while the leading candidate,
/// on another member, lives: a new Raft leader takes over, extends every
/// lease, and the candidate keeps its term (no term ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_raft_leader_costs_the_leading_candidate_no_term() {
    let c = cluster(3).await;
    let mut log = Log::new(TTL);
    let r = c.raft_leader().await;
    let f = (r + 1) % 3;
    let leaders = vec![log.candidate(f, &c.members[f])];
    let (_, token) = log.started(Duration::from_secs(10)).await;
    let cut_at = Instant::now();
    c.net.isolate(c.members[r].id());
    // The others elect a new leader.
    let new = c.new_raft_leader(f, r).await;
    assert_ne!(new, c.members[r].id());
    // Two ttls with the old Raft leader gone: the term lives on.
    if let Some(ev) = log.next(TTL * 2).await {
        panic!("the term changed after the Raft leader was lost: {ev:?}");
    }
    let term = leaders[0]
        .0
        .current_term()
        .unwrap_or_else(|| panic!("no current term"));
    assert_eq!(term.fencing_token().get(), token);
    assert!(term.is_valid());
    assert!(
        term.deadline() > cut_at + TTL,
        "renewed through the new Raft leader"
    );
    c.net.heal();
    stop(leaders).await;
    log.check();
    c.shutdown().await;
}

/// A new Raft leader times each lease from when it applied the lease's
/// last write, as every member does, not from its takeover (etcd's lessor
/// rule) nor from the first request it serves: a lease whose holder went
/// down with the old Raft leader is free a ttl after its last write, and
/// never sooner than a ttl after that write was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_raft_leader_times_leases_from_their_last_write_not_from_its_takeover() {
    let c = cluster(3).await;
    let r = c.raft_leader().await;
    let f = (r + 1) % 3;
    let key = leaseholder::Key::new("takeover").unwrap_or_else(|e| panic!("{e}"));
    let ttl = Duration::from_secs(10);
    let sent = Instant::now();
    c.members[r]
        .put_raw(&key, b"held elsewhere", ttl)
        .await
        .unwrap_or_else(|e| panic!("put: {e}"));
    let written = Instant::now();
    // Time passes before the Raft leader changes (the other members apply
    // the write within a heartbeat of its commit).
    let before = Duration::from_secs(1);
    tokio::time::sleep(before).await;
    c.net.isolate(c.members[r].id());
    c.new_raft_leader(f, r).await;
    let asked = Instant::now();
    let holder = c.members[f]
        .backend()
        .holder(&key)
        .await
        .unwrap_or_else(|e| panic!("holder: {e}"))
        .unwrap_or_else(|| panic!("the lease is gone right after the takeover"));
    let answered = Instant::now();
    let left = holder.expires_in().unwrap_or_else(|| panic!("no expiry"));
    // Never sooner than a ttl after the write was sent (the holder's
    // deadline counts from there; 1 ms for the hint's rounding).
    assert!(
        answered + left + Duration::from_millis(1) >= sent + ttl,
        "the lease ends {:?} before a ttl from its send",
        (sent + ttl).saturating_duration_since(answered + left)
    );
    // A ttl from the write (half a second for the follower's apply and the
    // election's own requests), not from the takeover, which came more
    // than `before` later.
    let slack = before / 2;
    assert!(
        asked + left <= written + ttl + slack,
        "the lease ends {:?} after a ttl from its write: extended at the takeover",
        (asked + left).saturating_duration_since(written + ttl)
    );
    c.net.heal();
    c.shutdown().await;
}

/// Every link cut: no quorum anywhere. The leading candidate's term ends,
/// and no candidate leads while the group has no majority (safety over
/// liveness); once the links are back, a term starts with a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_majority_nobody_leads_until_the_links_come_back() {
    let c = cluster(3).await;
    let mut log = Log::new(TTL);
    let mut leaders = vec![log.candidate(0, &c.members[0])];
    let (_, token) = log.started(Duration::from_secs(10)).await;
    for m in &c.members {
        c.net.isolate(m.id());
    }
    let (ended, _) = log.ended(TTL * 2).await;
    assert_eq!(ended, 0);
    leaders.push(log.candidate(1, &c.members[1]));
    leaders.push(log.candidate(2, &c.members[2]));
    if let Some(ev) = log.next(TTL * 3).await {
        panic!("a candidate led with no majority: {ev:?}");
    }
    c.net.heal();
    let (_, next_token) = log.started(Duration::from_secs(15)).await;
    assert!(next_token > token);
    stop(leaders).await;
    log.check();
    c.shutdown().await;
}

/// Every member restarts on its data directory, twice: once after the
/// leading candidate resigned, once while it led (every member stopped
/// under it). The group remembers its log: tokens keep rising, and the
/// lease that was live when the members stopped is honoured for a full ttl
/// after they come back (no term starts while the old one may still run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_restarting_on_its_data_directory_keeps_tokens_rising() {
    let dir = TempDir::new("leaseholder-raft-restart").unwrap_or_else(|e| panic!("{e}"));
    let mut log = Log::new(TTL);

    let c = cluster_in(3, Some(dir.path())).await;
    let first = log.candidate(0, &c.members[0]);
    let (_, t1) = log.started(Duration::from_secs(10)).await;
    stop(vec![first]).await;
    c.shutdown().await;
    drop(c);

    let c = cluster_in(3, Some(dir.path())).await;
    let second = log.candidate(1, &c.members[1]);
    let (_, t2) = log.started(Duration::from_secs(15)).await;
    assert!(
        t2 > t1,
        "token {t2} after a restart of every member, {t1} before"
    );
    // Every member stops under the leading candidate: its term ends at
    // its deadline (no renewal reaches a group).
    c.shutdown().await;
    drop(c);
    let (ended, _) = log.ended(TTL * 2).await;
    assert_eq!(ended, 1);

    let c = cluster_in(3, Some(dir.path())).await;
    let third = log.candidate(2, &c.members[2]);
    let (_, t3) = log.started(Duration::from_secs(15)).await;
    assert!(t3 > t2, "token {t3} after the second restart, {t2} before");
    assert_eq!(c.members[0].table_len().0, 1, "one key in the table");
    stop(vec![second, third]).await;
    log.check();
    c.shutdown().await;
}

/// Waits until `member` reports exactly `want` as the group's members.
async fn wait_members(member: &PeerGroup, want: &[(u64, String)]) {
    let seen = timeout(Duration::from_secs(10), async {
        loop {
            if member.members() == want {
                return;
            }
            let _ = member.wait_for_leader(Duration::from_millis(20)).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "member {} shows {:?}, not {want:?}",
        member.id(),
        member.members()
    );
}

/// Membership at run time: a fourth member joins (a learner first, then a
/// voter), then the member that leads the group is removed and shut down.
/// The leading candidate, on a member that stays, keeps its term through
/// both changes; handed over, the next term (on the new member) has a
/// larger token. Bad lists are refused before anything is proposed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_added_and_removed_at_run_time_keep_the_term_and_tokens_rising() {
    let mut c = cluster(3).await;
    let mut log = Log::new(TTL);
    let r = c.raft_leader().await;
    let f = (r + 1) % 3;
    let mut leaders = vec![log.candidate(f, &c.members[f])];
    let (_, token) = log.started(Duration::from_secs(10)).await;

    for bad in [
        vec![],
        vec![(1, "m1".to_owned()), (1, "m1".to_owned())],
        vec![(1, String::new())],
    ] {
        let refused = c.members[f]
            .set_members(bad.clone(), Duration::from_secs(5))
            .await;
        assert!(
            matches!(refused, Err(leaseholder_raft::GroupError::Config(_))),
            "{bad:?}: {refused:?}"
        );
    }

    let joiner = PeerGroup::builder()
        .node_id(4)
        .peers([(4, "m4")])
        .transport(c.net.transport(4))
        .in_memory()
        .join()
        .start()
        .await
        .unwrap_or_else(|e| panic!("member 4: {e}"));
    c.net.attach(&joiner);
    assert_eq!(joiner.leader(), None, "a joining member forms no group");
    let all: Vec<(u64, String)> = (1..=4).map(|i| (i, format!("m{i}"))).collect();
    c.members[f]
        .set_members(all.clone(), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("adding member 4: {e}"));
    wait_members(&c.members[f], &all).await;
    wait_members(&joiner, &all).await;
    c.members.push(joiner);

    let removed = c.members[r].id();
    let rest: Vec<(u64, String)> = all
        .iter()
        .filter(|(id, _)| *id != removed)
        .cloned()
        .collect();
    c.members[f]
        .set_members(rest.clone(), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("removing member {removed}: {e}"));
    c.members[r].shutdown().await;
    wait_members(&c.members[f], &rest).await;
    // The members left elect a leader among themselves.
    let elected = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(id) = c.members[f].leader()
                && id != removed
            {
                return id;
            }
            let _ = c.members[f]
                .wait_for_leader(Duration::from_millis(20))
                .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(elected.is_ok(), "no leader after member {removed} left");

    // Two ttls after the changes: the term lives on.
    if let Some(ev) = log.next(TTL * 2).await {
        panic!("the term changed with the membership: {ev:?}");
    }
    let term = leaders[0]
        .0
        .current_term()
        .unwrap_or_else(|| panic!("no current term"));
    assert_eq!(term.fencing_token().get(), token);
    assert!(term.is_valid());

    // Handed over to a candidate on the new member: a larger token.
    leaders.push(log.candidate(3, &c.members[3]));
    let (first, task) = leaders.remove(0);
    let _ = first.shutdown().await;
    let _ = timeout(Duration::from_secs(10), task).await;
    let (who, next) = log.started(TTL * 4).await;
    assert_eq!(who, 3);
    assert!(next > token, "token {next} after {token}");
    stop(leaders).await;
    log.check();
    c.shutdown().await;
}

/// A new group (as one formed again from empty data directories, which
/// knows nothing of the old group's leases) grants no lease until it is a
/// ttl old by the Raft leader's clock: an acquire before then finds a
/// foreign holder that expires when the group is a ttl old; after that,
/// it wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_grants_no_lease_until_it_is_a_ttl_old() {
    let c = cluster(3).await;
    let backend = c.members[0].backend();
    let key = leaseholder::Key::new("young").unwrap_or_else(|e| panic!("{e}"));
    let claim = leaseholder::Claim::new(leaseholder::LeaderId::new(), Default::default());
    let ttl = Duration::from_secs(2);
    let held = backend
        .acquire(&key, &claim, ttl)
        .await
        .unwrap_or_else(|e| panic!("acquire: {e}"));
    // The hint was taken on the Raft leader before the reply came: the
    // group is a ttl old at the latest `wait` after the reply.
    let replied = Instant::now();
    let wait = match held {
        leaseholder::Acquired::Held(h) => {
            assert!(h.is_foreign(), "{h:?}");
            h.expires_in()
                .unwrap_or_else(|| panic!("no expiry hint: {h:?}"))
        }
        leaseholder::Acquired::Won(l) => panic!("a new group granted {l:?}"),
    };
    assert!(wait <= ttl, "{wait:?}");
    tokio::time::sleep_until(replied + wait).await;
    match backend
        .acquire(&key, &claim, ttl)
        .await
        .unwrap_or_else(|e| panic!("acquire: {e}"))
    {
        leaseholder::Acquired::Won(_) => {}
        leaseholder::Acquired::Held(h) => panic!("a ttl later the key is still held: {h:?}"),
    }
    c.shutdown().await;
}
