//! The checker: what the candidates printed and what the harness did, turned
//! into work intervals and fenced writes, checked against DESIGN.md's safety
//! property.
//!
//! Every time is a wall-clock stamp in microseconds (`now_us`), taken by
//! whichever process saw the event: candidates stamp their own lines, the
//! harness stamps the faults it injects. All processes run on one host and
//! read the same clock, so the stamps are comparable (the harness checks
//! that the wall clock did not step during the run).
//!
//! How a work interval `[start, end]` is bounded:
//! - `start` is the candidate's `START` line, printed by the work itself on
//!   its first poll;
//! - `end` is its `STOP` line (the work returned) or its `DROP` line (the
//!   library dropped the work future; a guard inside the work prints it
//!   from its `Drop`), whichever comes; if neither comes, the process's
//!   death as the harness saw it (after `SIGKILL` was reaped, or after an
//!   exit was reaped); failing that, the end of the run. `LOST` is not a
//!   bound: it comes from the campaign's state, and the work may still be
//!   draining after it.
//! - A process frozen with `SIGSTOP` keeps its interval open through the
//!   pause and ends it only after `SIGCONT`, when the work sees its token
//!   fired. Its lease may lapse meanwhile and a successor may start: DESIGN
//!   allows that overlap, and only that one, because there the fence is the
//!   guard. An overlap between two terms is *excused* when the process of
//!   the term with the lower token was frozen at some moment between one
//!   ttl before that term's start and the later of the two starts (a pause
//!   right after the acquire, before the work printed `START`, counts too).
//!   Every other overlap, however short, is a violation. An excused one is
//!   still a violation if the work ran on for more than [`REACTION`] after
//!   both its `SIGCONT` and the successor's start (its deadline has passed,
//!   so its token fires as soon as the campaign runs). So an early, harmless
//!   pause cannot excuse a later overlap: the work would have to keep
//!   running long after the thaw.
//! - A link cut, blackhole or server restart never excuses an overlap: the
//!   leader's deadline comes before the store can expire its lease. Nor
//!   does a wipe (the server lost the lease): the store must keep a
//!   successor out until the lost lease's holder has passed its deadline.
//!   Nor does a cluster member's kill or pause, or an etcd quorum loss
//!   (recorded as a restart): the lease lives on the cluster, and a new
//!   Raft leader only extends it.
//! - What outages do excuse is a write the fence refused: that is not a
//!   violation when the writer's term was disturbed by a fault (its
//!   process's pause, its link's cut or blackhole, the store's restart,
//!   wipe or member fault: see `Faults::cause`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// Microseconds since the Unix epoch.
pub(crate) type Micros = u64;

/// How soon a thawed leader's work must stop once its successor has
/// started: its deadline has passed, so the token fires as soon as the
/// campaign task runs (a few milliseconds seen); the rest is slack for a
/// loaded machine.
pub(crate) const REACTION: Micros = 500_000;

/// One line a candidate printed (after its stamp).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Ready,
    Start(u64),
    Stop(u64),
    Drop(u64),
    Lost(u64),
    /// A write leaving the candidate's outbox (the line's stamp), carrying
    /// `token`, issued by the work at `issued`.
    Write {
        token: u64,
        issued: Micros,
    },
    Exit,
}

/// Parses `<micros> <WORD> [<key> args]`: the stamp, the key's index
/// (`None` for the lines of the process, `READY` and `EXIT`) and the event.
pub(crate) fn parse_line(line: &str) -> Option<(Micros, Option<usize>, Event)> {
    let mut words = line.split_ascii_whitespace();
    let at = words.next()?.parse().ok()?;
    let word = words.next()?;
    let mut num = || words.next().and_then(|w| w.parse::<u64>().ok());
    let (key, event) = match word {
        "READY" => (None, Event::Ready),
        "EXIT" => (None, Event::Exit),
        _ => {
            let key = usize::try_from(num()?).ok()?;
            let event = match word {
                "START" => Event::Start(num()?),
                "STOP" => Event::Stop(num()?),
                "DROP" => Event::Drop(num()?),
                "LOST" => Event::Lost(num()?),
                "WRITE" => {
                    let token = num()?;
                    let issued = num()?;
                    Event::Write { token, issued }
                }
                _ => return None,
            };
            (Some(key), event)
        }
    };
    Some((at, key, event))
}

/// The faults the harness injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum FaultKind {
    /// `SIGKILL` a candidate (a new one is spawned in its slot later).
    Kill,
    /// `SIGSTOP`, later `SIGCONT`.
    Pause,
    /// Close the candidate's link to the server, later restore it.
    Cut,
    /// Hold every byte on the candidate's link, later deliver them.
    Blackhole,
    /// Kill the server and start it again on the same port and data.
    Restart,
    /// The server loses its data while the leaders still lead (Redis:
    /// `FLUSHALL`, or a restart without its append-only files).
    Wipe,
    /// `SIGKILL` one member of a cluster (etcd), start it again later on
    /// its ports and data.
    MemberKill,
    /// `SIGSTOP` one member of a cluster, later `SIGCONT`.
    MemberPause,
    /// Cut one member of a cluster off from its peers (every route through
    /// the testkit's per-link proxies closed) while its clients still reach
    /// it, later heal the routes: the member is on the minority side of a
    /// partition. NATS (routes through per-link proxies) and etcd (peer
    /// ports behind fronts that tell who dialed).
    MemberCut,
}

impl FaultKind {
    pub(crate) const ALL: [FaultKind; 9] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Cut,
        FaultKind::Blackhole,
        FaultKind::Restart,
        FaultKind::Wipe,
        FaultKind::MemberKill,
        FaultKind::MemberPause,
        FaultKind::MemberCut,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Cut => "cut",
            FaultKind::Blackhole => "blackhole",
            FaultKind::Restart => "restart",
            FaultKind::Wipe => "wipe",
            FaultKind::MemberKill => "member-kill",
            FaultKind::MemberPause => "member-pause",
            FaultKind::MemberCut => "member-cut",
        }
    }
}

/// One injected fault and the window it was in force. `target` is the
/// instance for kill and pause, the slot (proxies) for cut and blackhole,
/// the member for member kill and member pause, unused for restart and
/// wipe. The window is the part of the fault the
/// harness is sure of: from after the signal or state change took effect,
/// to before it was undone.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub(crate) kind: FaultKind,
    pub(crate) target: usize,
    pub(crate) from: Micros,
    pub(crate) to: Micros,
}

/// One candidate process. A slot (its proxy) hosts one instance at a time;
/// a killed instance is replaced by a new one in the same slot.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub(crate) slot: usize,
    /// When the harness saw it gone (reaped), if it is.
    pub(crate) died: Option<Micros>,
    /// How fast its tokio clock runs against the host's (1.0: the same).
    pub(crate) clock_rate: f64,
}

/// Everything a run recorded.
#[derive(Debug, Default)]
pub(crate) struct Record {
    pub(crate) ttl: Micros,
    /// The candidates' drift margin: a clock slower than `1 - margin/ttl`
    /// is beyond what the library promises to tolerate.
    pub(crate) drift_margin: Micros,
    pub(crate) instances: Vec<Instance>,
    /// Each key's `(instance, stamp, event)`, in the order they were read;
    /// every key is checked on its own.
    pub(crate) events: Vec<Vec<(usize, Micros, Event)>>,
    pub(crate) faults: Vec<Fault>,
    /// When the run started (times in messages are shown from here).
    pub(crate) origin: Micros,
    pub(crate) end: Micros,
}

/// One work interval.
#[derive(Debug, Clone)]
pub(crate) struct Term {
    /// The key's index.
    pub(crate) key: usize,
    pub(crate) inst: usize,
    pub(crate) token: u64,
    pub(crate) start: Micros,
    pub(crate) end: Micros,
}

impl Term {
    /// `c<inst> token <t> [<start> s, <end> s]`, times from `origin`.
    pub(crate) fn show(&self, origin: Micros) -> TermAt<'_> {
        TermAt(self, origin)
    }
}

/// A [`Term`] shown with times relative to the run's start.
pub(crate) struct TermAt<'a>(&'a Term, Micros);

impl fmt::Display for TermAt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rel = |us: Micros| us.saturating_sub(self.1) as f64 / 1e6;
        write!(
            f,
            "k{} c{} token {} [{:.3} s, {:.3} s]",
            self.0.key,
            self.0.inst,
            self.0.token,
            rel(self.0.start),
            rel(self.0.end)
        )
    }
}

/// What the checker found.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Every key's terms, key by key, each key's in START order.
    pub(crate) terms: Vec<Term>,
    /// Leadership changes, summed over the keys (a key's terms less one).
    pub(crate) transitions: usize,
    /// Overlaps whose older term ran on a clock slower than the drift
    /// margin allows (not violations: beyond the stated limit), and the
    /// largest of them.
    pub(crate) drift_overlaps: usize,
    pub(crate) largest_drift_overlap: Micros,
    pub(crate) lost: usize,
    pub(crate) accepted: u64,
    pub(crate) rejected: u64,
    /// Refused writes by what had disturbed their term.
    pub(crate) rejected_by_cause: BTreeMap<&'static str, u64>,
    /// Accepted writes that arrived after a term with a higher token had
    /// started (but had not written yet, or they would have been refused).
    pub(crate) accepted_after_successor_started: u64,
    /// The largest overlap of two intervals (excused or not), and which.
    pub(crate) largest_overlap: Micros,
    pub(crate) largest_overlap_between: Option<(Term, Term)>,
    pub(crate) excused_overlaps: usize,
    /// How long a paused leader's work ran on after `SIGCONT`, at most.
    pub(crate) longest_work_after_resume: Micros,
    /// Terms that started, after a pause, with a token below an earlier
    /// start's.
    pub(crate) late_starts: usize,
    /// `(key, instance, delivered at)` of each write the fence refused.
    pub(crate) refused: Vec<(usize, usize, Micros)>,
    pub(crate) violations: Vec<String>,
    /// `(key, violation)`: the keys that had any, for the report.
    pub(crate) violating_keys: BTreeMap<usize, usize>,
}

impl Report {
    pub(crate) fn transitions(&self) -> usize {
        self.transitions
    }

    /// Adds key `key`'s report to this one.
    fn merge(&mut self, key: usize, keys: usize, mut r: Report) {
        self.transitions += r.terms.len().saturating_sub(1);
        for t in &mut r.terms {
            t.key = key;
        }
        if r.largest_overlap > self.largest_overlap {
            self.largest_overlap = r.largest_overlap;
            self.largest_overlap_between = r.largest_overlap_between.map(|(mut a, mut b)| {
                a.key = key;
                b.key = key;
                (a, b)
            });
        }
        self.terms.append(&mut r.terms);
        self.drift_overlaps += r.drift_overlaps;
        self.largest_drift_overlap = self.largest_drift_overlap.max(r.largest_drift_overlap);
        self.lost += r.lost;
        self.accepted += r.accepted;
        self.rejected += r.rejected;
        for (cause, n) in r.rejected_by_cause {
            *self.rejected_by_cause.entry(cause).or_default() += n;
        }
        self.accepted_after_successor_started += r.accepted_after_successor_started;
        self.excused_overlaps += r.excused_overlaps;
        self.longest_work_after_resume = self
            .longest_work_after_resume
            .max(r.longest_work_after_resume);
        self.late_starts += r.late_starts;
        self.refused
            .extend(r.refused.into_iter().map(|(_, i, at)| (key, i, at)));
        if !r.violations.is_empty() {
            self.violating_keys.insert(key, r.violations.len());
        }
        self.violations.extend(r.violations.into_iter().map(|v| {
            if keys > 1 {
                format!("key {key}: {v}")
            } else {
                v
            }
        }));
    }
}

fn ms(us: Micros) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

struct Faults<'a> {
    record: &'a Record,
}

impl Faults<'_> {
    /// Whether a fault of `kind` on `target` was in force at some moment of
    /// the open window `(lo, hi)`.
    fn any(&self, kind: FaultKind, target: Option<usize>, lo: Micros, hi: Micros) -> bool {
        self.record.faults.iter().any(|f| {
            f.kind == kind && target.is_none_or(|t| t == f.target) && f.from < hi && f.to > lo
        })
    }

    fn paused(&self, inst: usize, lo: Micros, hi: Micros) -> bool {
        self.any(FaultKind::Pause, Some(inst), lo, hi)
    }

    /// The `(SIGSTOP, SIGCONT)` windows of `inst`.
    fn pauses(&self, inst: usize) -> impl Iterator<Item = (Micros, Micros)> + '_ {
        self.record
            .faults
            .iter()
            .filter(move |f| f.kind == FaultKind::Pause && f.target == inst)
            .map(|f| (f.from, f.to))
    }

    /// What disturbed `inst` in `(lo, hi)`, if anything: the first of
    /// pause, cut, blackhole, server restart (etcd: a quorum loss), data
    /// loss, a cluster member killed or paused.
    fn cause(&self, inst: usize, slot: usize, lo: Micros, hi: Micros) -> Option<&'static str> {
        if self.paused(inst, lo, hi) {
            Some("pause")
        } else if self.any(FaultKind::Cut, Some(slot), lo, hi) {
            Some("cut")
        } else if self.any(FaultKind::Blackhole, Some(slot), lo, hi) {
            Some("blackhole")
        } else if self.any(FaultKind::Restart, None, lo, hi) {
            Some("restart")
        } else if self.any(FaultKind::Wipe, None, lo, hi) {
            Some("wipe")
        } else if self.any(FaultKind::MemberKill, None, lo, hi) {
            Some("member-kill")
        } else if self.any(FaultKind::MemberPause, None, lo, hi) {
            Some("member-pause")
        } else if self.any(FaultKind::MemberCut, None, lo, hi) {
            Some("member-cut")
        } else if self.beyond_margin(inst) {
            Some("clock-drift")
        } else {
            None
        }
    }

    /// Whether `inst`'s clock runs slower than the drift margin allows:
    /// its deadline, `ttl - margin` on its clock after a renewal was sent,
    /// is then later than the store's expiry, `ttl` after it arrived.
    fn beyond_margin(&self, inst: usize) -> bool {
        let r = self.record;
        let Some(i) = r.instances.get(inst) else {
            return false;
        };
        let ttl = r.ttl as f64;
        ttl > 0.0 && i.clock_rate < (ttl - r.drift_margin as f64) / ttl
    }
}

/// Checks every key on its own, and sums what was found.
pub(crate) fn check(record: &Record) -> Report {
    let mut report = Report::default();
    let keys = record.events.len();
    for (key, events) in record.events.iter().enumerate() {
        report.merge(key, keys, check_key(record, events));
    }
    report
}

/// Builds one key's intervals and replays its writes through the fence.
fn check_key(record: &Record, events: &[(usize, Micros, Event)]) -> Report {
    let mut report = Report::default();
    let faults = Faults { record };
    let ttl = record.ttl;
    let o = record.origin;
    let rel = |us: Micros| format!("{:.3} s", us.saturating_sub(o) as f64 / 1e6);

    // Intervals.
    let mut open: HashMap<(usize, u64), (Micros, Option<Micros>)> = HashMap::new();
    let mut order: Vec<(usize, u64)> = Vec::new();
    for (inst, at, event) in events {
        match event {
            Event::Start(token) => {
                if open.insert((*inst, *token), (*at, None)).is_some() {
                    report
                        .violations
                        .push(format!("c{inst} printed START {token} twice"));
                } else {
                    order.push((*inst, *token));
                }
            }
            Event::Stop(token) | Event::Drop(token) => match open.get_mut(&(*inst, *token)) {
                Some((_, end @ None)) => *end = Some(*at),
                Some((_, Some(_))) => {}
                None => report
                    .violations
                    .push(format!("c{inst} ended token {token} without starting it")),
            },
            Event::Lost(_) => report.lost += 1,
            _ => {}
        }
    }
    let mut terms: Vec<Term> = order
        .iter()
        .filter_map(|key| {
            let (start, end) = open.get(key)?;
            let died = record.instances.get(key.0).and_then(|i| i.died);
            Some(Term {
                key: 0,
                inst: key.0,
                token: key.1,
                start: *start,
                end: end.or(died).unwrap_or(record.end).max(*start),
            })
        })
        .collect();
    terms.sort_by_key(|t| (t.start, t.token));

    // No two intervals overlap, unless the lower token's process was frozen.
    for (i, a) in terms.iter().enumerate() {
        for b in &terms[i + 1..] {
            if b.start >= a.end {
                continue;
            }
            let overlap = a.end.min(b.end) - b.start;
            if overlap > report.largest_overlap {
                report.largest_overlap = overlap;
                report.largest_overlap_between = Some((a.clone(), b.clone()));
            }
            let lower = if a.token < b.token { a } else { b };
            let excused = a.inst != b.inst
                && faults.paused(lower.inst, lower.start.saturating_sub(ttl), b.start);
            if !excused && a.inst != b.inst && faults.beyond_margin(lower.inst) {
                // A clock slower than the margin allows: the library's
                // stated limit, measured, not a violation.
                report.drift_overlaps += 1;
                report.largest_drift_overlap = report.largest_drift_overlap.max(overlap);
                continue;
            }
            if !excused {
                report.violations.push(format!(
                    "work intervals overlap by {}: {} and {} (not explained by a pause of the lower token's process)",
                    ms(overlap),
                    a.show(o),
                    b.show(o)
                ));
                continue;
            }
            report.excused_overlaps += 1;
            // Once it is thawed and the successor has started, the frozen
            // term's work must stop within REACTION (its deadline has
            // passed: the token fires as soon as the campaign runs). A
            // pause that began before then extends the bound.
            let later = b.start;
            let mut cutoff = faults
                .pauses(lower.inst)
                .filter(|&(p, _)| p < later)
                .map(|(_, r)| r)
                .max()
                .unwrap_or(later)
                .max(later)
                + REACTION;
            while let Some(r) = faults
                .pauses(lower.inst)
                .filter(|&(p, r)| p < cutoff && r + REACTION > cutoff)
                .map(|(_, r)| r)
                .max()
            {
                cutoff = r + REACTION;
            }
            let after = lower.end.saturating_sub(cutoff - REACTION);
            report.longest_work_after_resume = report.longest_work_after_resume.max(after);
            if lower.end > cutoff {
                report.violations.push(format!(
                    "{} kept working {} after it was thawed and {} had started (allowed: {})",
                    lower.show(o),
                    ms(after),
                    if lower.token == a.token { b } else { a }.show(o),
                    ms(REACTION)
                ));
            }
        }
    }

    // Tokens strictly increase in START order.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut highest: Option<&Term> = None;
    for t in &terms {
        if !seen.insert(t.token) {
            report.violations.push(format!(
                "token {} started twice (again by {})",
                t.token,
                t.show(o)
            ));
            continue;
        }
        match highest {
            Some(h) if t.token < h.token => {
                if faults.paused(t.inst, t.start.saturating_sub(ttl), t.start) {
                    report.late_starts += 1;
                } else {
                    report.violations.push(format!(
                        "tokens out of START order: {} started after {} (and its process was not paused)",
                        t.show(o),
                        h.show(o)
                    ));
                }
            }
            _ => highest = Some(t),
        }
    }

    // The fenced sink, fed in the order the writes left their processes.
    let by_key: HashMap<(usize, u64), &Term> =
        terms.iter().map(|t| ((t.inst, t.token), t)).collect();
    let mut writes: Vec<(Micros, usize, usize, u64, Micros)> = events
        .iter()
        .enumerate()
        .filter_map(|(seq, (inst, at, event))| match event {
            Event::Write { token, issued } => Some((*at, seq, *inst, *token, *issued)),
            _ => None,
        })
        .collect();
    writes.sort_unstable();
    // Terms by start, with the highest token started so far.
    let mut started: Vec<(Micros, u64)> = Vec::with_capacity(terms.len());
    for t in &terms {
        let max = started.last().map_or(t.token, |&(_, m)| m.max(t.token));
        started.push((t.start, max));
    }
    let mut fence = 0u64;
    for (at, _, inst, token, issued) in writes {
        let Some(term) = by_key.get(&(inst, token)) else {
            report.violations.push(format!(
                "c{inst} wrote with token {token} outside any term of its own"
            ));
            continue;
        };
        if issued < term.start || issued > term.end {
            report.violations.push(format!(
                "c{inst} issued a write with token {token} at {}, outside its interval {}",
                rel(issued),
                term.show(o)
            ));
        }
        if token >= fence {
            fence = token;
            report.accepted += 1;
            let before = started.partition_point(|&(s, _)| s < at);
            if before > 0 && started[before - 1].1 > token {
                report.accepted_after_successor_started += 1;
            }
        } else {
            report.rejected += 1;
            report.refused.push((0, inst, at));
            let slot = record.instances.get(inst).map_or(usize::MAX, |i| i.slot);
            match faults.cause(inst, slot, term.start.saturating_sub(ttl), at) {
                Some(cause) => *report.rejected_by_cause.entry(cause).or_default() += 1,
                None => report.violations.push(format!(
                    "the fence refused a write from {} delivered at {} (highest accepted {fence}), and that process was neither paused nor cut off",
                    term.show(o),
                    rel(at)
                )),
            }
        }
    }
    report.terms = terms;
    report
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TTL: Micros = 2_000_000;

    fn rec(events: &[(usize, Micros, Event)], faults: Vec<Fault>) -> Record {
        Record {
            ttl: TTL,
            drift_margin: TTL / 10,
            instances: vec![
                Instance {
                    slot: 0,
                    died: None,
                    clock_rate: 1.0,
                },
                Instance {
                    slot: 1,
                    died: None,
                    clock_rate: 1.0,
                },
            ],
            events: vec![events.to_vec()],
            faults,
            origin: 0,
            end: 100_000_000,
        }
    }

    fn w(token: u64, issued: Micros) -> Event {
        Event::Write { token, issued }
    }

    #[test]
    fn parses_lines() {
        assert_eq!(
            parse_line("12 START 3 5"),
            Some((12, Some(3), Event::Start(5)))
        );
        assert_eq!(parse_line("12 WRITE 0 5 10"), Some((12, Some(0), w(5, 10))));
        assert_eq!(parse_line("12 EXIT"), Some((12, None, Event::Exit)));
        assert_eq!(parse_line("START 0 5"), None);
        assert_eq!(parse_line("12 START 0"), None);
        assert_eq!(parse_line("12 START x 5"), None);
    }

    #[test]
    fn back_to_back_terms_pass() {
        let r = check(&rec(
            &[
                (0, 10, Event::Start(1)),
                (0, 20, w(1, 15)),
                (0, 30, Event::Stop(1)),
                (1, 31, Event::Start(2)),
                (1, 40, w(2, 35)),
                (1, 50, Event::Drop(2)),
            ],
            vec![],
        ));
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.transitions(), 1);
        assert_eq!(r.accepted, 2);
    }

    #[test]
    fn an_overlap_without_a_pause_is_a_violation() {
        let r = check(&rec(
            &[
                (0, 10, Event::Start(1)),
                (1, 29, Event::Start(2)),
                (0, 30, Event::Stop(1)),
            ],
            vec![],
        ));
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert_eq!(r.largest_overlap, 1);
    }

    #[test]
    fn a_paused_leaders_overlap_is_excused_and_its_stale_writes_are_refused() {
        let pause = Fault {
            kind: FaultKind::Pause,
            target: 0,
            from: 100,
            to: 5_000_000,
        };
        let r = check(&rec(
            &[
                (0, 10, Event::Start(1)),
                (1, 3_000_000, Event::Start(2)),
                (1, 3_100_000, w(2, 3_000_000)),
                (0, 5_000_100, w(1, 90)),
                (0, 5_000_200, Event::Stop(1)),
            ],
            vec![pause.clone()],
        ));
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.excused_overlaps, 1);
        assert_eq!(r.rejected, 1);
        assert_eq!(r.rejected_by_cause.get("pause"), Some(&1));
        assert_eq!(r.longest_work_after_resume, 200);

        // The same refused write without the pause is a violation twice
        // over: the overlap, and the refusal.
        let r = check(&rec(
            &[
                (0, 10, Event::Start(1)),
                (1, 3_000_000, Event::Start(2)),
                (1, 3_100_000, w(2, 3_000_000)),
                (0, 5_000_100, w(1, 90)),
                (0, 5_000_200, Event::Stop(1)),
            ],
            vec![],
        ));
        assert_eq!(r.violations.len(), 2, "{:?}", r.violations);
    }

    #[test]
    fn an_early_short_pause_does_not_excuse_a_later_overlap() {
        // Paused for 0.5 s, thawed, then still working 1.5 s later, when
        // the successor starts: the pause did not cause that.
        let pause = Fault {
            kind: FaultKind::Pause,
            target: 0,
            from: 1_000_000,
            to: 1_500_000,
        };
        let r = check(&rec(
            &[
                (0, 10, Event::Start(1)),
                (1, 3_000_000, Event::Start(2)),
                (0, 3_600_000, Event::Stop(1)),
            ],
            vec![pause],
        ));
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(
            r.violations[0].contains("kept working"),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn tokens_must_increase_in_start_order() {
        let r = check(&rec(
            &[
                (0, 10, Event::Start(5)),
                (0, 20, Event::Stop(5)),
                (1, 30, Event::Start(4)),
                (1, 40, Event::Stop(4)),
            ],
            vec![],
        ));
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        let r = check(&rec(
            &[
                (0, 10, Event::Start(5)),
                (0, 20, Event::Stop(5)),
                (1, 30, Event::Start(5)),
                (1, 40, Event::Stop(5)),
            ],
            vec![],
        ));
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
    }

    #[test]
    fn a_killed_process_ends_its_interval_at_its_death() {
        let mut record = rec(
            &[(0, 10, Event::Start(1)), (1, 3_000_000, Event::Start(2))],
            vec![],
        );
        record.instances[0].died = Some(1_000_000);
        let r = check(&record);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.terms[0].end, 1_000_000);
        assert_eq!(r.terms[1].end, 100_000_000);
    }

    #[test]
    fn keys_are_checked_apart() {
        // Two keys led at once by two processes: no overlap. An overlap
        // inside key 1 is a violation named by its key.
        let mut record = rec(
            &[
                (0, 10, Event::Start(1)),
                (0, 500, Event::Stop(1)),
                (1, 501, Event::Start(2)),
            ],
            vec![],
        );
        record.events.push(vec![
            (1, 20, Event::Start(1)),
            (0, 400, Event::Start(2)),
            (1, 450, Event::Stop(1)),
        ]);
        let r = check(&record);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(r.violations[0].starts_with("key 1: "), "{:?}", r.violations);
        assert_eq!(r.transitions(), 2);
        assert_eq!(r.terms.iter().filter(|t| t.key == 1).count(), 2);
        let (a, _) = r.largest_overlap_between.unwrap();
        assert_eq!(a.key, 1);
    }

    #[test]
    fn an_overlap_from_a_clock_beyond_the_margin_is_measured_not_excused_within_it() {
        let events = [
            (0, 10, Event::Start(1)),
            (1, 3_000_000, Event::Start(2)),
            (0, 3_200_000, Event::Stop(1)),
        ];
        // 20% slow against a 10% margin: beyond the stated limit.
        let mut record = rec(&events, vec![]);
        record.instances[0].clock_rate = 0.8;
        let r = check(&record);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.drift_overlaps, 1);
        assert_eq!(r.largest_drift_overlap, 200_000);
        // 5% slow is within it: the same overlap is a violation.
        record.instances[0].clock_rate = 0.95;
        let r = check(&record);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert_eq!(r.drift_overlaps, 0);
        // A fast clock never excuses one.
        record.instances[0].clock_rate = 1.5;
        assert_eq!(check(&record).violations.len(), 1);
    }
}
