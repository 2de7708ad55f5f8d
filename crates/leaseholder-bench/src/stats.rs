//! Percentiles, and CPU and memory from /proc.

use std::time::Duration;

/// Median, p99 and max of a set of samples (nearest rank).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Summary {
    pub(crate) median: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

/// Nearest-rank percentile `p` (0..=100) of sorted `v`.
fn rank(v: &[f64], p: f64) -> f64 {
    let n = v.len();
    let r = ((p / 100.0) * n as f64).ceil() as usize;
    v[r.clamp(1, n) - 1]
}

pub(crate) fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    Some(Summary {
        median: rank(&v, 50.0),
        p99: rank(&v, 99.0),
        max: v[v.len() - 1],
    })
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// This process's user + system CPU time, from /proc/self/stat.
pub(crate) fn cpu_time() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which is in parentheses and may hold
    // spaces): state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/self/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields
        .get(11)
        .ok_or_else(|| anyhow::anyhow!("no utime"))?
        .parse()?;
    let stime: u64 = fields
        .get(12)
        .ok_or_else(|| anyhow::anyhow!("no stime"))?
        .parse()?;
    // USER_HZ is 100 on every Linux this runs on.
    Ok(Duration::from_millis((utime + stime) * 10))
}

/// This process's resident memory in KiB, from /proc/self/status.
pub(crate) fn rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("bad VmRSS line"))?;
    Ok(kib.parse()?)
}
