//! The replicated lease table: what every member's state machine holds, the
//! commands the log carries, and how a command applies.
//!
//! Applying is deterministic: a command's effect depends only on the table
//! and the entry's log index, never on a clock, so every member that
//! applies the same log holds the same table. Time enters in two places
//! only, both local to a member and never replicated:
//!
//! - each lease and registry entry has a *deadline* on this member's
//!   monotonic clock, set when the member applies the write (`now + ttl`).
//!   Every member applies a write after its holder sent it, and the
//!   holder's own deadline counts from the send, so no member's deadline
//!   is earlier than the holder's: the member that takes over the group's
//!   leadership judges by the deadlines it already has, with no extension
//!   (etcd's lessor extends every lease at a takeover because etcd's
//!   keep-alives are not in the log; here every renewal is);
//! - the Raft leader *judges* expiry before it proposes an acquire, and
//!   puts its judgment in the command as a condition
//!   ([`Expect::Expired`] with the lease's revision), which the apply
//!   checks: a renewal that landed in between changes the revision, so the
//!   acquire fails instead of replacing a lease that was renewed.
//!
//! The fencing token of a lease is `base + index`, where `index` is the log
//! index of the acquire that created it (log indexes only grow, for the
//! group's whole life) and `base` the group's birth in microseconds since
//! the Unix epoch, fixed by the first entry after the group is formed
//! ([`Command::Genesis`]): a group formed again from empty data
//! directories issues larger tokens than the old one did.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use leaseholder::{Candidate, FencingToken, Holder, LeaseValue, WatchEvent};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Tokens stay below 2^63 (the contract of `BackendEdge`).
const TOKEN_LIMIT: u64 = 1 << 63;

/// What the Raft leader expects of a key when it proposes an acquire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Expect {
    /// The key holds no lease.
    Free,
    /// The key holds the lease of this revision, which the leader judged
    /// expired by its own clock.
    Expired(u64),
}

/// A write to the table: the application data of a Raft log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Command {
    /// Fixes the token base, if it is not fixed yet.
    Genesis {
        /// Microseconds since the Unix epoch, by the proposer's wall clock.
        base: u64,
    },
    /// Creates a lease if the key is as `expect` says.
    Acquire {
        key: String,
        nonce: u128,
        id: [u8; 16],
        metadata: Vec<u8>,
        /// The claim's wall-clock time: microseconds since the Unix epoch.
        at_us: u64,
        ttl_us: u64,
        expect: Expect,
    },
    /// Extends the lease with `nonce` (and replaces its metadata when
    /// `metadata` is given: a proclaim).
    Renew {
        key: String,
        nonce: u128,
        ttl_us: u64,
        metadata: Option<Vec<u8>>,
    },
    /// Ends the lease with `nonce`.
    Release { key: String, nonce: u128 },
    /// Writes a raw value, bypassing the contract (tests, operators).
    PutRaw {
        key: String,
        value: Vec<u8>,
        ttl_us: u64,
    },
    /// Writes a registry entry.
    Register {
        key: String,
        id: [u8; 16],
        value: Vec<u8>,
        ttl_us: u64,
    },
    /// Removes a registry entry.
    Deregister { key: String, id: [u8; 16] },
    /// Removes registry entries the leader judged expired, each only if it
    /// still has the revision the leader saw.
    Prune {
        key: String,
        entries: Vec<([u8; 16], u64)>,
    },
}

/// A lease as the table shows it, in the form a reply carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HolderWire {
    pub(crate) value: Vec<u8>,
    pub(crate) token: Option<u64>,
    pub(crate) revision: u64,
    pub(crate) expires_in_us: Option<u64>,
}

impl HolderWire {
    /// The holder this describes (a value that does not decode is foreign).
    pub(crate) fn holder(&self) -> Holder {
        Holder::decode(
            &self.value,
            self.token.map(FencingToken::new),
            self.revision,
            self.expires_in_us.map(Duration::from_micros),
        )
    }
}

/// The result of applying a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Outcome {
    /// Applied; nothing to report.
    Done,
    /// The acquire created a lease with this token and revision.
    Won { token: u64, revision: u64 },
    /// The acquire found the key held (or not as expected).
    Held(Option<HolderWire>),
    /// The renewal extended the lease; its new revision.
    Renewed { revision: u64 },
    /// No lease with the nonce.
    Lost,
}

/// One lease of the table.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    /// The encoded [`LeaseValue`] (or a raw value: foreign).
    value: Vec<u8>,
    /// The nonce of a lease the table created; `None` for a raw value.
    nonce: Option<u128>,
    token: Option<u64>,
    revision: u64,
    ttl_us: u64,
    /// When this member's clock expires the lease; `None` until a member
    /// that installed it from a snapshot sets it ([`Table::arm`]).
    #[serde(skip)]
    deadline: Option<Instant>,
    /// Whether this member's watchers were told that the lease expired
    /// (see [`Table::tell_expired`]); cleared by every write.
    #[serde(skip)]
    told: bool,
}

/// One registry entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    value: Vec<u8>,
    revision: u64,
    ttl_us: u64,
    #[serde(skip)]
    deadline: Option<Instant>,
}

/// The replicated table with this member's deadlines.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Table {
    base: Option<u64>,
    /// When this member applied the group's first entry (the genesis), or
    /// armed a table with a base (a snapshot, a restart): never earlier
    /// than the group's birth, so the group's age measured from it on this
    /// member's monotonic clock is never more than its true age.
    #[serde(skip)]
    born: Option<Instant>,
    leases: BTreeMap<String, Stored>,
    registry: BTreeMap<String, BTreeMap<[u8; 16], Entry>>,
    /// The earliest lease deadline set since [`Table::take_earliest_set`]
    /// last took it: whether the expiry timer must wake sooner.
    #[serde(skip)]
    earliest_set: Option<Instant>,
}

/// What the Raft leader concluded about a key it may acquire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Judged {
    /// Propose an acquire with this expectation.
    Propose(Expect),
    /// A live lease holds the key.
    Held(HolderWire),
}

fn later(now: Instant, ttl_us: u64) -> Instant {
    now.checked_add(Duration::from_micros(ttl_us))
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// Microseconds since the Unix epoch (0 before it).
pub(crate) fn micros(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A duration in microseconds, saturating.
pub(crate) fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Stored {
    fn live(&self, now: Instant) -> bool {
        self.deadline.is_none_or(|d| d > now)
    }

    fn wire(&self, now: Instant) -> HolderWire {
        HolderWire {
            value: self.value.clone(),
            token: self.token,
            revision: self.revision,
            expires_in_us: Some(
                self.deadline
                    .map_or(self.ttl_us, |d| us(d.saturating_duration_since(now))),
            ),
        }
    }
}

impl Table {
    /// The token base, once fixed.
    #[cfg(test)]
    pub(crate) fn base(&self) -> Option<u64> {
        self.base
    }

    /// `true` once the token base is fixed.
    pub(crate) fn has_base(&self) -> bool {
        self.base.is_some()
    }

    /// Every member's deadlines start now: after a snapshot is installed
    /// (the snapshot carries no clock), each entry lasts a full ttl from
    /// here.
    pub(crate) fn arm(&mut self, now: Instant) {
        if self.base.is_some() && self.born.is_none() {
            self.born = Some(now);
        }
        let mut earliest = None;
        for s in self.leases.values_mut() {
            let deadline = later(now, s.ttl_us);
            s.deadline = Some(deadline);
            s.told = false;
            earliest = Some(earliest.map_or(deadline, |e: Instant| e.min(deadline)));
        }
        if let Some(deadline) = earliest {
            self.set_deadline(deadline);
        }
        for e in self.registry.values_mut().flat_map(|m| m.values_mut()) {
            e.deadline = Some(later(now, e.ttl_us));
        }
    }

    /// Notes that a lease's deadline is now `deadline`.
    fn set_deadline(&mut self, deadline: Instant) {
        self.earliest_set = Some(self.earliest_set.map_or(deadline, |e| e.min(deadline)));
    }

    /// The earliest lease deadline set since the last call, if any.
    pub(crate) fn take_earliest_set(&mut self) -> Option<Instant> {
        self.earliest_set.take()
    }

    /// The leases that expired by `now` on this member's clock and whose
    /// expiry this member's watchers were not told of yet (each is told
    /// once per write), and the earliest deadline of those still live: when
    /// to look again. The leases stay in the table: an acquire replaces an
    /// expired one only on the Raft leader's judgment.
    pub(crate) fn tell_expired(&mut self, now: Instant) -> (Vec<String>, Option<Instant>) {
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        for (key, s) in &mut self.leases {
            let Some(deadline) = s.deadline else { continue };
            if s.told {
                continue;
            }
            if deadline <= now {
                s.told = true;
                expired.push(key.clone());
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        (expired, next)
    }

    /// How long acquires must still wait because the group is younger
    /// than `ttl_us` by this member's clock (see `born`): `None` once it is
    /// older. A group formed again from empty data directories knows
    /// nothing of the old group's leases, which may still be led for up to
    /// a ttl: no acquire succeeds until then (as the epoch marker of the
    /// other stores). A table with a base but no birth yet (restored) is
    /// born now.
    pub(crate) fn quiet_left(&mut self, now: Instant, ttl_us: u64) -> Option<Duration> {
        let born = *self.born.get_or_insert(now);
        let age = now.saturating_duration_since(born);
        Duration::from_micros(ttl_us)
            .checked_sub(age)
            .filter(|left| !left.is_zero())
    }

    /// The Raft leader's view of `key` for an acquire.
    pub(crate) fn judge_acquire(&self, key: &str, now: Instant) -> Judged {
        match self.leases.get(key) {
            None => Judged::Propose(Expect::Free),
            Some(s) if s.live(now) => Judged::Held(s.wire(now)),
            Some(s) => Judged::Propose(Expect::Expired(s.revision)),
        }
    }

    /// `true` if the lease with `nonce` is live on `key` by this member's
    /// clock.
    pub(crate) fn is_live(&self, key: &str, nonce: u128, now: Instant) -> bool {
        self.leases
            .get(key)
            .is_some_and(|s| s.nonce == Some(nonce) && s.live(now))
    }

    /// The live lease of `key`.
    pub(crate) fn holder(&self, key: &str, now: Instant) -> Option<HolderWire> {
        self.leases
            .get(key)
            .filter(|s| s.live(now))
            .map(|s| s.wire(now))
    }

    /// Every key with a lease in the table (live or not).
    pub(crate) fn keys(&self) -> Vec<String> {
        self.leases.keys().cloned().collect()
    }

    /// The live registry entries of `key`, as stored.
    pub(crate) fn candidates(&self, key: &str, now: Instant) -> Vec<Vec<u8>> {
        self.registry
            .get(key)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|e| e.deadline.is_none_or(|d| d > now))
            .map(|e| e.value.clone())
            .collect()
    }

    /// The registry entries of `key` that expired by this member's clock,
    /// with their revisions (for a [`Command::Prune`]).
    pub(crate) fn expired_candidates(&self, key: &str, now: Instant) -> Vec<([u8; 16], u64)> {
        self.registry
            .get(key)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, e)| e.deadline.is_some_and(|d| d <= now))
            .map(|(id, e)| (*id, e.revision))
            .collect()
    }

    /// How many leases and registry entries the table holds.
    pub(crate) fn len(&self) -> (usize, usize) {
        (
            self.leases.len(),
            self.registry.values().map(BTreeMap::len).sum(),
        )
    }

    /// Applies `command`, the entry at log `index`, at `now` on this
    /// member's clock. Returns the outcome and the watch event to send.
    pub(crate) fn apply(
        &mut self,
        command: &Command,
        index: u64,
        now: Instant,
    ) -> (Outcome, Option<WatchEvent>) {
        match command {
            Command::Genesis { base } => {
                if self.born.is_none() {
                    self.born = Some(now);
                }
                if self.base.is_none() {
                    // Room for the log to grow: the base never takes a
                    // token near the limit.
                    self.base = Some((*base).min(TOKEN_LIMIT / 2));
                }
                (Outcome::Done, None)
            }
            Command::Acquire {
                key,
                nonce,
                id,
                metadata,
                at_us,
                ttl_us,
                expect,
            } => {
                let current = self.leases.get(key);
                let fits = match (expect, current) {
                    (Expect::Free, None) => true,
                    (Expect::Expired(rev), Some(s)) => s.revision == *rev,
                    _ => false,
                };
                if !fits {
                    return (Outcome::Held(current.map(|s| s.wire(now))), None);
                }
                let token = self.base.unwrap_or(0).saturating_add(index);
                if token >= TOKEN_LIMIT {
                    return (Outcome::Held(current.map(|s| s.wire(now))), None);
                }
                let value = LeaseValue {
                    nonce: leaseholder::Nonce::from_u128(*nonce),
                    id: leaseholder::LeaderId::from(uuid::Uuid::from_bytes(*id)),
                    token: Some(FencingToken::new(token)),
                    acquired_at: UNIX_EPOCH + Duration::from_micros(*at_us),
                    metadata: Bytes::copy_from_slice(metadata),
                };
                let deadline = later(now, *ttl_us);
                self.set_deadline(deadline);
                let stored = Stored {
                    value: value.encode().to_vec(),
                    nonce: Some(*nonce),
                    token: Some(token),
                    revision: index,
                    ttl_us: *ttl_us,
                    deadline: Some(deadline),
                    told: false,
                };
                let holder = stored.wire(now).holder();
                let event = event_key(key).map(|k| WatchEvent::Updated(k, Some(holder)));
                self.leases.insert(key.clone(), stored);
                (
                    Outcome::Won {
                        token,
                        revision: index,
                    },
                    event,
                )
            }
            Command::Renew {
                key,
                nonce,
                ttl_us,
                metadata,
            } => {
                let Some(s) = self.leases.get_mut(key) else {
                    return (Outcome::Lost, None);
                };
                if s.nonce != Some(*nonce) {
                    return (Outcome::Lost, None);
                }
                if let Some(metadata) = metadata
                    && let Ok(mut value) = LeaseValue::decode(&s.value)
                {
                    value.metadata = Bytes::copy_from_slice(metadata);
                    s.value = value.encode().to_vec();
                }
                s.revision = index;
                s.ttl_us = *ttl_us;
                let deadline = later(now, *ttl_us);
                s.deadline = Some(deadline);
                s.told = false;
                let holder = s.wire(now).holder();
                self.set_deadline(deadline);
                let event = event_key(key).map(|k| WatchEvent::Updated(k, Some(holder)));
                (Outcome::Renewed { revision: index }, event)
            }
            Command::Release { key, nonce } => {
                if self
                    .leases
                    .get(key)
                    .is_some_and(|s| s.nonce == Some(*nonce))
                {
                    self.leases.remove(key);
                    (Outcome::Done, event_key(key).map(WatchEvent::Released))
                } else {
                    (Outcome::Done, None)
                }
            }
            Command::PutRaw { key, value, ttl_us } => {
                let deadline = later(now, *ttl_us);
                self.set_deadline(deadline);
                let stored = Stored {
                    value: value.clone(),
                    nonce: LeaseValue::decode(value).ok().map(|v| v.nonce.as_u128()),
                    token: None,
                    revision: index,
                    ttl_us: *ttl_us,
                    deadline: Some(deadline),
                    told: false,
                };
                let holder = stored.wire(now).holder();
                let event = event_key(key).map(|k| WatchEvent::Updated(k, Some(holder)));
                self.leases.insert(key.clone(), stored);
                (Outcome::Done, event)
            }
            Command::Register {
                key,
                id,
                value,
                ttl_us,
            } => {
                let entries = self.registry.entry(key.clone()).or_default();
                let changed = entries.get(id).is_none_or(|e| !same_entry(&e.value, value));
                entries.insert(
                    *id,
                    Entry {
                        value: value.clone(),
                        revision: index,
                        ttl_us: *ttl_us,
                        deadline: Some(later(now, *ttl_us)),
                    },
                );
                let event = event_key(key)
                    .filter(|_| changed)
                    .map(WatchEvent::Candidates);
                (Outcome::Done, event)
            }
            Command::Deregister { key, id } => {
                let removed = self.remove_entry(key, id, None);
                let event = event_key(key)
                    .filter(|_| removed)
                    .map(WatchEvent::Candidates);
                (Outcome::Done, event)
            }
            Command::Prune { key, entries } => {
                let mut removed = false;
                for (id, revision) in entries {
                    removed |= self.remove_entry(key, id, Some(*revision));
                }
                let event = event_key(key)
                    .filter(|_| removed)
                    .map(WatchEvent::Candidates);
                (Outcome::Done, event)
            }
        }
    }

    fn remove_entry(&mut self, key: &str, id: &[u8; 16], revision: Option<u64>) -> bool {
        let Some(entries) = self.registry.get_mut(key) else {
            return false;
        };
        let matches = entries
            .get(id)
            .is_some_and(|e| revision.is_none_or(|r| r == e.revision));
        if matches {
            entries.remove(id);
        }
        if entries.is_empty() {
            self.registry.remove(key);
        }
        matches
    }
}

/// Two registry values that say the same (a plain renewal rewrites the
/// entry's `since` only if the candidate changed: compare decoded).
fn same_entry(a: &[u8], b: &[u8]) -> bool {
    match (Candidate::decode(a), Candidate::decode(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A key of the table as a [`leaseholder::Key`], for a watch event. Table
/// keys come from checked keys; one that the checks refuse (a peer running
/// other rules) sends no event.
fn event_key(key: &str) -> Option<leaseholder::Key> {
    leaseholder::Key::new(key).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 1_000_000;

    fn acquire(key: &str, nonce: u128, expect: Expect) -> Command {
        Command::Acquire {
            key: key.to_owned(),
            nonce,
            id: [7; 16],
            metadata: b"m".to_vec(),
            at_us: 1,
            ttl_us: TTL,
            expect,
        }
    }

    fn renew(key: &str, nonce: u128) -> Command {
        Command::Renew {
            key: key.to_owned(),
            nonce,
            ttl_us: TTL,
            metadata: None,
        }
    }

    #[test]
    fn tokens_are_the_base_plus_the_log_index_and_rise_across_terms() {
        let now = Instant::now();
        let mut t = Table::default();
        t.apply(&Command::Genesis { base: 1_000 }, 1, now);
        // A second genesis (a late duplicate) changes nothing.
        t.apply(&Command::Genesis { base: 5_000 }, 2, now);
        let (won, _) = t.apply(&acquire("k", 1, Expect::Free), 3, now);
        assert_eq!(
            won,
            Outcome::Won {
                token: 1_003,
                revision: 3
            }
        );
        t.apply(
            &Command::Release {
                key: "k".into(),
                nonce: 1,
            },
            4,
            now,
        );
        let (won, _) = t.apply(&acquire("k", 2, Expect::Free), 9, now);
        assert_eq!(
            won,
            Outcome::Won {
                token: 1_009,
                revision: 9
            }
        );
    }

    #[test]
    fn an_acquire_judged_on_an_old_revision_fails_after_a_renewal_landed() {
        let now = Instant::now();
        let mut t = Table::default();
        t.apply(&acquire("k", 1, Expect::Free), 1, now);
        // The leader judged revision 1 expired; a renewal applied first.
        t.apply(&renew("k", 1), 2, now);
        let (out, _) = t.apply(&acquire("k", 2, Expect::Expired(1)), 3, now);
        assert!(matches!(out, Outcome::Held(Some(_))), "{out:?}");
        assert!(t.is_live("k", 1, now));
        // Judged on the current revision, it replaces the lease.
        let (out, _) = t.apply(&acquire("k", 2, Expect::Expired(2)), 4, now);
        assert!(matches!(out, Outcome::Won { .. }), "{out:?}");
        let (out, _) = t.apply(&renew("k", 1), 5, now);
        assert_eq!(out, Outcome::Lost);
    }

    #[test]
    fn an_acquire_expecting_a_free_key_never_overwrites() {
        let now = Instant::now();
        let mut t = Table::default();
        t.apply(&acquire("k", 1, Expect::Free), 1, now);
        let (out, event) = t.apply(&acquire("k", 2, Expect::Free), 2, now);
        assert!(matches!(out, Outcome::Held(Some(_))), "{out:?}");
        assert!(event.is_none());
        // Expecting a lease where there is none fails too.
        let (out, _) = t.apply(&acquire("j", 3, Expect::Expired(1)), 3, now);
        assert_eq!(out, Outcome::Held(None));
    }

    #[test]
    fn expiry_is_judged_on_this_members_clock_from_when_it_applied_the_write() {
        let now = Instant::now();
        let ttl = Duration::from_micros(TTL);
        let mut t = Table::default();
        t.apply(&acquire("k", 1, Expect::Free), 1, now);
        let just_before = now + ttl - Duration::from_millis(1);
        assert!(t.is_live("k", 1, just_before));
        assert!(matches!(t.judge_acquire("k", just_before), Judged::Held(_)));
        let after = now + ttl + Duration::from_millis(1);
        assert_eq!(
            t.judge_acquire("k", after),
            Judged::Propose(Expect::Expired(1))
        );
        assert!(!t.is_live("k", 1, after));
        // A member that applied the same entry later (a follower that
        // learned of the commit a heartbeat on) times the lease from then:
        // never sooner than the member that applied it first.
        let mut follower = Table::default();
        let applied = now + Duration::from_millis(50);
        follower.apply(&acquire("k", 1, Expect::Free), 1, applied);
        assert!(follower.is_live("k", 1, after));
        assert!(!follower.is_live("k", 1, applied + ttl));
        // A renewal times it anew from its own apply.
        let renewed = now + ttl / 2;
        t.apply(&renew("k", 1), 2, renewed);
        assert!(t.is_live("k", 1, after));
        assert!(!t.is_live("k", 1, renewed + ttl));
    }

    #[test]
    fn each_expiry_is_told_once_per_write() {
        let now = Instant::now();
        let ttl = Duration::from_micros(TTL);
        let mut t = Table::default();
        t.apply(&acquire("k", 1, Expect::Free), 1, now);
        t.apply(&acquire("j", 2, Expect::Free), 2, now + ttl / 2);
        // The timer learns of the earliest new deadline, once.
        assert_eq!(t.take_earliest_set(), Some(now + ttl));
        assert_eq!(t.take_earliest_set(), None);
        let (told, next) = t.tell_expired(now);
        assert!(told.is_empty(), "{told:?}");
        assert_eq!(next, Some(now + ttl));
        let (told, next) = t.tell_expired(now + ttl);
        assert_eq!(told, ["k"]);
        assert_eq!(next, Some(now + ttl / 2 + ttl));
        // Told once: the expired lease is no reason to wake again.
        let (told, next) = t.tell_expired(now + ttl);
        assert!(told.is_empty(), "{told:?}");
        assert_eq!(next, Some(now + ttl / 2 + ttl));
        // A write makes its expiry worth telling again.
        t.apply(&renew("k", 1), 3, now + ttl);
        assert_eq!(t.take_earliest_set(), Some(now + ttl * 2));
        let (told, next) = t.tell_expired(now + ttl * 3);
        assert_eq!(told, ["j", "k"]);
        assert_eq!(next, None);
        // A released lease is gone: nothing to tell.
        t.apply(&acquire("r", 3, Expect::Free), 4, now);
        t.apply(
            &Command::Release {
                key: "r".to_owned(),
                nonce: 3,
            },
            5,
            now,
        );
        let (told, next) = t.tell_expired(now + ttl * 3);
        assert!(told.is_empty(), "{told:?}");
        assert_eq!(next, None);
    }

    #[test]
    fn a_snapshot_carries_no_clock_and_arms_every_lease_for_a_full_ttl() {
        let now = Instant::now();
        let mut t = Table::default();
        t.apply(&Command::Genesis { base: 10 }, 1, now);
        t.apply(&acquire("k", 1, Expect::Free), 2, now);
        let bytes = postcard::to_stdvec(&t).unwrap_or_default();
        let mut back: Table = postcard::from_bytes(&bytes).unwrap_or_default();
        let at = now + Duration::from_secs(5);
        back.arm(at);
        assert!(back.is_live(
            "k",
            1,
            at + Duration::from_micros(TTL) - Duration::from_millis(1)
        ));
        assert!(!back.is_live("k", 1, at + Duration::from_micros(TTL)));
        assert_eq!(back.base(), Some(10));
    }

    #[test]
    fn registry_entries_expire_and_prune_only_their_own_revision() {
        let now = Instant::now();
        let mut t = Table::default();
        let entry = Candidate::new(leaseholder::LeaderId::new(), 3, "a");
        let id = *entry.id().as_bytes();
        let register = Command::Register {
            key: "k".into(),
            id,
            value: entry.encode().to_vec(),
            ttl_us: TTL,
        };
        let (_, event) = t.apply(&register, 1, now);
        assert!(matches!(event, Some(WatchEvent::Candidates(_))));
        // A plain renewal of the same entry sends no event.
        let (_, event) = t.apply(&register, 2, now);
        assert!(event.is_none());
        let gone = now + Duration::from_micros(TTL);
        assert!(t.candidates("k", gone).is_empty());
        assert_eq!(t.expired_candidates("k", gone), vec![(id, 2)]);
        // A prune judged on revision 1 leaves the entry written at 2.
        t.apply(
            &Command::Prune {
                key: "k".into(),
                entries: vec![(id, 1)],
            },
            3,
            gone,
        );
        assert_eq!(t.len(), (0, 1));
        t.apply(
            &Command::Prune {
                key: "k".into(),
                entries: vec![(id, 2)],
            },
            4,
            gone,
        );
        assert_eq!(t.len(), (0, 0));
    }

    #[test]
    fn a_raw_value_that_does_not_decode_is_a_foreign_holder() {
        let now = Instant::now();
        let mut t = Table::default();
        let raw = Command::PutRaw {
            key: "k".into(),
            value: b"not ours".to_vec(),
            ttl_us: TTL,
        };
        t.apply(&raw, 1, now);
        let holder = t.holder("k", now).map(|h| h.holder());
        assert!(holder.is_some_and(|h| h.is_foreign()));
        assert!(matches!(t.judge_acquire("k", now), Judged::Held(_)));
    }

    #[test]
    fn acquires_wait_until_the_group_is_a_ttl_old_by_this_members_clock() {
        let now = Instant::now();
        let mut t = Table::default();
        t.apply(&Command::Genesis { base: 1_000 }, 1, now);
        let ttl = us(Duration::from_secs(2));
        assert_eq!(t.quiet_left(now, ttl), Some(Duration::from_secs(2)));
        assert_eq!(
            t.quiet_left(now + Duration::from_millis(500), ttl),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(t.quiet_left(now + Duration::from_secs(2), ttl), None);
        // A second genesis does not make the group younger.
        t.apply(
            &Command::Genesis { base: 5_000 },
            2,
            now + Duration::from_secs(5),
        );
        assert_eq!(t.quiet_left(now + Duration::from_secs(5), ttl), None);
        // A restored table (no clock) is born when armed.
        let bytes = postcard::to_stdvec(&t).unwrap_or_default();
        let mut back: Table = postcard::from_bytes(&bytes).unwrap_or_default();
        let later = now + Duration::from_secs(60);
        back.arm(later);
        assert_eq!(back.quiet_left(later, ttl), Some(Duration::from_secs(2)));
    }
}
